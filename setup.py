"""Installable package `hyperrouter`: the clone's flat modules installed as one package folder, with console
commands (docs/install.md says why this form).

    pip install .         # then hyperrouter-train, hyperrouter-eval, hyperrouter-finetune, hyperrouter-bench
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PACKAGE = 'hyperrouter'
# The package's __init__.py, written at build time (the clone's root, which the package folder is, has none).
INIT = '''"""HyperRouter (Do et al., EMNLP 2023) and other MoE routers on Transformer-XL: the installed form.

The modules of this folder import one another by their plain names (`import moe`), as in the clone; each
console command puts this folder first on its own process's module path before it runs, so the folder, not
site-packages' top level, holds the names (docs/install.md).
"""
import importlib
import os
import sys


def _command(module):
    def main():
        folder = os.path.dirname(os.path.abspath(__file__))
        if folder not in sys.path:
            sys.path.insert(0, folder)
        return importlib.import_module(module).main()
    main.__doc__ = f'The command of {module}.py.'
    return main


train = _command('train')
evaluate = _command('eval')
finetune = _command('finetune')
bench = _command('bench')
'''


class BuildPackage(build_py):
    """build_py of the clone's modules (not this file), plus the package's __init__.py."""

    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir) if m[1] != 'setup']

    def run(self):
        super().run()
        with open(os.path.join(self.build_lib, PACKAGE, '__init__.py'), 'w') as f:
            f.write(INIT)


with open('requirements.txt') as f:
    requirements = [line.strip() for line in f if line.strip() and not line.startswith('#')]

setup(
    name='hyperrouter',
    version='0.1.0',
    description='HyperRouter (EMNLP 2023) and other MoE routers on Transformer-XL, in plain PyTorch',
    license='MIT',
    python_requires='>=3.9',
    packages=[PACKAGE],
    package_dir={PACKAGE: '.'},          # every module of the clone's root (not setup.py), under hyperrouter/
    cmdclass={'build_py': BuildPackage},
    install_requires=requirements,
    entry_points={'console_scripts': [f'hyperrouter-train={PACKAGE}:train', f'hyperrouter-eval={PACKAGE}:evaluate',
                                      f'hyperrouter-finetune={PACKAGE}:finetune',
                                      f'hyperrouter-bench={PACKAGE}:bench']},
)
