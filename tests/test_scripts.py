"""The pretraining scripts: they carry the paper's settings, and each runs its whole pipeline on the built-in corpus.

The settings are checked statically: each script's `launch train.py ...` argument list is read (not run),
resolved by train.py's own parser (so a flag a script leaves out takes train.py's default) and compared
with the table below, written from the paper (Table A1, C.1, C.2) and the published scripts. The run
test appends flags that shrink the model and the run (train.py takes the last value of a flag), so it
checks the scripts' plumbing, not their settings.
"""
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import evaluation
import train
import train_args

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
           'directly_dense': 'Dense', 'switch': 'Switch', 'gshard': 'GShard', 'noisy_topk': 'Noisy top-k',
           'hash': 'Hash', 'xmoe': 'X-MoE', 'dts': 'DTS-Gate'}


def expected_method(script):
    name = os.path.basename(script)
    return METHODS[max((prefix for prefix in METHODS if name.startswith(prefix + '_')), key=len)]


def script_env(synthetic_dir):
    # DEVICE=cpu: launch.sh does not start a python to ask whether torch sees a GPU (seconds a run)
    return dict(os.environ, DATA=synthetic_dir, PYTHON=sys.executable, OMP_NUM_THREADS='1', DEVICE='cpu')



def test_the_scripts_of_the_original_readme_exist():
    for method in ('hyper_router', 'smoe_dropout', 'smoe', 'directly_dense_dropout', 'directly_dense'):
        for data in ('enwik8', 'wiki103'):
            assert f'script/table1/{method}_{data}.sh' in SCRIPTS
    for method in ('hyper_router', 'smoe_dropout', 'smoe'):
        for size in ('medium', 'large'):
            assert f'script/LargeScale/{method}_{size}_enwik8.sh' in SCRIPTS


def test_the_scripts_of_the_other_methods_exist():
    for name in ('thor_enwik8', 'thor_wiki103', 'hypermoe_enwik8', 'hypermoe_wiki103', 'hyper_router_hypermoe_enwik8',
                 'switch_enwik8', 'switch_wiki103', 'gshard_enwik8', 'gshard_wiki103', 'noisy_topk_enwik8',
                 'noisy_topk_wiki103'):
        assert f'script/table1/{name}.sh' in SCRIPTS
    for method in ('hash', 'xmoe', 'dts'):
        for data in ('enwik8', 'wiki103'):
            assert f'script/table1/{method}_{data}.sh' in SCRIPTS


# ----------------------------------------------------------------------------- the paper's settings, read statically

# Table A1: every pretraining run of the paper, enwik8 and WikiText-103 alike (small model: 4 layers).
RECIPE = dict(d_model=256, n_head=8, d_head=64, dropatt=0.0, optim='adam', lr=2.5e-4, scheduler='cosine',
              warmup_step=0, eta_min=0.0, clip=0.25, batch_size=22, batch_chunk=1, tgt_len=512, mem_len=512,
              eval_tgt_len=128, ext_len=0, seed=1111, eval_interval=4000, adaptive=False, pre_lnorm=False,
              same_length=False, clamp_len=-1, not_tied=False)
# k grows linearly from 8 to 16 over the whole run, as in the published scripts (the paper text says from 2)
DYNAMIC_K = dict(dynamic_moe=True, dynamic_moe_mode='linear_increase', moe_top_k_min=8, moe_top_k_max=16)
FIXED_K = dict(dynamic_moe=False)
MOE = dict(moe=True, d_inner=512, moe_num_expert=16, moe_top_k=2, balance_loss=0.0)
HYPERMOE = dict(moe_variant='hypermoe', hypermoe_emb_dim=128, hypermoe_hidden=128, hypermoe_layer_emb_dim=10,
                hypermoe_adapter_dim=64)
METHOD_FLAGS = {
    'HyperRouter': dict(MOE, gate_name='hyper_router', hyper_size=256, freeze_gate=False, moe_variant='plain',
                        **DYNAMIC_K),
    # the scripts' original names (CustomNaiveGate [--freeze_gate], HyperRouterGate) resolve to the routers' own
    'SMoE-Dropout': dict(MOE, gate_name='smoe_dropout', freeze_gate=False, moe_variant='plain', **DYNAMIC_K),
    'SMoE': dict(MOE, gate_name='smoe', freeze_gate=False, moe_variant='plain', **FIXED_K),
    'THOR': dict(MOE, gate_name='thor', moe_top_k=1, thor_alpha=5.0, thor_inference='random', moe_variant='plain',
                 **FIXED_K),
    # HyperMoE's published LM code: its noisy top-k router and 0.01 x (cv^2 importance + cv^2 load)
    'HyperMoE': dict(MOE, gate_name='noisy_topk', importance_loss=0.01, load_loss=0.01, freeze_gate=False,
                     **HYPERMOE, **FIXED_K),
    'HyperRouter+HyperMoE': dict(MOE, gate_name='hyper_router', hyper_size=256, freeze_gate=False, **HYPERMOE,
                                 **DYNAMIC_K),
    # the method's aux-loss weights and capacity factors are the gate class's defaults (no flag)
    'Switch': dict(MOE, gate_name='switch', moe_top_k=1, switch_jitter=0.01, moe_variant='plain', balance_loss=0.01,
                   capacity_factor=1.25, eval_capacity_factor=2.0, **FIXED_K),
    'GShard': dict(MOE, gate_name='gshard', moe_top_k=2, moe_variant='plain', balance_loss=0.01, capacity_factor=1.0,
                   eval_capacity_factor=2.0, **FIXED_K),
    'Noisy top-k': dict(MOE, gate_name='noisy_topk', moe_top_k=2, moe_variant='plain', importance_loss=0.1,
                        load_loss=0.1, **FIXED_K),
    # Hash layers: k = 1, no router and no auxiliary loss (Roller et al. 2021)
    'Hash': dict(MOE, gate_name='hash', moe_top_k=1, hash_seed=0, moe_variant='plain', **FIXED_K),
    # X-MoE: the reference GPT recipe's top-2 and balance loss 0.01; routing dimension 16, temperature 0.07
    'X-MoE': dict(MOE, gate_name='xmoe', xmoe_dim=16, xmoe_temperature=0.07, balance_loss=0.01, moe_variant='plain',
                  **FIXED_K),
    # DTS-Gate: Gumbel temperature 2.0 -> 0.3 over half the run, threshold 0.001, then top-1
    'DTS-Gate': dict(MOE, gate_name='dts', moe_top_k=1, dts_max_temp=1.0, dts_min_temp=0.5, dts_anneal_steps=200_000,
                     dts_threshold=0.001, moe_variant='plain', **FIXED_K),
    'Dense': dict(moe=False, d_inner=8192),             # one FFN as wide as the 16 experts of 512
    'Dense+Dropout': dict(moe=False, d_inner=8192),
}
DATA = {'enwik8': 'data/enwik8', 'wt103': 'data/wikitext-103'}
SMOE_DROPOUT = 0.0     # the last published smoe_* scripts: dropout 0.0 (README, Differences)
# script: (dataset, layers, steps, method, dropout, other settings); medium 8 layers / 400k steps and large
# 12 layers / 100k steps as the paper (C.1, C.2), every FFN an MoE layer
TABLE = {
    'table1/hyper_router_enwik8.sh': ('enwik8', 4, 400_000, 'HyperRouter', 0.1, {}),
    'table1/smoe_dropout_enwik8.sh': ('enwik8', 4, 400_000, 'SMoE-Dropout', 0.1, {}),
    'table1/smoe_enwik8.sh': ('enwik8', 4, 400_000, 'SMoE', SMOE_DROPOUT, {}),
    'table1/directly_dense_dropout_enwik8.sh': ('enwik8', 4, 400_000, 'Dense+Dropout', 0.1, {}),
    'table1/directly_dense_enwik8.sh': ('enwik8', 4, 400_000, 'Dense', 0.0, {}),
    'table1/thor_enwik8.sh': ('enwik8', 4, 400_000, 'THOR', 0.1, {}),
    'table1/hypermoe_enwik8.sh': ('enwik8', 4, 400_000, 'HyperMoE', 0.1, {}),
    'table1/hyper_router_hypermoe_enwik8.sh': ('enwik8', 4, 400_000, 'HyperRouter+HyperMoE', 0.1, {}),
    'table1/switch_enwik8.sh': ('enwik8', 4, 400_000, 'Switch', 0.1, {}),
    'table1/gshard_enwik8.sh': ('enwik8', 4, 400_000, 'GShard', 0.1, {}),
    'table1/noisy_topk_enwik8.sh': ('enwik8', 4, 400_000, 'Noisy top-k', 0.1, {}),
    'table1/switch_wiki103.sh': ('wt103', 4, 400_000, 'Switch', 0.1, {}),
    'table1/gshard_wiki103.sh': ('wt103', 4, 400_000, 'GShard', 0.1, {}),
    'table1/noisy_topk_wiki103.sh': ('wt103', 4, 400_000, 'Noisy top-k', 0.1, {}),
    'table1/hyper_router_wiki103.sh': ('wt103', 4, 400_000, 'HyperRouter', 0.1, {}),
    'table1/smoe_dropout_wiki103.sh': ('wt103', 4, 400_000, 'SMoE-Dropout', 0.1, {}),
    'table1/smoe_wiki103.sh': ('wt103', 4, 400_000, 'SMoE', SMOE_DROPOUT, {}),
    # the published script: batch 66, 134k steps; ours keeps the paper's batch 22, 400k steps (Table A1)
    'table1/directly_dense_dropout_wiki103.sh': ('wt103', 4, 400_000, 'Dense+Dropout', 0.1, {}),
    'table1/directly_dense_wiki103.sh': ('wt103', 4, 400_000, 'Dense', 0.0, {}),
    # two chunks of 11 columns: the same batch of 22, half the memory of the [tokens, 267,735] distributions
    'table1/thor_wiki103.sh': ('wt103', 4, 400_000, 'THOR', 0.1, {'batch_chunk': 2}),
    'table1/hypermoe_wiki103.sh': ('wt103', 4, 400_000, 'HyperMoE', 0.1, {}),
    'table1/hash_enwik8.sh': ('enwik8', 4, 400_000, 'Hash', 0.1, {}),
    'table1/hash_wiki103.sh': ('wt103', 4, 400_000, 'Hash', 0.1, {}),
    'table1/xmoe_enwik8.sh': ('enwik8', 4, 400_000, 'X-MoE', 0.1, {}),
    'table1/xmoe_wiki103.sh': ('wt103', 4, 400_000, 'X-MoE', 0.1, {}),
    'table1/dts_enwik8.sh': ('enwik8', 4, 400_000, 'DTS-Gate', 0.1, {}),
    'table1/dts_wiki103.sh': ('wt103', 4, 400_000, 'DTS-Gate', 0.1, {}),
    'LargeScale/hyper_router_medium_enwik8.sh': ('enwik8', 8, 400_000, 'HyperRouter', 0.1, {}),
    'LargeScale/smoe_dropout_medium_enwik8.sh': ('enwik8', 8, 400_000, 'SMoE-Dropout', 0.1, {}),
    'LargeScale/smoe_medium_enwik8.sh': ('enwik8', 8, 400_000, 'SMoE', SMOE_DROPOUT, {}),
    'LargeScale/hyper_router_large_enwik8.sh': ('enwik8', 12, 100_000, 'HyperRouter', 0.1, {}),
    'LargeScale/smoe_dropout_large_enwik8.sh': ('enwik8', 12, 100_000, 'SMoE-Dropout', 0.1, {}),
    'LargeScale/smoe_large_enwik8.sh': ('enwik8', 12, 100_000, 'SMoE', SMOE_DROPOUT, {}),
}
# What the header of each method's scripts (and of every LargeScale script) must say about where it departs
# from the published scripts or from the paper text.
DEVIATIONS = {
    'HyperRouter': ['--hyper_size', 'never reached', 'the paper text says from 2'],
    'SMoE-Dropout': ['the paper text says from 2'],
    'SMoE': ['--freeze_gate'],
    'Noisy top-k': ['k = 2 as the SMoE column', 'k = 4'],
    'HyperMoE': ['k = 1 of 8 experts', "--importance_loss 0.01  cv^2 of the per-expert sum of gate values (HyperMoE's",
                 "--load_loss 0.01        cv^2 of the noisy router's smooth load estimate (HyperMoE's"],
    'HyperRouter+HyperMoE': ['No auxiliary loss'],
    'LargeScale': ['layers 0-3 MoE', '18 layers, batch 44 and 50k steps'],
    'Hash': ['our extension'],
    'X-MoE': ['second expert', 'capacity'],
    'DTS-Gate': ['expert-diversify phase', '--max-temperature 1.0, --min-temperature 0.5', 'without --use-gumbel-gates'],
}
# Departures of one script alone
SCRIPT_DEVIATIONS = {'table1/directly_dense_dropout_wiki103.sh': ['batch 66', '134,000 steps']}


def script_flags(script):
    """The train.py flags of a script's `launch train.py ...` line, `${VAR:-default}` read as its default."""
    with open(os.path.join(REPO, 'script', script)) as f:
        text = f.read().replace('\\\n', ' ')                      # join the continued lines
    [line] = [line for line in text.splitlines() if line.lstrip().startswith('launch ')]
    words = [re.sub(r'\$\{\w+:-([^}]*)\}', r'\1', word) for word in shlex.split(line)]
    assert words[:2] == ['launch', 'train.py'] and words[-1] == '$@', line
    return words[2:-1]


def script_args(script):
    return vars(train.parse_args(script_flags(script)))


def header_comment(script):
    with open(os.path.join(REPO, 'script', script)) as f:
        return ' '.join(line.lstrip('# ').strip() for line in f if line.startswith('#'))


def test_every_pretraining_script_has_a_row_in_the_settings_table():
    assert sorted(TABLE) == sorted(os.path.relpath(s, 'script') for s in SCRIPTS)


@pytest.mark.parametrize('script', sorted(TABLE))
def test_script_carries_the_papers_settings(script):
    dataset, n_layer, max_step, method, _, other = TABLE[script]
    expected = dict(RECIPE, dataset=dataset, n_layer=n_layer, max_step=max_step, **METHOD_FLAGS[method], **other)
    if expected.get('dynamic_moe'):
        expected['dynamic_overall_steps'] = max_step                     # k reaches 16 at the end of the run
    if expected['moe']:
        expected['moe_index'] = ','.join(str(i) for i in range(n_layer))  # every layer is an MoE layer
    args = script_args(script)
    assert {name: args[name] for name in expected} == expected
    assert os.path.normpath(args['data']) == DATA[dataset]


@pytest.mark.parametrize('script', sorted(TABLE))
def test_script_dropout_is_its_methods(script):
    assert script_args(script)['dropout'] == TABLE[script][4]


@pytest.mark.parametrize('script', sorted(TABLE))
def test_script_header_documents_its_departures_from_the_published_scripts(script):
    wanted = DEVIATIONS.get(TABLE[script][3], [])
    if script.startswith('LargeScale/'):
        wanted = wanted + DEVIATIONS['LargeScale']
    wanted = wanted + SCRIPT_DEVIATIONS.get(script, [])
    header = header_comment(script)
    assert [phrase for phrase in wanted if phrase not in header] == []


def check_pipeline_output(script, work, out):
    """The run of `script` under `work` trained, tested at every k and printed its table, under its method."""
    [run_dir] = glob.glob(f'{work}-synthetic/*')
    with open(os.path.join(run_dir, 'results.json')) as f:
        entries = json.load(f)
    with open(os.path.join(run_dir, 'config.json')) as f:
        config = json.load(f)
    assert entries and all(e['split'] == 'test' and e['results'] for e in entries)
    assert {e['method'] for e in entries} == {expected_method(script)}
    assert 'bpc' in out                                            # the final table is printed
    expected_dataset = 'wt103' if 'wiki103' in script else 'enwik8'
    with open(os.path.join(REPO, script)) as f:
        assert f'--dataset {expected_dataset}' in f.read()
    assert config['args']['lr'] == 0.00025 and config['args']['tgt_len'] == 16


@pytest.mark.parametrize('script', SCRIPTS)
def test_script_runs_its_pipeline(script, synthetic_dir, tmp_path, script_command, capsys):
    # the command the script starts, run in this process (test_a_script_runs_as_a_user_starts_it: one in its own)
    work = str(tmp_path / 'runs')
    program, *flags = script_command(script, *SHRINK, '--work_dir', work, DATA=synthetic_dir)
    assert program == 'train.py'
    train.main(flags)
    check_pipeline_output(script, work, capsys.readouterr().out)


def test_a_script_runs_as_a_user_starts_it(synthetic_dir, tmp_path):
    script, work = 'script/table1/hyper_router_enwik8.sh', str(tmp_path / 'runs')
    env = script_env(synthetic_dir)
    env.pop('DEVICE')                                              # launch.sh's default: auto
    result = subprocess.run(['bash', script, *SHRINK, '--work_dir', work], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_pipeline_output(script, work, result.stdout)


def test_demo_prints_the_side_by_side_table(synthetic_dir, tmp_path):
    env = dict(script_env(synthetic_dir), WORK=str(tmp_path / 'demo'), STEPS='2')
    result = subprocess.run(['bash', 'script/demo.sh', '--max_eval_steps', '2', '--eval-interval', '2'], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    header = next(line for line in result.stdout.splitlines() if line.strip().startswith('k '))
    assert header.split() == ['k', 'HyperRouter', 'SMoE-Dropout', 'SMoE', 'THOR', 'SMoE+HyperMoE']
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (['1'], ['2'], ['16'])]
    assert [r[0] for r in rows] == ['1', '2', '16'] and all(len(r) == 6 for r in rows)
    assert 'corpus floor (bpc)' in result.stdout


def test_demo_routers_prints_one_table_with_each_fixed_k_method_marked_at_its_k(synthetic_dir, tmp_path):
    """Shortened: 2 steps, three of the routers (a dynamic-k one, a top-1 one, one at k = 2)."""
    env = dict(script_env(synthetic_dir), WORK=str(tmp_path / 'demo'), STEPS='2', METHODS='smoe_dropout thor hypermoe')
    result = subprocess.run(['bash', 'script/demo_routers.sh', '--max_eval_steps', '2', '--eval-interval', '2'],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.strip().startswith('k '))
    assert header.split() == ['k', 'SMoE-Dropout', 'THOR', 'HyperMoE']
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.split()[:1] in (['1'], ['2'], ['4'], ['16'])}
    assert list(rows) == ['1', '2', '4', '16'] and all(len(r) == 3 for r in rows.values())
    marked = {(k, column) for k, row in rows.items() for column, cell in zip(header.split()[1:], row) if '*' in cell}
    assert marked == {('1', 'THOR'), ('2', 'HyperMoE')}
    assert 'corpus floor (bpc)' in result.stdout and 'wall time:' in result.stdout


@pytest.mark.parametrize('methods,message', [
    ('smoe nosuch', "error: unknown method 'nosuch' in METHODS; choose from: smoe smoe_dropout hyper_router"),
])
def test_demo_routers_refuses_an_unknown_method_before_training(methods, message, synthetic_dir, tmp_path):
    env = dict(script_env(synthetic_dir), WORK=str(tmp_path / 'demo'), METHODS=methods)
    result = subprocess.run(['bash', 'script/demo_routers.sh'], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith(message)
    assert 'training' not in result.stderr and not os.listdir(tmp_path / 'demo')


# ----------------------------------------------------------------------------- a researcher's first runs

DYNAMIC_SCRIPTS = [s for s in sorted(TABLE) if METHOD_FLAGS[TABLE[s][3]].get('dynamic_moe')]


@pytest.mark.parametrize('script', DYNAMIC_SCRIPTS)
def test_a_shortened_script_shortens_its_k_schedule_and_its_hparams_row_says_so(script):
    """README's `bash script/... --max_step 1000`: k must still grow from 8 to 16, over the 1000 steps."""
    args = train.parse_args([*script_flags(script), '--max_step', '1000'])
    assert args.dynamic_overall_steps == 1000
    assert [train.current_top_k(step, args) for step in (0, 999)] == [8, 16]
    config = {'args': vars(args), 'model_config': train_args.model_config(args, 204)}
    assert evaluation.run_hparams(config)['k'] == '8-16 linear_increase'
    short = train.parse_args([*script_flags(script), '--max_step', '2'])       # too short to reach 16: said
    assert evaluation.run_hparams({'args': vars(short), 'model_config': config['model_config']})['k'] == \
        '8-12 linear_increase'


@pytest.mark.parametrize('device, flags, runs', [(None, [], False), (None, ['--max_step', '10000'], True),
                                                 (None, ['--max_step=20000'], False), ('auto', [], False),
                                                 ('cpu', [], True)])
def test_a_paper_size_run_goes_on_the_cpu_only_when_asked(device, flags, runs, launch_script):
    result, started = launch_script('script/table1/hyper_router_enwik8.sh', *flags, DEVICE=device)
    assert bool(started) == runs
    if runs:
        assert result.returncode == 0, result.stderr
    else:
        steps = flags[0].split('=')[1] if flags else '400000'
        assert result.returncode == 2 and result.stderr.splitlines() == [
            f'error: torch sees no CUDA device, and a run of {steps} steps (--max_step) would train on the CPU for '
            'days; give DEVICE=cpu to train it there anyway, DEVICE=cuda on a GPU machine, or a shorter --max_step '
            '(at most 10000)']


def test_a_bad_moe_index_from_a_script_is_an_error_line_and_leaves_no_run_directory(tmp_path):
    work = tmp_path / 'runs'
    result = subprocess.run(['bash', 'script/table1/smoe_enwik8.sh', '--n_layer', '2', '--work_dir', str(work)],
                            cwd=REPO, env=dict(os.environ, PYTHON=sys.executable, DEVICE='cpu', DATA='/nonexistent'),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith('train.py: error: --moe_index 0,1,2,3: layer(s) 2,3 outside')
    assert not glob.glob(f'{work}*')


def readme():
    with open(os.path.join(REPO, 'README.md')) as f:
        return f.read()


def test_each_table_is_one_tensorboard_folder_and_readme_shows_the_command():
    folders = {'table1-enwik8': [], 'table1-wt103': [], 'table2-enwik8': []}
    for script in sorted(TABLE):
        dataset = TABLE[script][0]
        folder = f"{'table2' if script.startswith('LargeScale/') else 'table1'}-{dataset}"
        assert os.path.dirname(script_args(script)['work_dir']) == f'runs/{folder}'
        folders[folder].append(script)
        assert f'runs/{folder}' in header_comment(script)
    for folder in folders:
        assert f'tensorboard --logdir runs/{folder}' in readme()


def test_script_headers_and_readme_agree_on_where_scripts_run_from_and_point_to_files_that_exist():
    for path in [*SCRIPTS, 'script/figures.sh']:
        with open(os.path.join(REPO, path)) as f:
            header = ''.join(line for line in f if line.startswith('#'))
        assert 'README' not in header.replace('README.md', ''), path     # README's sections moved to docs/
        for doc in re.findall(r'docs/[\w.]+\.md', header):
            assert os.path.isfile(os.path.join(REPO, doc)), (path, doc)
        if path in SCRIPTS:
            assert 'Usage (from anywhere)' in header
    assert 'from the repository root' not in readme() and 'from anywhere' in readme()


def printed_table(text, first_column):
    """{method: {k: value}} of the fenced table in `text` whose header starts with `first_column`."""
    for block in re.split(r'^```.*$', text, flags=re.M)[1::2]:
        lines = block.splitlines()
        cells = [re.split(r'\s{2,}', line.strip()) for line in lines]        # 'Noisy top-k' is one name
        header = next((i for i, row in enumerate(cells) if row[:2] == ['k', first_column]), None)
        if header is not None:
            methods = cells[header][1:]
            rows = [row for row in cells[header + 1:] if row[0].isdigit()]
            return {m: {row[0]: float(row[1 + i].rstrip('*')) for row in rows} for i, m in enumerate(methods)}
    raise AssertionError(f'no table with a {first_column} column')


def test_readme_says_why_its_demo_table_differs_from_the_every_router_table():
    with open(os.path.join(REPO, 'docs', 'routing.md')) as f:
        every_router = printed_table(f.read(), 'SMoE')
    every_router['SMoE+HyperMoE'] = every_router.pop('HyperMoE')   # printed before the rename (routing.md says so)
    demo = printed_table(readme(), 'HyperRouter')
    for method in demo:                                  # the same code: beyond k = 2, within the stated 0.002
        for k in ('4', '8', '16'):
            assert abs(demo[method][k] - every_router[method][k]) <= 0.0025, (method, k)
    for method in ('HyperRouter', 'SMoE-Dropout'):       # at k = 1 another machine's BLAS: the README names both
        assert demo[method]['1'] != every_router[method]['1']
        assert f"{method} {every_router[method]['1']:.3f}" in readme().replace('\n', ' ')
