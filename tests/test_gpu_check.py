"""script/gpu_check.sh: its dry run on the simulated H100 (full-size model, one timed step), its shortened CPU
form, and on a machine whose torch sees no GPU (DEVICE=cuda stops at once); script/launch.sh's DEVICE."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason='torch sees a GPU here')


@needs_no_gpu
def test_gpu_check_with_device_cuda_and_no_gpu_stops_at_once_with_one_error_line(tmp_path):
    env = dict(os.environ, DEVICE='cuda', OUT=str(tmp_path / 'check'), PYTHON=sys.executable)
    result = subprocess.run(['bash', 'script/gpu_check.sh'], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f'error: DEVICE=cuda but torch {torch.__version__} sees no CUDA device')
    assert 'DEVICE=cpu' in result.stderr
    assert result.stdout == '' and not (tmp_path / 'check').exists()      # nothing was run, nothing written


def test_gpu_check_with_a_python_that_has_no_torch_says_so_in_one_line(tmp_path):
    python = tmp_path / 'python3'
    python.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2; exit 1\n")
    python.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / 'check'), PYTHON=str(python))
    result = subprocess.run(['bash', 'script/gpu_check.sh'], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr.strip() == (f"error: {python} cannot run this code's torch (ModuleNotFoundError: No "
                                     "module named 'torch'); give PYTHON=a python with torch >= 2.11")


def run_gpu_check(tmp_path, device):
    """(exit status, stdout, {check: result}, gpu_check.json) of gpu_check.sh with DEVICE=device. Its device
    tests are those of tests/test_device.py alone: the suite runs them all already."""
    env = dict(os.environ, DEVICE=device, OUT=str(tmp_path / 'out'), WORK=str(tmp_path / 'work'),
               PYTHON=sys.executable, OMP_NUM_THREADS='1', PYTEST_ADDOPTS='tests/test_device.py')
    result = subprocess.run(['bash', 'script/gpu_check.sh'], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    with open(tmp_path / 'out' / 'gpu_check.json') as f:
        summary = json.load(f)
    assert (tmp_path / 'out' / 'gpu_check.md').read_text().strip() in result.stdout      # printed last, written
    return result, {row['name']: row['result'] for row in summary['checks']}, summary


@pytest.mark.slow
def test_gpu_checks_dry_run_on_the_simulated_h100_passes_at_full_size(tmp_path):
    # the four checks of script/gpu_check.py on sim_device.py's H100: the paper's model at batch 22 x 512, one
    # timed step per configuration (shapes only), under the sync rules of a GPU run: a step that would stop the
    # real call at its first timed step (a host read under set_sync_debug_mode('error')) fails here
    result, rows, summary = run_gpu_check(tmp_path, 'sim')
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert rows == {'machine': 'ok', 'timing': 'ok', 'vs_cpu': 'ok', 'resume': 'ok'}
    with open(tmp_path / 'work' / 'timing.json') as f:
        timing = json.load(f)
    assert {name: (r['engine'], r['host_syncs_per_step']) for name, r in timing.items() if name != 'ok'} == {
        'bf16_k2': ('grouped', 0), 'bf16_schedule': ('grouped', 0), 'tf32_k2': ('loop', 4),
        'tf32_schedule': ('loop', 4)}                  # the loop engine's documented read, one per MoE layer
    assert 'HyperRouterGate' in (tmp_path / 'work' / 'machine.log').read_text()
    assert summary['versions']['gpu'].startswith('simulated CUDA device')


@pytest.mark.slow
def test_gpu_check_runs_in_its_shortened_cpu_form_and_prints_its_table(tmp_path):
    result, rows, _ = run_gpu_check(tmp_path, 'cpu')
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    fastmoe = subprocess.run([sys.executable, '-c', 'import fmoe'], capture_output=True).returncode == 0
    assert rows == {'machine': 'ok', 'timing': 'ok', 'vs_cpu': 'ok', 'resume': 'ok', 'train fp32': 'ok',
                    'device tests': 'ok', 'bench fp32': 'ok', 'bench amp': 'ok',
                    'fastmoe parity': 'ok' if fastmoe else 'skipped'}
    assert 'tokens/s' in result.stdout and '400k steps in' in result.stdout and 'MFU' in result.stdout
    assert result.stdout.rstrip().endswith('gpu_check: 0 failed')


@pytest.mark.parametrize('device, gpu, flag', [('cuda', True, True), ('auto', True, True), ('auto', False, False),
                                               ('cpu', True, False), (None, False, False)])
def test_launch_puts_the_run_on_the_device_that_device_names(launch_script, device, gpu, flag):
    result, runs = launch_script('script/table1/smoe_enwik8.sh', '--max_step', '100', gpu=gpu, DEVICE=device,
                                 DATA='/nonexistent')                  # 400k steps would need DEVICE=cpu
    assert result.returncode == 0, result.stderr
    [run] = runs
    assert run[0] == 'train.py' and run.count('--cuda') == (1 if flag else 0)


@pytest.mark.parametrize('device, error', [('cuda', 'error: DEVICE=cuda but torch sees no CUDA device'),
                                           ('gpu', "error: DEVICE must be cuda, cpu or auto; got 'gpu'")])
def test_launch_refuses_a_device_it_cannot_use_before_starting_the_run(launch_script, device, error):
    result, runs = launch_script('script/table1/smoe_enwik8.sh', DEVICE=device, DATA='/nonexistent')
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [error + (
        '; run on a GPU machine, or give DEVICE=cpu' if device == 'cuda' else '')]
    assert runs == []
