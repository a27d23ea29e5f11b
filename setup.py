"""Installable package: the flat modules of the repository plus console entry points."""
from setuptools import setup

with open('requirements.txt') as f:
    requirements = [line.strip() for line in f if line.strip() and not line.startswith('#')]

setup(
    name='hyperrouter',
    version='0.1.0',
    description='HyperRouter (EMNLP 2023) and other MoE routers on Transformer-XL, in plain PyTorch',
    license='MIT',
    python_requires='>=3.9',
    py_modules=['adaptive_softmax', 'analysis', 'analysis_commands', 'bench', 'capacity', 'custom_gate', 'data_utils',
                'eval', 'evaluation', 'figures', 'finetune', 'finetune_data', 'hyper_expert', 'hyper_router',
                'mem_transformer', 'model_flops', 'moe', 'moe_engine', 'optimization', 'output_files', 'run_records',
                'run_utils', 'seeds', 'sim_device', 'synthetic_corpus', 'torch_version', 'train', 'train_args'],
    install_requires=requirements,
    entry_points={'console_scripts': ['hyperrouter-train=train:main', 'hyperrouter-eval=eval:main',
                                      'hyperrouter-bench=bench:main',
                                      'hyperrouter-finetune=finetune:main']},
)
