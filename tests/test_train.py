"""The training pipeline end to end on the built-in corpus, with a tiny model."""
import glob
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import eval as eval_script
import evaluation
import router_registry
import train
from hyper_router import top_k_schedule
from moe import ROUTERS
from run_records import resume_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ['--n_layer', '2', '--d_model', '16', '--n_head', '2', '--d_head', '8', '--d_inner', '16',
             '--tgt_len', '16', '--mem_len', '16', '--eval_tgt_len', '8', '--batch_size', '4',
             '--max_eval_steps', '3']
MOE_ARGS = ['--moe', '--moe-num-expert', '4', '--moe-top-k', '2']



def run_train(tmp_path, synthetic_dir, *extra):
    """train.main in this process; returns the run directory."""
    work = str(tmp_path / 'runs')
    train.main(['--dataset', 'synthetic', '--data', synthetic_dir, '--work_dir', work, *TINY_ARGS, *extra])
    return sorted(glob.glob(f'{work}-synthetic/*'))[-1]


def read_metrics(run_dir, split='train'):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['split'] == split]


def test_a_run_writes_config_logs_events_checkpoints_and_results(tmp_path, synthetic_dir):
    run_dir = run_train(tmp_path, synthetic_dir, *MOE_ARGS, '--gate_name', 'HyperRouterGate', '--max_step', '6',
                        '--eval-interval', '3', '--log-interval', '2')
    files = set(os.listdir(run_dir))
    assert {'config.json', 'train.log', 'metrics.jsonl', 'checkpoint_last.pt', 'model_best.pt',
            'model_best_dense.pt', 'results.json', 'src'} <= files
    assert any(f.startswith('events.out.tfevents') for f in files)
    with open(os.path.join(run_dir, 'config.json')) as f:
        config = json.load(f)
    assert config['model_config']['router']['name'] == 'hyper_router' and 'git_commit' in config
    assert config['git_modified'] in (True, False)
    with open(os.path.join(run_dir, 'results.json')) as f:
        results = json.load(f)
    assert [r['checkpoint'] for r in results] == ['best', 'best_dense']
    for entry in results:
        assert entry['dataset'] == 'synthetic' and entry['metric'] == 'bpc' and entry['split'] == 'test'
        assert entry['gate'] == 'hyper_router' and entry['method'] == 'HyperRouter'   # alias -> name
        assert set(entry['results']) == {'1', '2', '4'} and 0 < entry['bpc_floor'] < 2
        assert all(math.isfinite(v) for v in entry['results'].values())
    assert [r['step'] for r in read_metrics(run_dir)] == [2, 4, 6]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(run_dir).Reload()
    scalars = set(events.Tags()['scalars'])
    assert {'train/loss', 'train/bpc', 'train/lr', 'train/top_k', 'train/tokens_per_s', 'valid/all_experts/bpc',
            'valid/all_experts/loss', 'valid/k2/bpc', 'valid/k2/loss', 'router/entropy/layer0',
            'router/entropy/layer1'} <= scalars
    assert 'router/load/layer0' in events.Tags()['histograms']
    for tag in ('valid/all_experts/bpc', 'valid/k2/bpc'):
        assert [e.step for e in events.Scalars(tag)] == [3, 6]                  # one curve per tag

    out = str(tmp_path / 'eval.json')
    eval_script.main(['--run', run_dir, '--max_eval_steps', '3', '--json', out])
    with open(out) as f:
        assert [e['results'] for e in json.load(f)] == [e['results'] for e in results]


# every router with its method's k (a dynamic k for the methods trained so, else MOE_ARGS's fixed k = 2), and
# one run with capacity and auxiliary losses on
DYNAMIC_K_ROUTERS = tuple(spec.name for spec in router_registry.specs() if spec.dynamic_k)
DYNAMIC_K = ['--dynamic_moe', '--moe-top-k-min', '1', '--moe-top-k-max', '4']
RESUMED_CONFIGS = {
    **{name: ['--gate_name', name, *(DYNAMIC_K if name in DYNAMIC_K_ROUTERS else [])] for name in ROUTERS},
    'capacity_and_aux_losses': ['--gate_name', 'smoe', '--capacity_factor', '0.75', '--eval_capacity_factor', '1.0',
                                '--balance_loss', '0.01', '--importance_loss', '0.01', '--z_loss', '0.001'],
}


@pytest.mark.parametrize('config', RESUMED_CONFIGS)
def test_resuming_gives_the_same_run_as_never_stopping(config, tmp_path, synthetic_dir):
    common = [*MOE_ARGS, *RESUMED_CONFIGS[config], '--max_step', '8', '--eval-interval', '3', '--log-interval', '1',
              '--batch_chunk', '2']
    whole = run_train(tmp_path / 'a', synthetic_dir, *common)
    split = run_train(tmp_path / 'b', synthetic_dir, *common, '--stop_step', '4')
    assert not os.path.exists(os.path.join(split, 'results.json'))
    assert torch.load(os.path.join(split, 'checkpoint_last.pt'), weights_only=True)['step'] == 4
    train.main(['--dataset', 'synthetic', '--data', synthetic_dir, *TINY_ARGS, *common,
                '--restart', '--restart_dir', split])
    drop_speed = lambda rows: [{k: v for k, v in r.items() if k != 'tokens_per_s'} for r in rows]  # noqa: E731
    assert drop_speed(read_metrics(split)) == drop_speed(read_metrics(whole))
    for other in ('valid', 'aux', 'router'):              # the auxiliary losses and the dropped fractions too
        assert read_metrics(split, other) == read_metrics(whole, other)
    if config == 'capacity_and_aux_losses':
        assert len(read_metrics(whole, 'aux')) == len(read_metrics(whole, 'router')) == 8
    final = [torch.load(os.path.join(d, 'checkpoint_last.pt'), weights_only=True)['model'] for d in (whole, split)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_dynamic_top_k_and_learning_rate_follow_their_schedules(tmp_path, synthetic_dir):
    run_dir = run_train(tmp_path, synthetic_dir, *MOE_ARGS, '--gate_name', 'CustomNaiveGate', '--freeze_gate',
                        '--dynamic_moe', '--moe-top-k-min', '1', '--moe-top-k-max', '4', '--max_step', '6',
                        '--eval-interval', '6', '--log-interval', '1', '--lr', '0.01')
    rows = read_metrics(run_dir)
    assert [r['top_k'] for r in rows] == [top_k_schedule(s, 'linear_increase', 1, 4, 6) for s in range(6)]
    assert [r['top_k'] for r in rows] == [1, 1, 2, 3, 3, 3]          # round half to even
    assert [round(r['lr'], 12) for r in rows] == [round(0.005 * (1 + math.cos(math.pi * s / 6)), 12) for s in range(6)]
    with open(os.path.join(run_dir, 'config.json')) as f:
        assert json.load(f)['model_config']['router']['name'] == 'smoe_dropout'       # --freeze_gate


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, synthetic_dir, monkeypatch):
    original = train.Trainer.train_step

    def poisoned(self, data, target):
        if self.step == 4:
            with torch.no_grad():
                self.model.word_emb.emb_layers[0].weight.fill_(float('nan'))
        return original(self, data, target)

    monkeypatch.setattr(train.Trainer, 'train_step', poisoned)
    with pytest.raises(SystemExit) as stop:
        run_train(tmp_path, synthetic_dir, *MOE_ARGS, '--max_step', '10', '--eval-interval', '3')
    assert stop.value.code == 1
    run_dir = sorted(glob.glob(str(tmp_path / 'runs-synthetic' / '*')))[-1]
    with open(os.path.join(run_dir, 'train.log')) as f:
        assert 'non-finite training loss (nan) at step 5' in f.read()
    ckpt = torch.load(os.path.join(run_dir, 'checkpoint_last.pt'), weights_only=True)
    assert ckpt['step'] == 3 and all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())


def python_env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)


def test_sigterm_writes_a_resumable_checkpoint(tmp_path, synthetic_dir):
    work = str(tmp_path / 'runs')
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), '--dataset', 'synthetic', '--data', synthetic_dir,
           '--work_dir', work, *TINY_ARGS, *MOE_ARGS, '--max_step', '100000', '--log-interval', '1']
    proc = subprocess.Popen(cmd, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        runs = glob.glob(f'{work}-synthetic/*/metrics.jsonl')
        if runs and len(read_metrics(os.path.dirname(runs[0]))) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, output         # 143: stopped, not finished
    run_dir = os.path.dirname(runs[0])
    assert 'resume with' in output
    ckpt = torch.load(os.path.join(run_dir, 'checkpoint_last.pt'), weights_only=True)
    assert ckpt['step'] == read_metrics(run_dir)[-1]['step'] >= 3
    assert ckpt['train_state']['mems'] is not None and 'optimizer' in ckpt


def test_two_processes_with_gloo_match_one_process_on_the_same_global_batch(tmp_path, synthetic_dir):
    args = ['--dataset', 'synthetic', '--data', synthetic_dir, *TINY_ARGS, *MOE_ARGS, '--dropout', '0',
            '--max_step', '4', '--eval-interval', '4', '--log-interval', '1']
    one = str(tmp_path / 'runs1')
    train.main([*args, '--work_dir', one])                         # one process: this one
    work = str(tmp_path / 'runs2')
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
    result = subprocess.run([*launcher, os.path.join(REPO, 'train.py'), *args, '--work_dir', work],
                            env=python_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    losses = {n_proc: [r['loss'] for r in read_metrics(glob.glob(f'{path}-synthetic/*')[0])]
              for n_proc, path in ((1, one), (2, work))}
    assert len(losses[1]) == 4
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize('extra,message', [
    (['--moe', '--moe-num-expert', '4', '--moe-top-k', '5'], '--moe-top-k 5 must be between 1 and --moe-num-expert 4'),
    (['--moe', '--gate_name', 'MagicGate'], "invalid choice: 'MagicGate'"),
    (['--dataset', 'ptb'], "invalid choice: 'ptb'"),
    (['--moe', '--dynamic_moe', '--moe-top-k-min', '9', '--moe-top-k-max', '8'], '--moe-top-k-min (9)'),
    (['--batch_size', '5', '--batch_chunk', '2'], 'must be divisible by --batch_chunk 2'),
    (['--eval_ks', '1,2,x'], '--eval_ks needs positive integers'),
    (['--moe', '--moe-num-expert', '4', '--eval_ks', '8,16'], 'no k is at most --moe-num-expert 4'),
    (['--batch_chunk', '0'], '--batch_chunk must be at least 1'),
    (['--d_model', '0'], '--d_model must be at least 1'),
    (['--mem_len', '-1'], '--mem_len must be at least 0'),
    (['--same_length', '--mem_len', '0'], '--same_length gives every query the same number of keys'),
])
def test_bad_flags_are_clear_errors(extra, message, capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(extra)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_moe_index_outside_the_model_is_an_error_line_before_any_run_directory(tmp_path, synthetic_dir, capsys):
    work = str(tmp_path / 'runs')
    with pytest.raises(SystemExit) as stop:      # a table script's --moe_index 0,1,2,3 with --n_layer 2 (TINY_ARGS)
        train.main(['--dataset', 'synthetic', '--data', synthetic_dir, '--work_dir', work, *TINY_ARGS, *MOE_ARGS,
                    '--moe_index', '0,1,2,3'])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].split(': ', 1)[1] == (      # after the program's name
        'error: --moe_index 0,1,2,3: layer(s) 2,3 outside the 2 layers (0..1) of --n_layer 2; give '
        '--moe_index with layers below 2 (e.g. --moe_index 0,1) after --n_layer')
    assert not os.path.exists(f'{work}-synthetic')
    with pytest.raises(SystemExit):
        train.parse_args([*MOE_ARGS, '--moe_index', 'all'])
    assert 'needs comma-separated layer numbers' in capsys.readouterr().err


def test_a_k_schedule_spans_the_run_and_one_longer_than_the_run_is_refused(capsys):
    dynamic = [*MOE_ARGS, '--moe-num-expert', '16', '--dynamic_moe', '--moe-top-k-min', '8', '--moe-top-k-max', '16']
    args = train.parse_args([*dynamic, '--max_step', '400000', '--max_step', '20'])
    assert args.dynamic_overall_steps == 20
    assert [train.current_top_k(s, args) for s in (0, 19)] == [8, 16]       # 8 + round(8 * 19 / 20) = 16
    with pytest.raises(SystemExit) as stop:
        train.parse_args([*dynamic, '--dynamic_overall_steps', '400000', '--max_step', '20'])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert '--dynamic_overall_steps 400000 is longer than the run (--max_step 20)' in err and 'drop' in err
    assert train.parse_args([*dynamic, '--dynamic_overall_steps', '10', '--max_step', '20']).dynamic_overall_steps == 10


def test_the_resume_hint_is_a_command_line_that_resumes_the_run(tmp_path, synthetic_dir, capsys):
    run_dir = run_train(tmp_path, synthetic_dir, *MOE_ARGS, '--max_step', '4', '--eval-interval', '2',
                        '--stop_step', '2')
    lines = capsys.readouterr().out.splitlines()
    hint = lines[lines.index(next(line for line in lines if line.endswith('resume with:'))) + 1]
    words = shlex.split(hint)
    assert words[:2] == ['python', 'train.py'] and words[-3:] == ['--restart', '--restart_dir', run_dir]
    train.main(words[2:])
    assert os.path.isfile(os.path.join(run_dir, 'results.json'))
    assert resume_command('python train.py --lr 1 --restart --restart_dir=old --restart-dir old --seed 2', 'a b') == \
        "python train.py --lr 1 --seed 2 --restart --restart_dir 'a b'"        # a resumed run's own flags replaced


def test_config_json_says_whether_the_sources_differ_from_the_commit(tmp_path):
    """git_tree_modified of a copy of run_utils.py in a git repository of its own, clean and then edited."""
    repo = tmp_path / 'repo'
    repo.mkdir()
    shutil.copy(os.path.join(REPO, 'run_utils.py'), repo)
    git = ['git', '-c', 'user.name=t', '-c', 'user.email=t@t', '-C', str(repo)]
    for command in (['init', '-q'], ['add', '.'], ['commit', '-q', '-m', 'x']):
        subprocess.run([*git, *command], check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location('run_utils_copy', repo / 'run_utils.py')
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.git_tree_modified() is False
    (repo / 'run_utils.py').write_text((repo / 'run_utils.py').read_text() + '# edited\n')
    assert copy.git_tree_modified() is True


def test_a_missing_data_folder_names_get_data_sh_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), '--dataset', 'enwik8', '--data',
                             str(tmp_path / 'nowhere'), '--work_dir', str(tmp_path / 'runs')],
                            env=python_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert 'script/get_data.sh' in result.stderr and str(tmp_path / 'nowhere') in result.stderr
    assert 'Traceback' not in result.stderr


def test_original_flag_spellings_and_underscore_aliases_are_the_same_flag():
    dashed = train.parse_args(['--moe-num-expert', '8', '--moe-top-k', '3', '--eval-interval', '7'])
    underscored = train.parse_args(['--moe_num_expert', '8', '--moe_top_k', '3', '--eval_interval', '7'])
    assert vars(dashed) == vars(underscored)
    assert (dashed.moe_num_expert, dashed.moe_top_k, dashed.eval_interval) == (8, 3, 7)


def test_learning_rate_warms_up_then_follows_the_cosine():
    args = train.parse_args(['--lr', '1.0', '--warmup_step', '4', '--max_step', '100'])
    assert [train.learning_rate(s, args) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert train.learning_rate(50, args) == pytest.approx(0.5)
    assert train.learning_rate(100, args) == pytest.approx(0.0)


@pytest.mark.parametrize('mode,expected', [
    ('linear_increase', [8, 10, 12, 14, 16, 16]),
    ('linear_decrease', [16, 14, 12, 10, 8, 8]),
    ('cosine_increase', [8, 9, 10, 13, 16, 16]),
    ('cosine_decrease', [16, 15, 14, 11, 8, 8]),
    ('multi_step_increase', [8, 8, 8, 8, 16, 16]),
])
def test_top_k_schedule_modes(mode, expected):
    assert [top_k_schedule(s, mode, 8, 16, 400) for s in (0, 100, 200, 300, 400, 800)] == expected


def test_a_checkpoint_from_a_fastmoe_gpu_run_evaluates_on_this_cpu(tmp_path, synthetic_dir):
    run_dir = run_train(tmp_path, synthetic_dir, *MOE_ARGS, '--max_step', '2')
    ckpt = evaluation.load_checkpoint(os.path.join(run_dir, 'model_best.pt'))
    ckpt['model_config']['moe_backend'] = 'fastmoe'           # as written by a run on a GPU with fastmoe
    model = evaluation.model_from_checkpoint(ckpt, 'cpu')
    data = torch.zeros(4, 2, dtype=torch.long)
    assert torch.isfinite(model(data, data)[0]).all()
