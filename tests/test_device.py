"""Device-aware checks of the model on the pytest --device (default cpu; script/gpu_check.sh runs them on cuda).

Together with the `device`-marked tests of test_moe.py and test_speed.py (MoE block against the brute
force for every engine and dtype, grouped GEMM, fused attention in training).
"""
import glob

import pytest
import torch
import torch.nn.functional as F

import evaluation
import train
from custom_gate import BaseGate
from hyper_router import HyperRouterGate
from moe import ROUTERS
from moe_engine import grouped_mm_problem
from tests.conftest import TINY, tiny_model

pytestmark = pytest.mark.device


@pytest.mark.parametrize('gate_name', ROUTERS)
def test_every_gate_keeps_the_contract_on_the_device_with_fp32_routing_under_autocast(gate_name, device):
    torch.manual_seed(0)
    model = tiny_model(gate_name=gate_name, moe_num_expert=4, moe_top_k=2).to(device).eval()   # no dropped slots
    gate = model.moe_layers[0].gate
    gate.set_step(10 ** 9)                     # a router with a schedule (DTS-Gate) at its end: top-k routing
    x, token_ids = torch.randn(50, 16, device=device), torch.randint(TINY['n_token'], (50,), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        top_idx, top_score, logits = gate(x, token_ids, return_logits=True)
    assert top_idx.shape == top_score.shape == (50, 2) and top_idx.device.type == device.type
    assert logits.dtype == top_score.dtype == torch.float32                # the router stays in fp32
    assert ((top_idx >= 0) & (top_idx < 4)).all() and (top_idx[:, 0] != top_idx[:, 1]).all()
    if type(gate).scores is BaseGate.scores:                               # the default: renormalised over the k
        torch.testing.assert_close(top_score.sum(-1), torch.ones(50, device=device))
    if gate_name == 'switch':                                              # Switch: the full-softmax probabilities
        torch.testing.assert_close(top_score, torch.softmax(logits, -1).gather(1, top_idx))
    assert ((top_score > 0) & (top_score <= 1 + 1e-6)).all()


def test_hyper_router_cache_on_the_device_follows_the_embedding(device):
    torch.manual_seed(0)
    gate = HyperRouterGate(16, 4, top_k=2, hyper_size=5).to(device).eval()
    with torch.no_grad():
        cached = gate.router()[0]
        assert gate.router()[0] is cached
        gate.embedding.add_(1.0)
        torch.testing.assert_close(gate.router()[0], gate.generate_router()[0])
        assert not torch.equal(gate.router()[0], cached)


def windows(tokens, device, n=3, length=4):
    tokens = tokens.to(device)
    return [(tokens[i * length:(i + 1) * length], tokens[i * length + 1:(i + 1) * length + 1], length)
            for i in range(n)]


def test_evaluation_is_deterministic_on_the_device_and_the_engines_agree(tokens, device):
    args = dict(tgt_len=4, eval_tgt_len=4, mem_len=6, ext_len=0)

    def losses(engine):
        model = tiny_model(gate_name='smoe', moe_engine=engine, d_inner=16).to(device)
        return [evaluation.evaluate(model, windows(tokens, device), args) for _ in range(2)]
    auto = losses('auto')
    assert auto[0] == auto[1]
    if grouped_mm_problem(device, torch.float32, (16, 16)) is None:      # CPU; on CUDA fp32 both are the loop
        grouped, loop = losses('grouped'), losses('loop')
        assert grouped[0] == grouped[1] and grouped[0] == pytest.approx(loop[0], rel=1e-5)


def test_a_checkpoint_trained_on_the_device_evaluates_the_same_on_the_cpu(tmp_path, device):
    work = str(tmp_path / 'runs')
    train.main(['--dataset', 'synthetic', '--data', str(tmp_path / 'synthetic'), '--work_dir', work,
                '--n_layer', '2', '--d_model', '16', '--n_head', '2', '--d_head', '8', '--d_inner', '16',
                '--tgt_len', '8', '--mem_len', '8', '--eval_tgt_len', '8', '--batch_size', '4', '--max_step', '2',
                '--max_eval_steps', '2', '--eval_ks', '2', '--moe', '--moe-num-expert', '4', '--no_tf32',
                *(['--cuda'] if device.type == 'cuda' else [])])
    [run_dir] = glob.glob(f'{work}-synthetic/*')
    ckpt = evaluation.load_checkpoint(f'{run_dir}/model_best.pt')           # mapped to the CPU
    assert all(t.device.type == 'cpu' for t in ckpt['model'].values())
    tokens = torch.randint(0, ckpt['model_config']['n_token'], (9, 2), generator=torch.Generator().manual_seed(0))
    losses = {}
    for where in ('cpu', device):
        model = evaluation.model_from_checkpoint(ckpt, where)
        with torch.no_grad():
            losses[str(where)] = model(tokens[:-1].to(where), tokens[1:].to(where))[0].cpu()
    torch.testing.assert_close(losses['cpu'], losses[str(device)], atol=1e-4, rtol=1e-4)
    assert F.relu(losses['cpu']).sum() > 0
