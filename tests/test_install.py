"""`pip install .` (offline: no dependencies, no build isolation, into a folder of its own) gives console commands
that train, evaluate and fine-tune from any folder; the project's modules sit in one package folder, never at
the top of site-packages, and a run's src/ holds exactly them."""
import glob
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, '*.py')) if not p.endswith('setup.py'))
TINY = ['--dataset', 'synthetic', '--n_layer', '2', '--d_model', '16', '--n_head', '2', '--d_head', '8', '--d_inner',
        '16', '--tgt_len', '16', '--mem_len', '16', '--eval_tgt_len', '8', '--batch_size', '4', '--max_eval_steps',
        '2', '--eval_ks', '1,2', '--moe', '--moe-num-expert', '4', '--gate_name', 'hyper_router', '--hyper_size', '8',
        '--max_step', '2', '--eval-interval', '2']


def test_pip_install_gives_commands_that_run_from_any_folder_and_no_top_level_module(tmp_path):
    clone = tmp_path / 'clone'                 # the clone's files, so the build leaves nothing in the repository
    clone.mkdir()
    for name in [*MODULES, 'setup.py', 'requirements.txt', 'pyproject.toml']:
        shutil.copy(os.path.join(REPO, name), clone)
    site = tmp_path / 'site'
    built = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation',
                            '--no-index', '--target', str(site), str(clone)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    assert sorted(p for p in os.listdir(site) if not p.endswith('.dist-info')) == ['bin', 'hyperrouter']
    assert sorted(p for p in os.listdir(site / 'hyperrouter') if p.endswith('.py')) == sorted(MODULES + ['__init__.py'])

    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS='1')

    def command(name, *args):
        return subprocess.run([str(site / 'bin' / f'hyperrouter-{name}'), *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=300)
    trained = command('train', *TINY, '--data', str(tmp_path / 'data'), '--work_dir', 'runs/tiny')
    assert trained.returncode == 0, trained.stderr[-2000:]
    [run_dir] = glob.glob(str(elsewhere / 'runs' / 'tiny-synthetic' / '*'))
    assert sorted(os.listdir(os.path.join(run_dir, 'src'))) == MODULES          # the project's modules, no others
    evaluated = command('eval', '--run', run_dir, '--ks', '1', '--max_eval_steps', '1', '--json', 'out.json')
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    with open(elsewhere / 'out.json') as f:
        assert [entry['method'] for entry in json.load(f)] == ['HyperRouter', 'HyperRouter']
    finetune = command('finetune', '--help')
    assert finetune.returncode == 0 and '--pretrained' in finetune.stdout
