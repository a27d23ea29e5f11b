"""Every pretraining script runs its whole pipeline (train, validate, test, results.json) on the built-in corpus.

The scripts keep the paper's hyperparameters; the test appends flags that shrink the model and the run
(train.py takes the last value of a flag), so what is checked is the script's own flags and plumbing.
"""
import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'script', '*', '*.sh'))
                 if os.path.basename(os.path.dirname(p)) in ('table1', 'LargeScale'))
SHRINK = ['--dataset', 'synthetic', '--n_layer', '2', '--d_model', '16', '--n_head', '2', '--d_head', '8',
          '--d_inner', '16', '--tgt_len', '16', '--mem_len', '16', '--eval_tgt_len', '8', '--batch_size', '4',
          '--max_step', '2', '--eval-interval', '2', '--max_eval_steps', '2', '--moe-num-expert', '4',
          '--moe_index', '0,1', '--moe-top-k-min', '1', '--moe-top-k-max', '4', '--dynamic_overall_steps', '2']


# the results' method column of each script, by the longest matching prefix of its name
METHODS = {'hyper_router_hypermoe': 'HyperRouter+HyperMoE', 'hyper_router': 'HyperRouter', 'hypermoe': 'HyperMoE',
           'smoe_dropout': 'SMoE-Dropout', 'smoe': 'SMoE', 'thor': 'THOR', 'directly_dense_dropout': 'Dense+Dropout',
           'directly_dense': 'Dense'}


def expected_method(script):
    name = os.path.basename(script)
    return METHODS[max((prefix for prefix in METHODS if name.startswith(prefix + '_')), key=len)]


def script_env(synthetic_dir):
    return dict(os.environ, DATA=synthetic_dir, PYTHON=sys.executable, OMP_NUM_THREADS='1')


@pytest.fixture(scope='module')
def synthetic_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('data') / 'synthetic')


def test_the_scripts_of_the_original_readme_exist():
    for method in ('hyper_router', 'smoe_dropout', 'smoe', 'directly_dense_dropout', 'directly_dense'):
        for data in ('enwik8', 'wiki103'):
            assert f'script/table1/{method}_{data}.sh' in SCRIPTS
    for method in ('hyper_router', 'smoe_dropout', 'smoe'):
        for size in ('medium', 'large'):
            assert f'script/LargeScale/{method}_{size}_enwik8.sh' in SCRIPTS


def test_the_scripts_of_the_other_methods_exist():
    for name in ('thor_enwik8', 'thor_wiki103', 'hypermoe_enwik8', 'hypermoe_wiki103', 'hyper_router_hypermoe_enwik8'):
        assert f'script/table1/{name}.sh' in SCRIPTS


@pytest.mark.parametrize('script', SCRIPTS)
def test_script_runs_its_pipeline(script, synthetic_dir, tmp_path):
    work = str(tmp_path / 'runs')
    result = subprocess.run(['bash', script, *SHRINK, '--work_dir', work], cwd=REPO, env=script_env(synthetic_dir),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [run_dir] = glob.glob(f'{work}-synthetic/*')
    with open(os.path.join(run_dir, 'results.json')) as f:
        entries = json.load(f)
    with open(os.path.join(run_dir, 'config.json')) as f:
        config = json.load(f)
    assert entries and all(e['split'] == 'test' and e['results'] for e in entries)
    assert {e['method'] for e in entries} == {expected_method(script)}
    assert 'bpc' in result.stdout                                  # the final table is printed
    expected_dataset = 'wt103' if 'wiki103' in script else 'enwik8'
    with open(os.path.join(REPO, script)) as f:
        assert f'--dataset {expected_dataset}' in f.read()
    assert config['args']['lr'] == 0.00025 and config['args']['tgt_len'] == 16


def test_demo_prints_the_side_by_side_table(synthetic_dir, tmp_path):
    env = dict(script_env(synthetic_dir), WORK=str(tmp_path / 'demo'), STEPS='2')
    result = subprocess.run(['bash', 'script/demo.sh', '--max_eval_steps', '2', '--eval-interval', '2'], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    header = next(line for line in result.stdout.splitlines() if line.strip().startswith('k '))
    assert header.split() == ['k', 'HyperRouter', 'SMoE-Dropout', 'SMoE', 'THOR', 'HyperMoE']
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (['1'], ['2'], ['16'])]
    assert [r[0] for r in rows] == ['1', '2', '16'] and all(len(r) == 6 for r in rows)
    assert 'corpus floor (bpc)' in result.stdout
