"""Tiny CPU configurations shared by the tests, and the device of the device-aware tests.

`python -m pytest --device cuda -m device` runs the device-aware tests (marked `device`, taking the
`device` fixture) on a GPU, as script/gpu_check.sh does; the default is the CPU.
"""
import pytest
import torch

from mem_transformer import MemTransformerLM

TINY = dict(n_token=37, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=12, dropout=0.0, dropatt=0.0,
            tgt_len=6, mem_len=6)


def tiny_model(seed=0, **overrides):
    """A 2-layer Transformer-XL with d_model 16; MoE with 4 experts unless overridden."""
    torch.manual_seed(seed)
    cfg = dict(TINY, moe=True, moe_num_expert=4, moe_top_k=2, gate_name='smoe')
    cfg.update(overrides)
    return MemTransformerLM(**cfg)


@pytest.fixture
def tokens():
    gen = torch.Generator().manual_seed(123)
    return torch.randint(0, TINY['n_token'], (13, 3), generator=gen)   # [T + 1, B]


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
