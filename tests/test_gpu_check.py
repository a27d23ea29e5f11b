"""script/gpu_check.sh and script/launch.sh on a machine whose torch sees no GPU: DEVICE=cuda stops at once."""
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason='torch sees a GPU here')

# a stand-in for python: answers launch.sh's GPU question from $FAKE_GPU (1: a GPU is seen) and records the
# flags of the training run it is asked to start, without training
STAND_IN = f'''#!/bin/sh
case "$2" in *cuda.is_available*) [ "$FAKE_GPU" = 1 ] && exit 0; exit 1 ;; esac
[ "$1" = -u ] && {{ echo "$@" >> "$RUN_LOG"; exit 0; }}
exec {sys.executable} "$@"
'''


@needs_no_gpu
def test_gpu_check_with_device_cuda_and_no_gpu_stops_at_once_with_one_error_line(tmp_path):
    env = dict(os.environ, DEVICE='cuda', OUT=str(tmp_path / 'check'), PYTHON=sys.executable)
    result = subprocess.run(['bash', 'script/gpu_check.sh'], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith('error: DEVICE=cuda but torch sees no CUDA device') and 'DEVICE=cpu' in result.stderr
    assert result.stdout == '' and not (tmp_path / 'check').exists()      # nothing was run, nothing written


@pytest.fixture
def stand_in(tmp_path):
    python = tmp_path / 'python'
    python.write_text(STAND_IN)
    python.chmod(0o755)
    return dict(os.environ, PYTHON=str(python), RUN_LOG=str(tmp_path / 'runs.log')), tmp_path / 'runs.log'


@pytest.mark.parametrize('device, gpu, flag', [('cuda', '1', True), ('auto', '1', True), ('auto', '0', False),
                                               ('cpu', '1', False), (None, '0', False)])
def test_launch_puts_the_run_on_the_device_that_device_names(stand_in, device, gpu, flag):
    env, log = stand_in
    env = dict(env, FAKE_GPU=gpu, DATA='/nonexistent')
    env.pop('DEVICE', None)
    if device is not None:
        env['DEVICE'] = device
    result = subprocess.run(['bash', 'script/table1/smoe_enwik8.sh', '--max_step', '100'], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)     # 400k steps would need DEVICE=cpu
    assert result.returncode == 0, result.stderr
    [run] = log.read_text().splitlines()
    assert run.startswith('-u train.py') and run.split().count('--cuda') == (1 if flag else 0)


@pytest.mark.parametrize('device, error', [('cuda', 'error: DEVICE=cuda but torch sees no CUDA device'),
                                           ('gpu', "error: DEVICE must be cuda, cpu or auto; got 'gpu'")])
def test_launch_refuses_a_device_it_cannot_use_before_starting_the_run(stand_in, device, error):
    env, log = stand_in
    env = dict(env, FAKE_GPU='0', DEVICE=device, DATA='/nonexistent')
    result = subprocess.run(['bash', 'script/table1/smoe_enwik8.sh'], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [error + (
        '; run on a GPU machine, or give DEVICE=cpu' if device == 'cuda' else '')]
    assert not log.exists()
