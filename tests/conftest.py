"""Tiny CPU configurations shared by the tests."""
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
