"""Failures are one `error: ...` line, resumes cannot silently change a run, long runs survive shared machines.

Runs use a tiny model on a tiny hand-made corpus in the enwik8 format (ten symbols, a few thousand tokens),
so each test takes seconds.
"""
import errno
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import eval as eval_script
import evaluation
import run_utils
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ['--dataset', 'enwik8', '--n_layer', '2', '--d_model', '16', '--n_head', '2', '--d_head', '8',
             '--d_inner', '16', '--tgt_len', '16', '--mem_len', '16', '--eval_tgt_len', '8', '--batch_size', '4',
             '--max_eval_steps', '3', '--moe', '--moe-num-expert', '4', '--moe-top-k', '2', '--log-interval', '1']


def write_corpus(folder, seed, n_train=2000, n_eval=400):
    """An enwik8-format folder (decimal byte values separated by spaces) of random bytes '0'..'9'."""
    os.makedirs(folder)
    gen = torch.Generator().manual_seed(seed)
    for split, n in (('train', n_train), ('valid', n_eval), ('test', n_eval)):
        values = torch.randint(48, 58, (n,), generator=gen).tolist()
        with open(os.path.join(folder, f'{split}.txt'), 'w') as f:
            f.write(' '.join(map(str, values)) + '\n')
    return str(folder)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp('data') / 'tiny', seed=0)


def train_args(corpus, work, *extra):
    return ['--data', corpus, '--work_dir', str(work), *TINY_ARGS, *extra]


def run_dirs(work, dataset='enwik8'):
    return sorted(glob.glob(f'{work}-{dataset}/*'))


def run_train(corpus, work, *extra):
    """train.main in this process; returns the (newest) run directory."""
    train.main(train_args(corpus, work, *extra))
    return run_dirs(work)[-1]


@pytest.fixture(scope='module')
def finished_run(corpus, tmp_path_factory):
    """A finished run: both kept checkpoints and results.json."""
    return run_train(corpus, tmp_path_factory.mktemp('finished') / 'runs', '--max_step', '4', '--eval-interval', '2')


@pytest.fixture(scope='module')
def stopped_run(corpus, tmp_path_factory):
    """A run stopped at step 2 by --stop_step, before its first validation (step 5): checkpoint_last.pt only."""
    return run_train(corpus, tmp_path_factory.mktemp('stopped') / 'runs', '--max_step', '10', '--eval-interval', '5',
                     '--stop_step', '2')


def copy_run(run_dir, tmp_path):
    return shutil.copytree(run_dir, str(tmp_path / os.path.basename(run_dir)))


def error_line(stop):
    """The message a SystemExit prints; it must be the one-line `error: ...`, with status 1."""
    message = str(stop.value.code)
    assert message.startswith('error: ') and '\n' not in message, message
    return message


def truncate(path):
    with open(path, 'rb') as f:
        head = f.read(200)
    with open(path, 'wb') as f:
        f.write(head)


def step_lines(log_path):
    with open(log_path) as f:
        return [int(m.group(1)) for m in re.finditer(r'\| epoch +\d+ step +(\d+) \|', f.read())]


# ----------------------------------------------------------------------------- eval.py: errors, not tracebacks

def test_eval_of_a_missing_run_directory_is_an_error_line(tmp_path):
    with pytest.raises(SystemExit) as stop:
        eval_script.main(['--run', str(tmp_path / 'nowhere')])
    assert 'no run directory' in error_line(stop) and str(tmp_path / 'nowhere') in error_line(stop)


def test_eval_of_a_checkpoint_file_given_as_run_says_to_give_its_directory(finished_run):
    with pytest.raises(SystemExit) as stop:
        eval_script.main(['--run', os.path.join(finished_run, 'model_best.pt')])
    assert 'is a file' in error_line(stop) and f'({finished_run})' in error_line(stop)


def test_eval_of_a_run_without_a_kept_checkpoint_is_an_error_line(stopped_run):
    with pytest.raises(SystemExit) as stop:
        eval_script.main(['--run', stopped_run])
    assert 'no kept checkpoint' in error_line(stop)


def test_table_of_a_run_without_results_is_an_error_line(stopped_run):
    with pytest.raises(SystemExit) as stop:
        eval_script.main(['--table', stopped_run])
    assert 'results.json not found' in error_line(stop)


def test_a_corrupt_checkpoint_is_named_and_the_intact_one_still_evaluated(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    truncate(os.path.join(run_dir, 'model_best.pt'))
    out = str(tmp_path / 'eval.json')
    with pytest.raises(SystemExit) as stop:
        eval_script.main(['--run', run_dir, '--max_eval_steps', '3', '--json', out])
    assert 'model_best.pt cannot be read' in error_line(stop)
    with open(out) as f:
        entries = json.load(f)
    with open(os.path.join(run_dir, 'results.json')) as f:
        at_end_of_training = {e['checkpoint']: e['results'] for e in json.load(f)}
    assert [e['checkpoint'] for e in entries] == ['best_dense']
    assert entries[0]['results'] == at_end_of_training['best_dense']


def test_a_checkpoint_that_does_not_fit_its_config_is_an_error_line(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    for name in ('model_best.pt', 'model_best_dense.pt'):
        path = os.path.join(run_dir, name)
        ckpt = torch.load(path, weights_only=True)
        ckpt['model_config']['d_inner'] = 32                  # the weights were made with d_inner 16
        torch.save(ckpt, path)
    with pytest.raises(SystemExit) as stop:
        eval_script.main(['--run', run_dir, '--max_eval_steps', '3'])
    assert 'model_best.pt do not fit the model' in error_line(stop)


def test_ks_above_the_number_of_experts_are_an_error_and_keep_the_previous_json(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    previous = os.path.join(run_dir, 'eval_test.json')
    with open(previous, 'w') as f:
        f.write('[]')
    with pytest.raises(SystemExit) as stop:
        eval_script.main(['--run', run_dir, '--ks', '8,16'])         # the run has 4 experts
    assert 'number of experts (4)' in error_line(stop)
    with open(previous) as f:
        assert f.read() == '[]'


# ----------------------------------------------------------------------------- train.py: errors at start-up

def test_a_split_too_short_for_one_segment_is_an_error_and_leaves_no_run_directory(tmp_path):
    short = write_corpus(tmp_path / 'short', seed=1, n_train=60)      # 15 rows at batch 4 < one segment of 16
    work = tmp_path / 'runs'
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(short, work, '--max_step', '2'))
    assert 'the train split' in error_line(stop) and '--tgt_len' in error_line(stop)
    assert not os.path.exists(f'{work}-enwik8') or not os.listdir(f'{work}-enwik8')


def test_restart_from_a_corrupt_checkpoint_is_an_error_line(corpus, stopped_run, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path)
    truncate(os.path.join(run_dir, 'checkpoint_last.pt'))
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(corpus, tmp_path / 'runs', '--max_step', '10', '--eval-interval', '5',
                              '--restart', '--restart_dir', run_dir))
    assert 'checkpoint_last.pt cannot be read' in error_line(stop)


def test_a_work_dir_that_cannot_be_written_is_an_error_line(corpus, tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(corpus, blocker / 'runs', '--max_step', '2'))
    assert 'cannot create a run directory' in error_line(stop) and '--work_dir' in error_line(stop)


def test_a_full_disk_is_named_removes_the_partial_file_and_keeps_the_last_checkpoint(corpus, tmp_path, monkeypatch):
    real_save = torch.save

    def full_disk_at_step_4(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get('step') == 4:
            if isinstance(f, str):
                f = open(f, 'wb')
            f.write(b'partial')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', full_disk_at_step_4)
    work = tmp_path / 'runs'
    with pytest.raises(SystemExit) as stop:
        run_train(corpus, work, '--max_step', '4', '--eval-interval', '2')
    assert 'no space left on device' in error_line(stop)
    [run_dir] = run_dirs(work)
    assert not glob.glob(os.path.join(run_dir, '*.tmp'))
    assert torch.load(os.path.join(run_dir, 'checkpoint_last.pt'), weights_only=True)['step'] == 2


FULL_DISK_IN_TENSORBOARD = """
import errno, os, sys
from tensorboard.summary.writer import record_writer
write, writes = record_writer.RecordWriter.write, []

def write_until_the_disk_is_full(self, data):      # TensorBoard's writer thread meets a full disk at its 30th record
    writes.append(1)
    if len(writes) >= 30:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write(self, data)

record_writer.RecordWriter.write = write_until_the_disk_is_full
import train
train.main(sys.argv[1:])
"""


def test_a_full_disk_met_by_tensorboards_writer_is_one_error_line(corpus, tmp_path):
    result = subprocess.run([sys.executable, '-c', FULL_DISK_IN_TENSORBOARD,
                             *train_args(corpus, tmp_path / 'runs', '--max_step', '40', '--eval-interval', '20',
                                         '--log-interval', '1')],
                            cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr
    assert result.stderr.splitlines() == [
        'error: no space left on device; free some space (a file being replaced is left intact)']


# ----------------------------------------------------------------------------- resumes that cannot change the run

@pytest.mark.parametrize('changed', [['--batch_size', '8'], ['--tgt_len', '12'], ['--ext_len', '4'],
                                     ['--batch_chunk', '2'], ['--data', 'OTHER']])
def test_a_restart_with_another_data_layout_is_refused(corpus, stopped_run, tmp_path, changed):
    if changed[1] == 'OTHER':
        changed = ['--data', write_corpus(tmp_path / 'other', seed=7)]      # same size and symbols, other text
    run_dir = copy_run(stopped_run, tmp_path)
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(corpus, tmp_path / 'runs', '--max_step', '10', '--eval-interval', '5', *changed,
                              '--restart', '--restart_dir', run_dir))
    message = error_line(stop)
    assert 'another run than the checkpoint' in message
    assert ('train, valid, test split(s) differ' if changed[0] == '--data' else f'{changed[0]} ') in message


def test_a_max_step_below_the_checkpoint_is_refused(corpus, stopped_run, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path)
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(corpus, tmp_path / 'runs', '--max_step', '1', '--eval-interval', '5',
                              '--restart', '--restart_dir', run_dir))
    assert "--max_step 1 is below the checkpoint's step 2" in error_line(stop)
    assert not os.path.exists(os.path.join(run_dir, 'results.json'))


def cpu_tensors(tree):
    """Whether every tensor in a nest of dicts, lists and tuples is on the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.device.type == 'cpu'
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return all(cpu_tensors(item) for item in items)


def test_a_resume_on_another_device_loads_the_checkpoint_to_the_cpu(corpus, stopped_run, tmp_path, monkeypatch):
    """On a GPU the run's device is not the CPU (here 'meta' stands in for it): the checkpoint must still arrive
    on the CPU, where torch.set_rng_state takes its RNG state and from where each part is copied to the device."""
    run_dir = copy_run(stopped_run, tmp_path)
    args = train.parse_args(train_args(corpus, tmp_path / 'runs', '--max_step', '10', '--eval-interval', '5',
                                       '--restart', '--restart_dir', run_dir))
    ddp = types.SimpleNamespace(device=torch.device('meta'), is_main=True, world_size=1, rank=0, barrier=lambda: None)
    handed = {}
    monkeypatch.setattr(train, 'train_in',
                        lambda run_dir, args, ddp, corpus, ckpt, command: handed.setdefault('ckpt', ckpt))
    train.start(args, ddp, 'python train.py --restart')
    ckpt = handed['ckpt']
    assert cpu_tensors(ckpt)
    assert ckpt['rng']['torch'].dtype == torch.uint8
    torch.set_rng_state(ckpt['rng']['torch'])
    assert all(state['step'].device.type == 'cpu' for state in ckpt['optimizer']['state'].values())


def test_cuda_rng_states_saved_on_more_gpus_restore_the_devices_there_are(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device: restored.append((state, device)))
    states = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]
    run_utils.set_rng_state({'torch': torch.get_rng_state(), 'cuda': states}, cuda=True)
    assert [(s[0].item(), d) for s, d in restored] == [(0, 0), (1, 1)]


def test_a_resume_keeps_config_json_and_records_itself_beside_it(corpus, stopped_run, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path)
    with open(os.path.join(run_dir, 'config.json')) as f:
        original = f.read()
    train.main(train_args(corpus, tmp_path / 'runs', '--max_step', '10', '--eval-interval', '5', '--stop_step', '3',
                          '--max_eval_steps', '2', '--restart', '--restart_dir', run_dir))
    with open(os.path.join(run_dir, 'config.json')) as f:
        assert f.read() == original
    with open(os.path.join(run_dir, 'resumes.jsonl')) as f:
        [record] = [json.loads(line) for line in f]
    assert record['step'] == 2
    assert record['changed'] == {'max_eval_steps': [3, 2], 'stop_step': [2, 3]}
    assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}', record['time'])


def test_tensorboard_keeps_every_point_across_a_resume(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    common = ['--max_step', '6', '--eval-interval', '3']
    run_dir = run_train(corpus, tmp_path / 'runs', *common, '--stop_step', '3')
    train.main(train_args(corpus, tmp_path / 'runs', *common, '--restart', '--restart_dir', run_dir))
    events = EventAccumulator(run_dir).Reload()
    assert [e.step for e in events.Scalars('train/loss')] == [1, 2, 3, 4, 5, 6]
    for tag in ('valid/all_experts/bpc', 'valid/k2/bpc'):
        assert [e.step for e in events.Scalars(tag)] == [3, 6]


class HardKill(BaseException):
    """Stands for SIGKILL: nothing in train.py catches it, nothing is saved."""


def test_train_log_has_each_step_once_after_a_hard_kill_and_resume(corpus, tmp_path, monkeypatch):
    original = train.Trainer.train_step

    def killed_before_step_5(self, data, target):
        if self.step == 4:
            raise HardKill
        return original(self, data, target)

    common = ['--max_step', '6', '--eval-interval', '3']
    with monkeypatch.context() as patch:
        patch.setattr(train.Trainer, 'train_step', killed_before_step_5)
        with pytest.raises(HardKill):
            run_train(corpus, tmp_path / 'runs', *common)
    [run_dir] = run_dirs(tmp_path / 'runs')
    assert step_lines(os.path.join(run_dir, 'train.log')) == [1, 2, 3, 4]       # step 4 is after the checkpoint
    metrics_path = os.path.join(run_dir, 'metrics.jsonl')
    with open(metrics_path, 'a') as f:
        f.write('{"step": 5, "split": "tra')                 # the kill cut a record short
    train.main(train_args(corpus, tmp_path / 'runs', *common, '--restart', '--restart_dir', run_dir))
    assert step_lines(os.path.join(run_dir, 'train.log')) == [1, 2, 3, 4, 5, 6]
    with open(metrics_path) as f:
        train_steps = [r['step'] for r in map(json.loads, f) if r['split'] == 'train']
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 6


def test_an_unreadable_metrics_record_before_the_last_is_a_clear_error(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"step": 1}\n{"step": 2, "spl\n{"step": 3}\n')
    with pytest.raises(run_utils.RunError, match='metrics.jsonl line 2 is not a JSON record'):
        run_utils.RunLog(str(tmp_path), True, resume_step=3)


def test_a_non_finite_loss_before_any_checkpoint_does_not_name_one(corpus, tmp_path, monkeypatch):
    original = train.Trainer.train_step

    def poisoned(self, data, target):
        with torch.no_grad():
            self.model.word_emb.emb_layers[0].weight.fill_(float('nan'))
        return original(self, data, target)

    monkeypatch.setattr(train.Trainer, 'train_step', poisoned)
    with pytest.raises(SystemExit) as stop:
        run_train(corpus, tmp_path / 'runs', '--max_step', '10', '--eval-interval', '5')
    assert stop.value.code == 1
    [run_dir] = run_dirs(tmp_path / 'runs')
    with open(os.path.join(run_dir, 'train.log')) as f:
        log = f.read()
    assert 'non-finite training loss (nan) at step 1' in log and 'no checkpoint was written' in log
    assert 'checkpoint_last.pt' not in log and not os.path.exists(os.path.join(run_dir, 'checkpoint_last.pt'))


# ----------------------------------------------------------------------------- long runs on shared machines

def test_two_runs_started_in_the_same_second_both_get_a_directory(tmp_path, monkeypatch):
    """Both processes saw the time-stamped name free; the second must not die creating it."""
    monkeypatch.setattr(run_utils.time, 'strftime', lambda fmt: '20240101-000000')
    monkeypatch.setattr(os.path, 'exists', lambda path: False)     # the other process creates it right after
    first = run_utils.make_run_dir(str(tmp_path / 'runs'))
    second = run_utils.make_run_dir(str(tmp_path / 'runs'))
    monkeypatch.undo()
    assert first != second and os.path.isdir(os.path.join(second, 'src'))


def python_env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)


def test_a_second_restart_of_a_running_run_is_refused_and_ctrl_c_exits_130(corpus, stopped_run, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(train.Trainer, 'run', lambda self: pytest.fail('the second restart started training'))
    run_dir = copy_run(stopped_run, tmp_path)
    resume = train_args(corpus, tmp_path / 'runs', '--max_step', '100000', '--eval-interval', '5',
                        '--restart', '--restart_dir', run_dir)
    first = subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), *resume], env=python_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and max(step_lines(os.path.join(run_dir, 'train.log')), default=0) < 7:
            time.sleep(0.2)           # past its first validation (step 5), so its checkpoint is of its own
        with pytest.raises(SystemExit) as stop:
            train.main(resume)
        assert 'is in use by process' in error_line(stop) and str(first.pid) in error_line(stop)
    finally:
        first.send_signal(signal.SIGINT)
        output, _ = first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGINT, output            # 130: stopped by Ctrl-C, not finished
    ckpt = torch.load(os.path.join(run_dir, 'checkpoint_last.pt'), weights_only=True)
    assert ckpt['step'] == step_lines(os.path.join(run_dir, 'train.log'))[-1] >= 7


def test_a_stop_at_stop_step_is_a_normal_exit(corpus, tmp_path):
    """main() returns (exit status 0) after --stop_step; the signal statuses are tested above and in test_train."""
    assert train.main(train_args(corpus, tmp_path / 'runs', '--max_step', '10', '--stop_step', '1')) is None
    [run_dir] = run_dirs(tmp_path / 'runs')
    assert torch.load(os.path.join(run_dir, 'checkpoint_last.pt'), weights_only=True)['step'] == 1


class FakeClock:
    """time.time for train.py: 1 s per training step, 100 s per validation, nothing else."""

    def __init__(self):
        self.now = 0.0

    def time(self):
        return self.now


def test_the_log_line_after_a_validation_does_not_count_its_time(corpus, tmp_path, monkeypatch):
    clock = FakeClock()
    train_step, evaluate = train.Trainer.train_step, evaluation.evaluate

    def one_second_step(self, data, target):
        clock.now += 1.0
        return train_step(self, data, target)

    def slow_validation(*args, **kwargs):
        clock.now += 100.0
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, 'time', clock)
    monkeypatch.setattr(train.Trainer, 'train_step', one_second_step)
    monkeypatch.setattr(evaluation, 'evaluate', slow_validation)
    run_dir = run_train(corpus, tmp_path / 'runs', '--max_step', '4', '--eval-interval', '2', '--log-interval', '4')
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        [row] = [r for r in map(json.loads, f) if r['split'] == 'train']
    assert row['step'] == 4
    assert row['tokens_per_s'] == pytest.approx(4 * 16)       # 4 x 16 tokens per one-second step
    with open(os.path.join(run_dir, 'train.log')) as f:
        assert '| ms/batch 1000.00 |' in f.read()


# ----------------------------------------------------------------------------- the scripts

SMOE_SCRIPTS = ['script/table1/smoe_enwik8.sh', 'script/table1/smoe_wiki103.sh',
                'script/LargeScale/smoe_medium_enwik8.sh', 'script/LargeScale/smoe_large_enwik8.sh']


@pytest.mark.parametrize('script', SMOE_SCRIPTS)
def test_smoe_scripts_train_a_trainable_router_at_k_2_without_dropout_as_published(script):
    """The last published smoe_* scripts (REFERENCE.md, "Script details"): dropout 0.0, k = 2, no freezing."""
    with open(os.path.join(REPO, script)) as f:
        text = f.read()
    command = text[text.index('launch train.py'):]
    assert re.findall(r'--dropout (\S+)', command) == ['0.0'] and '--moe-top-k 2' in command
    assert '--freeze_gate' not in command and '--dynamic_moe' not in command
