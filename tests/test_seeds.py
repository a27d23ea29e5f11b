"""Repeated seeds: grouping runs by configuration, mean ± std, the paired t-test, figures with spreads, SEEDS.

Expected numbers are computed by hand in the comments, taken from printed t tables, or from the closed forms
of Student's t with 1 and 2 degrees of freedom; none comes from the code under test.
"""
import glob
import json
import math
import os
import re
import stat
import subprocess
import sys

import pytest

import analysis
import eval as eval_script
import evaluation
import figures
import seeds
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_ARGS = {'seed': 1111, 'lr': 0.002, 'gate_name': 'CustomNaiveGate', 'work_dir': 'runs/demo/smoe',
             'restart': False, 'restart_dir': '', 'stop_step': -1}
MODEL = {'moe': True, 'gate_name': 'CustomNaiveGate', 'dropout': 0.1, 'moe_num_expert': 16}


def write_run(root, name, results, method='SMoE', git_commit='abc', **args):
    """A run directory with a config.json and a results.json as train.py writes them (best_dense entry)."""
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    config = {'args': dict(BASE_ARGS, **args), 'model_config': MODEL, 'git_commit': git_commit, 'torch': '2.13',
              'world_size': 1, 'start_step': 0}
    entry = {'dataset': 'synthetic', 'metric': 'bpc', 'split': 'test', 'gate': 'CustomNaiveGate', 'method': method,
             'checkpoint': 'best_dense', 'step': 500, 'seed': config['args']['seed'],
             'results': {str(k): v for k, v in results.items()}, 'bpc_floor': 1.04}
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
        json.dump(config, f)
    with open(os.path.join(run_dir, 'results.json'), 'w') as f:
        json.dump([entry], f)
    return run_dir


# ----------------------------------------------------------------------------- grouping

def test_runs_that_differ_only_in_seed_directory_or_commit_are_one_configuration(tmp_path):
    a = write_run(tmp_path, 'a', {1: 1.0}, seed=1)
    b = write_run(tmp_path, 'b', {1: 1.2}, seed=2, work_dir='elsewhere', git_commit='def')
    c = write_run(tmp_path, 'c', {1: 1.4}, seed=3, restart=True, restart_dir=str(tmp_path / 'c'))
    [(label, runs)] = evaluation.read_runs([a, b, c])
    assert label == 'SMoE' and [seed for seed, _, _ in runs] == [1, 2, 3]


def test_two_configurations_are_never_merged_and_their_labels_say_what_differs(tmp_path):
    a1 = write_run(tmp_path, 'a1', {1: 1.0}, seed=1)
    b1 = write_run(tmp_path, 'b1', {1: 2.0}, seed=1, lr=0.001)
    a2 = write_run(tmp_path, 'a2', {1: 1.2}, seed=2)
    b2 = write_run(tmp_path, 'b2', {1: 2.2}, seed=2, lr=0.001)
    groups = evaluation.read_runs([a1, b1, a2, b2])
    assert [label for label, _ in groups] == ['SMoE (lr=0.002)', 'SMoE (lr=0.001)']
    assert [[run_dir for _, run_dir, _ in runs] for _, runs in groups] == [[a1, a2], [b1, b2]]


# ----------------------------------------------------------------------------- mean ± std in the table

def test_the_table_gives_mean_and_sample_std_over_seeds(tmp_path):
    # SMoE: k=1 values 1.0, 1.2, 1.4: mean 1.2, squared deviations 0.04 + 0 + 0.04 = 0.08, / (3 - 1) -> std 0.2
    #       k=2 values 2.0, 2.0, 2.3: mean 2.1, deviations -0.1, -0.1, 0.2 -> 0.06 / 2 = 0.03 -> std 0.1732
    # HyperMoE: one seed, 0.9 and 1.9: no spread, n = 1
    smoe = [write_run(tmp_path, f's{seed}', {1: v1, 2: v2}, seed=seed)
            for seed, v1, v2 in ((1, 1.0, 2.0), (2, 1.2, 2.0), (3, 1.4, 2.3))]
    hypermoe = write_run(tmp_path, 'h', {1: 0.9, 2: 1.9}, method='HyperMoE', seed=1, gate_name='other')
    text, records = evaluation.table_of_runs([*smoe, hypermoe])
    checkpoint, header, row1, row2, floor, seeds_line = text.splitlines()
    assert checkpoint.startswith("checkpoint: each run's checkpoint validated at the k it trained at: ")
    assert header.split() == ['k', 'SMoE', 'HyperMoE']
    assert row1.split() == ['1', '1.200', '±', '0.200', '0.900']
    assert row2.split() == ['2', '2.100', '±', '0.173', '1.900']
    assert floor == 'corpus floor (bpc): 1.040'
    assert 'SMoE 3 (1 2 3)' in seeds_line and 'HyperMoE 1 (1)' in seeds_line
    smoe_record = records[0]
    assert smoe_record['n'] == 3 and smoe_record['seeds'] == [1, 2, 3] and smoe_record['runs'] == smoe
    assert smoe_record['results']['1']['mean'] == pytest.approx(1.2)
    assert smoe_record['results']['1']['std'] == pytest.approx(0.2)
    assert smoe_record['results']['2']['std'] == pytest.approx(math.sqrt(0.03))
    assert records[1]['results']['1'] == {'mean': 0.9, 'std': None, 'n': 1, 'values': [0.9]}


def test_a_single_run_prints_as_before(tmp_path, capsys):
    run = write_run(tmp_path, 'one', {1: 1.0804, 2: 1.0791})
    eval_script.main(['--table', run])
    assert capsys.readouterr().out == (RULE + f'SMoE from {BEST_DENSE}\n'   # a fixed-k run without model_best.pt
                                       '   k          SMoE\n'
                                       '   1         1.080\n'
                                       '   2         1.079\n'
                                       'corpus floor (bpc): 1.040\n')


def with_best_entry(run_dir, results):
    """Add to a write_run directory a `best` entry (validated at the training k) with these results."""
    path = os.path.join(run_dir, 'results.json')
    with open(path) as f:
        [dense] = json.load(f)
    with open(path, 'w') as f:
        json.dump([dict(dense, checkpoint='best', results={str(k): v for k, v in results.items()}), dense], f)
    return run_dir


BEST = 'model_best.pt (best validation at --moe-top-k, a dense run\'s only one)'
BEST_DENSE = 'model_best_dense.pt (best validation with all experts)'
RULE = "checkpoint: each run's checkpoint validated at the k it trained at: "


def fixed_and_dynamic_runs(tmp_path):
    """SMoE trained at k = 1: best 1.0, best_dense 2.0; HyperRouter with a dynamic k: best 4.0, best_dense 3.0."""
    fixed = with_best_entry(write_run(tmp_path, 'fixed', {1: 2.0}, moe=True, dynamic_moe=False, moe_top_k=1),
                            {1: 1.0})
    dynamic = with_best_entry(write_run(tmp_path, 'dyn', {1: 3.0}, method='HyperRouter', gate_name='HyperRouterGate',
                                        moe=True, dynamic_moe=True), {1: 4.0})
    return fixed, dynamic


@pytest.mark.parametrize('kind,expected,header', [
    (None, ['1', '1.000*', '3.000'], RULE + f'SMoE from {BEST}; HyperRouter from {BEST_DENSE}'),
    ('training_k', ['1', '1.000*', '3.000'], RULE + f'SMoE from {BEST}; HyperRouter from {BEST_DENSE}'),
    ('best_dense', ['1', '2.000', '3.000'], "checkpoint: every run's model_best_dense.pt (--table_checkpoint "
                                            f'best_dense): SMoE, HyperRouter from {BEST_DENSE}'),
    ('best', ['1', '1.000', '4.000'], f"checkpoint: every run's model_best.pt (--table_checkpoint best): SMoE, "
                                      f'HyperRouter from {BEST}')])
def test_the_table_shows_each_run_from_the_checkpoint_of_the_rule_and_says_which_above_it(kind, expected, header,
                                                                                           tmp_path, capsys):
    fixed, dynamic = fixed_and_dynamic_runs(tmp_path)
    eval_script.main([*(['--table_checkpoint', kind] if kind else []), '--table', fixed, dynamic])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == header
    assert lines[1].split() == ['k', 'SMoE', 'HyperRouter'] and lines[2].split() == expected
    if kind in (None, 'training_k'):
        assert lines[-1] == '* the k a fixed-k run was trained at'
    else:
        assert '*' not in ''.join(lines)


def test_compare_scores_a_fixed_k_run_at_its_training_k_checkpoint_and_says_so(tmp_path, capsys):
    sides = []
    for name, method, fixed_k in (('smoe', 'SMoE', True), ('hyper', 'HyperRouter', False)):
        runs = []
        for seed in (1, 2):
            run = write_run(tmp_path, f'{name}{seed}', {1: 9.0}, method=method, seed=seed, moe=True,
                            dynamic_moe=not fixed_k, moe_top_k=1, gate_name=name)
            runs.append(with_best_entry(run, {1: 1.0 + seed / 10}) if fixed_k else run)
        sides.append(runs)
    eval_script.main(['--compare', *sides[0], '--', *sides[1]])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == RULE + f'SMoE from {BEST}; HyperRouter from {BEST_DENSE}'
    [row] = [line.split() for line in out.splitlines() if line.split()[:1] == ['1']]
    assert row[5] == '-7.8500'              # SMoE's model_best.pt (1.1, 1.2) against HyperRouter's 9.0


def test_table_over_a_glob_names_and_skips_a_directory_that_never_trained(tmp_path, capsys):
    run = write_run(tmp_path, 'run', {1: 1.0})
    never = tmp_path / 'never'
    (never / 'src').mkdir(parents=True)
    (never / 'lock').write_text('')
    eval_script.main(['--table', run, str(never)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ['k', 'SMoE'] and lines[2].split() == ['1', '1.000']
    assert lines[-1] == f'skipped {never}: it never trained (no config.json; train.py stopped before its first step)'


def test_the_table_says_when_a_seed_is_repeated(tmp_path):
    runs = [write_run(tmp_path, name, {1: 1.0}, seed=1) for name in ('a', 'b')]
    text, _ = evaluation.table_of_runs(runs)
    assert text.splitlines()[-1].startswith('note: SMoE has several runs of seed 1')


def test_table_json_writes_the_records(tmp_path, capsys):
    runs = [write_run(tmp_path, f's{seed}', {1: v}, seed=seed) for seed, v in ((1, 1.0), (2, 2.0))]
    out = str(tmp_path / 'table.json')
    eval_script.main(['--table', *runs, '--json', out])
    with open(out) as f:
        [record] = json.load(f)
    # values 1 and 2: mean 1.5, sample std sqrt(0.5) = 0.7071
    assert record['results']['1']['values'] == [1.0, 2.0]
    assert record['results']['1']['std'] == pytest.approx(math.sqrt(0.5))
    assert '1.500 ± 0.707' in capsys.readouterr().out


def test_real_runs_of_two_seeds_are_grouped_and_record_their_seed(tmp_path):
    work = str(tmp_path / 'smoe')
    for seed in ('5', '6'):
        train.main(['--dataset', 'synthetic', '--data', str(tmp_path / 'synthetic'), '--work_dir', work,
                    '--n_layer', '1', '--d_model', '16', '--n_head', '2', '--d_head', '8', '--d_inner', '16',
                    '--tgt_len', '8', '--mem_len', '8', '--eval_tgt_len', '8', '--batch_size', '2',
                    '--max_eval_steps', '2', '--moe', '--moe-num-expert', '4', '--moe-top-k', '2', '--max_step', '2',
                    '--eval-interval', '2', '--eval_ks', '1,2', '--seed', seed])
    run_dirs = sorted(glob.glob(f'{work}-synthetic/*'))
    for run_dir, seed in zip(run_dirs, (5, 6)):
        with open(os.path.join(run_dir, 'results.json')) as f:
            assert {e['seed'] for e in json.load(f)} == {seed}
        assert seeds.read_config(run_dir)['args']['seed'] == seed
    [(label, runs)] = evaluation.read_runs(run_dirs)
    assert label == 'SMoE' and [seed for seed, _, _ in runs] == [5, 6]


# ----------------------------------------------------------------------------- Student t and the paired test

@pytest.mark.parametrize('t, df, p', [(2.776, 4, 0.05), (12.706, 1, 0.05), (4.303, 2, 0.05), (2.228, 10, 0.05),
                                      (3.169, 10, 0.01), (1.96, 10 ** 6, 0.05), (2.576, 10 ** 6, 0.01)])
def test_two_sided_p_matches_the_printed_t_table(t, df, p):
    assert seeds.t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)


@pytest.mark.parametrize('t', [0.0, 0.3, 1.0, 2.5, 7.0, 40.0])
def test_two_sided_p_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert seeds.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10, abs=1e-14)  # Cauchy
    assert seeds.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10, abs=1e-14)
    assert seeds.t_two_sided_p(-t, 2) == seeds.t_two_sided_p(t, 2)


def test_paired_t_test_on_hand_computed_differences():
    # a - b = 1, 2, 3: mean 2, sample std 1, t = 2 / (1 / sqrt 3) = 2 sqrt 3, df 2 -> p = 1 - t / sqrt(2 + t^2)
    test = seeds.paired_t_test([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    t = 2 * math.sqrt(3)
    assert (test['n'], test['df']) == (3, 2)
    assert test['mean'] == pytest.approx(2) and test['std'] == pytest.approx(1) and test['t'] == pytest.approx(t)
    assert test['p'] == pytest.approx(1 - t / math.sqrt(14))          # 0.0742


def test_paired_test_matches_seeds_and_tells_a_real_difference_from_noise():
    a = {1: {'1': 1.00}, 2: {'1': 1.10}, 3: {'1': 0.95}, 4: {'1': 1.05}, 9: {'1': 5.0}}
    shifted = {1: {'1': 0.90}, 2: {'1': 1.01}, 3: {'1': 0.84}, 4: {'1': 0.95}, 7: {'1': 0.0}}   # a - 0.1 +- 0.01
    noisy = {1: {'1': 1.05}, 2: {'1': 1.05}, 3: {'1': 1.00}, 4: {'1': 1.00}}                    # a -+ 0.05
    matched, [row] = seeds.compare_by_seed(a, shifted)
    assert matched == [1, 2, 3, 4]                                    # seeds 7 and 9 have no partner
    # differences 0.10, 0.09, 0.11, 0.10: mean 0.1, std sqrt(0.0002 / 3) = 0.008165, t = 24.49, df 3 -> p = 1.5e-4
    assert row['mean'] == pytest.approx(0.1) and row['t'] == pytest.approx(24.495, abs=1e-3)
    assert row['p'] < 1e-3 and row['beyond_spread']
    _, [row] = seeds.compare_by_seed(a, noisy)
    # differences -0.05, 0.05, -0.05, 0.05: mean 0, t 0 -> p 1
    assert row['mean'] == pytest.approx(0, abs=1e-12) and row['p'] == pytest.approx(1) and not row['beyond_spread']


def test_compare_prints_the_paired_test_and_refuses_fewer_than_two_matched_seeds(tmp_path, capsys):
    a = [write_run(tmp_path, f'a{s}', {1: v}, seed=s) for s, v in ((1, 1.00), (2, 1.10), (3, 0.95))]
    b = [write_run(tmp_path, f'b{s}', {1: v}, seed=s, method='HyperMoE', gate_name='x')
         for s, v in ((1, 0.90), (2, 1.01), (3, 0.84))]
    eval_script.main(['--compare', *a, '--', *b])
    out = capsys.readouterr().out
    assert 'A = SMoE, B = HyperMoE' in out and '3 matched seeds (1, 2, 3)' in out and 'paired t-test' in out
    [row] = [line.split() for line in out.splitlines() if line.split()[:1] == ['1']]
    # differences 0.10, 0.09, 0.11: mean 0.1, std 0.01, t = 0.1 / (0.01 / sqrt 3) = 17.32, df 2
    assert row[5] == '+0.1000' and row[7] == '17.32' and row[-1] == 'yes'
    with pytest.raises(SystemExit) as exit_info:
        eval_script.main(['--compare', a[0], '--', *b])
    assert str(exit_info.value).startswith('error: --compare needs at least 2 seeds present on both sides')
    with pytest.raises(SystemExit) as exit_info:
        eval_script.main(['--compare', *a, '--', b[0], a[1]])
    assert 'must differ only in their seed' in str(exit_info.value)


# ----------------------------------------------------------------------------- figures

@pytest.fixture
def drawn(monkeypatch):
    """The figures drawn (instead of written to files)."""
    figs = []
    monkeypatch.setattr(figures, 'save', lambda fig, out: figs.append(fig))
    return figs


def test_figure_1_draws_the_mean_with_error_bars_of_one_std(tmp_path, drawn):
    # k=1: 1.0, 1.2, 1.4 -> 1.2 ± 0.2; k=2: 2.0, 2.0, 2.3 -> 2.1 ± 0.1732; the single run is a plain line
    smoe = [write_run(tmp_path, f's{seed}', {1: v1, 2: v2}, seed=seed)
            for seed, v1, v2 in ((1, 1.0, 2.0), (2, 1.2, 2.0), (3, 1.4, 2.3))]
    single = write_run(tmp_path, 'h', {1: 0.9, 2: 1.9}, method='HyperMoE', gate_name='other')
    eval_script.main(['--plot', *smoe, single, '--out', str(tmp_path / 'f.png')])
    [ax] = drawn[0].axes
    [bars] = ax.containers
    data_line, _, (segments,) = bars
    assert list(data_line.get_xdata()) == [1, 2]
    assert list(data_line.get_ydata()) == pytest.approx([1.2, 2.1])
    spans = [(seg[0][1], seg[1][1]) for seg in segments.get_segments()]
    assert spans == [pytest.approx((1.0, 1.4)), pytest.approx((2.1 - math.sqrt(0.03), 2.1 + math.sqrt(0.03)))]
    plain = [line for line in ax.get_lines() if line.get_label() == 'HyperMoE']
    assert len(plain) == 1 and list(plain[0].get_ydata()) == [0.9, 1.9]


def test_entropy_bars_over_seeds_have_one_std_error_bars(drawn):
    # router 1: 2.0, 2.2 -> 2.1 ± 0.1414; router 2: 1.0, 1.0 -> 1.0 ± 0; the single-seed method has no error bar
    values = {'HyperRouter': {0: [2.0, 2.2], 1: [1.0, 1.0]}, 'SMoE': {0: [1.5], 1: [1.6]}}
    figures.plot_entropy(values, 'unused.png')
    [ax] = drawn[0].axes
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == pytest.approx([2.1, 1.0, 1.5, 1.6])
    [with_bars] = [c for c in ax.containers if getattr(c, 'errorbar', None) is not None]
    spans = [(seg[0][1], seg[1][1]) for seg in with_bars.errorbar[2][0].get_segments()]
    assert spans == [pytest.approx((2.1 - math.sqrt(0.02), 2.1 + math.sqrt(0.02))), pytest.approx((1.0, 1.0))]
    table = analysis.format_entropy_over_seeds(values).splitlines()
    assert table[1].split() == ['HyperRouter', '(n=2)', '2.1000', '±', '0.1414', '1.0000', '±', '0.0000']
    assert table[2].split() == ['SMoE', '(n=1)', '1.5000', '1.6000']


def test_load_over_seeds_is_averaged_after_sorting_the_experts():
    # seed 1 loads experts 0, 1 most; seed 2 experts 1, 3: unsorted means would be 37.5 / 37.5 / 12.5 / 12.5 %
    profiles = {0: [sorted([0.5, 0.25, 0.25, 0.0], reverse=True), sorted([0.25, 0.5, 0.0, 0.25], reverse=True)]}
    _, header, row = analysis.format_load_profile('SMoE', profiles, {0: [0.1, 0.2]}).splitlines()
    # max/mean = 0.5 * 4; dropped over capacity 10 % and 20 %: 15 ± 7.1 (sample std sqrt(50))
    assert row.split() == ['1', '50.0', '25.0', '25.0', '0.0', '2.00', '±', '0.00', '15.0', '±', '7.1']


def test_load_of_a_single_run_beside_runs_of_several_seeds_prints_its_plain_numbers():
    # eval.py --load RUN SEED_RUNS ...: the single run's profile has one value per cell, no std
    _, _, row = analysis.format_load_profile('HyperRouter', {0: [[0.5, 0.25, 0.25, 0.0]]}, {0: [0.1]}).splitlines()
    assert row.split() == ['1', '50.0', '25.0', '25.0', '0.0', '2.00', '10.0']


# ----------------------------------------------------------------------------- SEEDS in the scripts

FAKE_PYTHON = '''import json, os, sys
argv = sys.argv[1:]
if argv[0] == '-c':                                   # launch.sh asks whether there is a GPU: no
    sys.exit(1)
if argv[0] == 'eval.py':                              # the demo's table: the real eval.py
    sys.path.insert(0, os.getcwd())
    import eval
    eval.main(argv[1:])
    sys.exit(0)
with open(os.environ['STUB_LOG'], 'a') as f:          # a training run: record its flags, write a finished run
    f.write(' '.join(argv[1:]) + '\\n')
flags = {}
for i, a in enumerate(argv):
    if a.startswith('--'):
        flags[a[2:]] = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith('--') else True
seed = flags['seed'] = int(flags.get('seed', 1111))   # the demo passes none without SEEDS: train.py's default
run_dir = os.path.join(flags['work_dir'] + '-synthetic', f'run{seed}')
os.makedirs(run_dir)
method = os.path.basename(flags['work_dir'])
with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    json.dump({'args': flags, 'model_config': {}}, f)
with open(os.path.join(run_dir, 'results.json'), 'w') as f:
    json.dump([{'dataset': 'synthetic', 'metric': 'bpc', 'split': 'test', 'method': method, 'seed': seed,
                'checkpoint': 'best_dense', 'results': {'1': seed / 1000}}], f)
'''


@pytest.fixture
def fake_python(tmp_path):
    """(environment, log path): PYTHON is a stand-in for python that records each training run's flags."""
    script = tmp_path / 'fake_python.py'
    script.write_text(FAKE_PYTHON)
    wrapper = tmp_path / 'python'
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / 'argv.log'
    env = dict(os.environ, PYTHON=str(wrapper), STUB_LOG=str(log), DEVICE='cpu')   # a 400k-step script on the CPU
    env.pop('SEEDS', None)
    return env, log


def run_script(args, env, **extra_env):
    return subprocess.run(['bash', *args], cwd=REPO, env=dict(env, **extra_env), capture_output=True, text=True,
                          timeout=120)


def test_seeds_runs_the_script_once_per_seed_and_the_seed_wins(fake_python, tmp_path):
    env, log = fake_python
    work = str(tmp_path / 'w')
    result = run_script(['script/table1/smoe_enwik8.sh', '--work_dir', work, '--lr', '0.1'], env, SEEDS='5  6')
    assert result.returncode == 0, result.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    for line, seed in zip(lines, ('5', '6')):
        flags = line.split()
        assert flags[-4:] == ['--lr', '0.1', '--seed', seed]       # extra flags after the script's, the seed last
        assert flags.count('--seed') == 2 and '--seed 1111' in line  # the script's own, overridden (last wins)
    assert sorted(os.listdir(work + '-synthetic')) == ['run5', 'run6']


def test_without_seeds_the_script_runs_once_and_extra_flags_still_win(fake_python, tmp_path):
    env, log = fake_python
    result = run_script(['script/table1/smoe_enwik8.sh', '--seed', '7', '--work_dir', str(tmp_path / 'w')], env)
    assert result.returncode == 0, result.stderr
    [line] = log.read_text().splitlines()
    assert line.split()[-4:] == ['--seed', '7', '--work_dir', str(tmp_path / 'w')]


def test_a_bad_seed_is_one_clear_error(fake_python):
    env, log = fake_python
    result = run_script(['script/table1/smoe_enwik8.sh'], env, SEEDS='1111 x')
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: SEEDS must be non-negative integers")
    assert not log.exists()


def test_the_demo_trains_every_method_for_every_seed_and_prints_the_grouped_table(fake_python, tmp_path):
    env, log = fake_python
    result = run_script(['script/demo.sh'], env, SEEDS='1 2 3', WORK=str(tmp_path / 'demo'))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(log.read_text().splitlines()) == 15                   # 5 methods x 3 seeds
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.strip().startswith('k '))
    assert header.split() == ['k', 'hyper_router', 'smoe_dropout', 'smoe', 'thor', 'hypermoe']
    [row] = [line for line in lines if line.split()[:1] == ['1']]
    # every method's results are seed / 1000: 0.001, 0.002, 0.003 -> mean 0.002, std 0.001
    assert row.split()[1:] == ['0.002', '±', '0.001'] * 5
    assert 'over n = 3 seeds (1 2 3) in every column' in result.stdout
    assert 'wall time:' in result.stdout


def test_the_demo_without_seeds_trains_each_method_once_and_prints_plain_numbers(fake_python, tmp_path):
    env, log = fake_python
    result = run_script(['script/demo.sh'], env, WORK=str(tmp_path / 'demo'))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(log.read_text().splitlines()) == 5
    [row] = [line for line in result.stdout.splitlines() if line.split()[:1] == ['1']]
    assert row.split()[1:] == ['1.111'] * 5                          # seed 1111 / 1000, no spread
    assert '±' not in result.stdout and 'sample std' not in result.stdout


def test_the_tables_printed_in_the_docs_name_their_checkpoint_as_eval_py_does():
    """Every table copied into README.md and docs/ carries the line eval.py prints above it: the rule, then which
    column comes from which kept checkpoint."""
    lines = []
    for path in [os.path.join(REPO, 'README.md'), *glob.glob(os.path.join(REPO, 'docs', '*.md'))]:
        with open(path) as f:
            text = f.read()
        for block in re.split(r'^```.*$', text, flags=re.M)[1::2]:           # the fenced blocks
            if re.search(r'^ +k  +[A-Z]', block, re.M):                           # a table of runs
                first = block.strip('\n').splitlines()[1 if block.lstrip('\n').startswith('Test ') else 0]
                lines.append((path, first))
    assert len(lines) >= 3
    rules = tuple(f'checkpoint: {words}: ' for words in evaluation.RULE_WORDS.values())
    for path, line in lines:
        assert line.startswith(rules), (path, line)
        for group in line.split(': ', 2)[2].split('; '):
            assert group.split(' from ', 1)[1] in evaluation.CHECKPOINT_WORDS.values(), (path, group)
