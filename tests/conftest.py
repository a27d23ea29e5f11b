"""Tiny CPU configurations shared by the tests, and the device of the device-aware tests.

`python -m pytest --device cuda -m device` runs the device-aware tests (marked `device`, taking the
`device` fixture) on a GPU, as script/gpu_check.sh does; the default is the CPU.
"""
import os
import subprocess

import pytest
import torch

import router_registry
from mem_transformer import MemTransformerLM

TINY = dict(n_token=37, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=12, dropout=0.0, dropatt=0.0,
            tgt_len=6, mem_len=6)


def tiny_model(seed=0, **overrides):
    """A 2-layer Transformer-XL with d_model 16; MoE with 4 experts unless overridden."""
    torch.manual_seed(seed)
    cfg = dict(TINY, moe=True, moe_num_expert=4, moe_top_k=2, gate_name='smoe')
    cfg.update(overrides)
    return MemTransformerLM(**cfg)


def register_router(monkeypatch, name, gate_class):
    """Register `gate_class` as router `name` for one test (undone after it), as its decorator would."""
    monkeypatch.setitem(router_registry.GATES, name, gate_class)
    monkeypatch.setitem(router_registry.SPECS, name, router_registry.RouterSpec(name, gate_class, name, '', ''))


@pytest.fixture(scope='module')
def synthetic_dir(tmp_path_factory):
    """Where train.py writes the built-in corpus on first use (--dataset synthetic --data DIR), one per module."""
    return str(tmp_path_factory.mktemp('data') / 'synthetic')


# train.py flags of a tiny MoE run on the built-in corpus (2 layers, d_model 16, 4 experts, k = 2, SMoE)
TINY_MOE_ARGS = ['--dataset', 'synthetic', '--n_layer', '2', '--d_model', '16', '--n_head', '2', '--d_head', '8',
                 '--d_inner', '16', '--tgt_len', '16', '--mem_len', '16', '--eval_tgt_len', '8', '--batch_size', '4',
                 '--max_eval_steps', '2', '--eval_ks', '1,2', '--moe', '--moe-num-expert', '4', '--moe-top-k', '2',
                 '--gate_name', 'smoe']


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a stand-in for python, given to a script as PYTHON: answers launch.sh's question whether torch sees a GPU from
# $STAND_IN_GPU (1: yes) and records the command line of each run the script starts (one line a run, its words
# NUL-separated, after `python -u`) instead of running it
STAND_IN_PYTHON = '''#!/bin/sh
case "$2" in *cuda.is_available*) [ "$STAND_IN_GPU" = 1 ]; exit ;; esac
[ "$1" = -u ] && shift
printf '%s\\0' "$@" >> "$RUN_COMMANDS"
echo >> "$RUN_COMMANDS"
'''


@pytest.fixture
def launch_script(tmp_path):
    """launch_script(script, *flags, gpu=False, **env) -> (the bash run, [the command line of each run it started,
    as ['train.py', ...]]): `bash script *flags` with a stand-in python that starts nothing; an env value None
    unsets the variable."""
    python, record = tmp_path / 'stand_in_python', tmp_path / 'run_commands'
    python.write_text(STAND_IN_PYTHON)
    python.chmod(0o755)

    def launch(script, *flags, gpu=False, **env):
        env = dict(os.environ, PYTHON=str(python), RUN_COMMANDS=str(record), STAND_IN_GPU='1' if gpu else '0', **env)
        record.unlink(missing_ok=True)
        result = subprocess.run(['bash', script, *flags], cwd=REPO, capture_output=True, text=True, timeout=60,
                                env={name: value for name, value in env.items() if value is not None})
        runs = record.read_text().splitlines() if record.exists() else []
        return result, [run.split('\0')[:-1] for run in runs]
    return launch


@pytest.fixture
def script_command(launch_script):
    """script_command(script, *flags, **env) -> the command line (['train.py', ...]) that `bash script *flags`
    starts through launch.sh, found without running it. The test runs that command in the test's process,
    which saves the seconds a second process takes to import torch, per script."""
    def command(script, *flags, **env):
        result, runs = launch_script(script, *flags, **env)
        assert result.returncode == 0 and len(runs) == 1, result.stderr
        return runs[0]
    return command


@pytest.fixture
def tokens():
    gen = torch.Generator().manual_seed(123)
    return torch.randint(0, TINY['n_token'], (13, 3), generator=gen)   # [T + 1, B]


class HostSync(Exception):
    """Raised by the no_host_sync fixture when a tensor is read back to the host."""


HOST_READS = ('tolist', 'item', '__bool__', '__int__', '__float__', '__index__', 'nonzero', '__array__')
SIZE_READS = ('nonzero', 'bincount', 'unique')     # torch functions whose output size CUDA reads back to the host


@pytest.fixture
def no_host_sync(monkeypatch):
    """Every Python-level way of reading a tensor back to the host raises HostSync, and so do torch.nonzero,
    torch.bincount and torch.unique, which read a size back on CUDA. Returns a set to which a test adds the ids
    of tensors that live on the host by design (Adam's step counts, unless fused): those are read freely."""
    host_tensors = set()

    def guarded(name, read):
        def read_or_refuse(tensor, *args, **kwargs):
            if id(tensor) in host_tensors:
                return read(tensor, *args, **kwargs)
            raise HostSync(f'a tensor was read back to the host (Tensor.{name})')
        return read_or_refuse

    def refuse(name):
        def refused(*args, **kwargs):
            raise HostSync(f'torch.{name} reads a size back to the host on CUDA')
        return refused
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, guarded(name, getattr(torch.Tensor, name)))
    for name in SIZE_READS:
        monkeypatch.setattr(torch, name, refuse(name))
    return host_tensors


def pytest_addoption(parser):
    parser.addoption('--device', default='cpu', help='device of the device-aware tests (cpu, cuda, cuda:1)')


@pytest.fixture(scope='session')
def device(request):
    name = request.config.getoption('--device')
    dev = torch.device(name)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        pytest.exit(f'error: --device {name} given but torch sees no CUDA device; drop --device or run on a GPU',
                    returncode=4)
    return dev
