"""The MoE block against a brute-force reference, the gate contract, router gradients and caching."""
import pytest
import torch
import torch.nn.functional as F

from custom_gate import BaseGate
from hyper_router import HyperRouterGate, get_top_k, set_top_k
from moe import GATES, MoEPositionwiseFF, RouterStats, fastmoe_available, torch_moe
from moe_engine import grouped_mm_problem
from tests.conftest import tiny_model

E, D, H = 4, 16, 16                            # widths of 16 bf16 rows are 32 bytes, as grouped_mm needs
GATE_NAMES = sorted(GATES)
FULL_SOFTMAX_SCORES = ('switch',)              # gate value: the full softmax of the chosen, not renormalised
RANDOMLY_DROPPED = ('gshard',)                 # in training a second expert may be dropped (slot -1)
# (engine, dtype of the experts): the reference is the float64 brute force
ENGINE_CASES = [('loop', torch.float64), ('loop', torch.float32), ('grouped', torch.float32), ('grouped', torch.bfloat16)]


def make_block(gate_name, k, seed=0, engine='auto'):
    torch.manual_seed(seed)
    block = MoEPositionwiseFF(D, H, dropout=0.0, num_expert=E, top_k=k, gate_name=gate_name, backend='torch',
                              engine=engine)
    for p in block.parameters():               # well-spread values so ties in top-k never happen
        p.data.normal_(0, 0.5)
    return block.double()


def naive_router(params, prefix):
    """(W_r [E, d], b_r [E]) of the router of the MoE block whose parameters are `params[prefix + ...]`.

    A linear router (SMoE, SMoE-Dropout) is read as it is; a HyperRouter's is generated here by hand from
    its embedding e and hypernetwork (paper Eq. 2): out = W2 ReLU(W0 e + b0) + b2, and expert i's router
    row is out[i (d + 1) : i (d + 1) + d], its bias out[i (d + 1) + d] (the layout of REFERENCE.md).
    """
    if prefix + 'gate.gate.weight' in params:
        return params[prefix + 'gate.gate.weight'], params[prefix + 'gate.gate.bias']
    embedding = params[prefix + 'gate.embedding'][0]                                          # [d]
    hidden = torch.relu(params[prefix + 'gate.hypernet.0.weight'] @ embedding + params[prefix + 'gate.hypernet.0.bias'])
    out = params[prefix + 'gate.hypernet.2.weight'] @ hidden + params[prefix + 'gate.hypernet.2.bias']  # [E (d + 1)]
    d_model = embedding.numel()
    n_expert = out.numel() // (d_model + 1)
    rows = [out[i * (d_model + 1):i * (d_model + 1) + d_model] for i in range(n_expert)]
    biases = [out[i * (d_model + 1) + d_model] for i in range(n_expert)]
    return torch.stack(rows), torch.stack(biases)


def naive_expert(params, prefix, expert, x_t):
    """Expert `expert` of the block on one token x_t [d]: W2 ReLU(W1 x + b1) + b2."""
    w1, b1 = params[prefix + 'experts.htoh4.weight'][expert], params[prefix + 'experts.htoh4.bias'][expert]
    w2, b2 = params[prefix + 'experts.h4toh.weight'][expert], params[prefix + 'experts.h4toh.bias'][expert]
    return w2 @ torch.relu(w1 @ x_t + b1) + b2


def naive_moe(params, prefix, x, k):
    """The MoE mixture y [T, d] of x [T, d], token by token, with its own routing.

    Per token: logits l_e = W_r[e] . x + b_r[e] for every expert, the k largest chosen by sorting, their
    weights exp(l_e) / sum over the chosen of exp(l), then y = sum over the chosen of weight * expert(x).
    Nothing is taken from the gate module but its parameters.
    """
    router_weight, router_bias = naive_router(params, prefix)
    n_expert = router_bias.numel()
    outputs = []
    for x_t in x:
        logits = [router_weight[e] @ x_t + router_bias[e] for e in range(n_expert)]
        chosen = sorted(range(n_expert), key=lambda e: -logits[e].item())[:k]
        chosen_logits = torch.stack([logits[e] for e in chosen])                             # [k]
        weights = torch.exp(chosen_logits - chosen_logits.max())
        weights = weights / weights.sum()
        outputs.append(sum(w * naive_expert(params, prefix, e, x_t) for w, e in zip(weights, chosen)))
    return torch.stack(outputs)


def skip_unless_engine_runs(engine, device, dtype):
    if engine == 'grouped' and grouped_mm_problem(device, dtype, (D, H)):
        pytest.skip(grouped_mm_problem(device, dtype, (D, H)))


def moe_outputs_and_grads(block, fn, x, grad_out):
    """fn(x) and the gradients of <fn(x), grad_out> wrt x and every block parameter, in float64."""
    block.zero_grad()
    x.grad = None
    y = fn(x)
    y.backward(grad_out.to(y.dtype))
    grads = {n: p.grad.to(torch.double, copy=True) for n, p in block.named_parameters() if p.grad is not None}
    return y.detach().to(torch.double, copy=True), x.grad.to(torch.double, copy=True), grads


def assert_close_in(dtype, actual, expected, name):
    """fp32/fp64: every element within 1e-5 (relative to the largest); bf16 (8 bits of mantissa): the
    error's norm within 5% of the reference's (the router's gradient, a softmax-weighted difference of
    expert outputs, loses most: 2-3%)."""
    if dtype == torch.bfloat16:
        error = ((actual - expected).norm() / expected.norm().clamp(min=1e-12)).item()   # k = 1: router grads 0
        assert error < 5e-2, f'{name}: relative error {error:.3g}'
    else:
        tol = 1e-5 * expected.abs().max().item()
        torch.testing.assert_close(actual, expected, atol=tol, rtol=1e-5, msg=lambda m: f'{name}: {m}')


@pytest.mark.device
@pytest.mark.parametrize('engine,dtype', ENGINE_CASES)
@pytest.mark.parametrize('gate_name', ['smoe', 'smoe_dropout', 'hyper_router'])
@pytest.mark.parametrize('k', [1, 2, E])
def test_sparse_moe_matches_brute_force_forward_and_backward(gate_name, k, engine, dtype, device):
    skip_unless_engine_runs(engine, device, dtype)
    block = make_block(gate_name, k, engine=engine).to(device)
    x_scale = 1.0
    if dtype == torch.bfloat16:                # keep every pre-activation 0.5 away from ReLU's kink, where
        x_scale = 0.1                          # bf16 rounding (after the GEMM, again after the bias) could
        with torch.no_grad():                  # flip a unit on one side and not on the other
            block.experts.htoh4.bias.copy_(block.experts.htoh4.bias.sign())
    block.experts.to(dtype).double()           # the weights, rounded to dtype, are the reference's too
    x = (x_scale * torch.randn(29, D, device=device)).to(dtype).double().requires_grad_()
    grad_out = torch.randn(29, D, device=device).to(dtype).double()
    y_ref, gx_ref, g_ref = moe_outputs_and_grads(block, lambda inp: naive_moe(block.state_dict(keep_vars=True), '', inp, k), x, grad_out)
    # the router sees the same fp64 input on both sides, so both route alike; the experts run in dtype
    block.experts.to(dtype)
    y, gx, g = moe_outputs_and_grads(block, lambda inp: torch_moe(inp.to(dtype), *block.gate(inp), block.experts,
                                                                  engine), x, grad_out)
    assert_close_in(dtype, y, y_ref, 'output')
    assert_close_in(dtype, gx, gx_ref, 'input gradient')
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert_close_in(dtype, g[name], g_ref[name], name)


def test_sparse_moe_runs_each_token_only_through_its_experts():
    block = make_block('smoe', 1)
    x = torch.randn(40, D, dtype=torch.double)
    top_idx, top_score = block.gate(x)
    seen = []
    original = block.experts.run_grouped

    def spy(x_sorted, counts):
        seen.append(list(counts))
        return original(x_sorted, counts)

    block.experts.run_grouped = spy
    torch_moe(x, top_idx, top_score, block.experts)
    assert seen == [torch.bincount(top_idx.view(-1), minlength=E).tolist()]
    assert sum(seen[0]) == x.size(0)           # k = 1: one expert row per token, not E


@pytest.mark.parametrize('gate_name', GATE_NAMES)
@pytest.mark.parametrize('training', [True, False])
def test_gate_contract(gate_name, training):
    torch.manual_seed(0)
    block = MoEPositionwiseFF(D, H, 0.0, num_expert=E, top_k=2, gate_name=gate_name,
                              router_options={'n_token': 37}).train(training)
    block.gate.set_step(10 ** 9)               # a router with a schedule (DTS-Gate) at its end: top-k routing
    x, token_ids = torch.randn(50, D), torch.randint(37, (50,))
    renormalised = type(block.gate).scores is BaseGate.scores    # the default gate values
    for k in (1, 2, 3, E):
        block.gate.top_k = k
        top_idx, top_score, logits = block.gate(x, token_ids, return_logits=True)
        assert top_idx.shape == top_score.shape == (50, k)
        assert top_idx.dtype == torch.int64 and top_score.dtype == torch.float32
        routed = top_idx >= 0                  # -1: a slot routed nowhere (GShard's dropped second expert)
        assert routed.all() or (training and gate_name in RANDOMLY_DROPPED)
        assert routed[:, 0].all() and (top_idx < E).all() and (top_idx >= -1).all()
        assert all(len(set(row) - {-1}) == len([e for e in row if e >= 0]) for row in top_idx.tolist())
        assert (top_score[:, :-1] >= top_score[:, 1:]).all()           # best expert first
        assert ((top_score[routed] > 0) & (top_score[routed] <= 1 + 1e-6)).all()
        probs = F.softmax(logits, -1)                                                 # [T, E]
        chosen = probs.gather(1, top_idx.clamp(min=0))                                # [T, k]
        if gate_name in FULL_SOFTMAX_SCORES:
            torch.testing.assert_close(top_score[routed], chosen[routed])
        elif renormalised:                     # over the k best, a dropped slot's expert included
            expected = chosen / probs.topk(k).values.sum(-1, keepdim=True)
            torch.testing.assert_close(top_score[routed], expected[routed])


@pytest.mark.parametrize('bad_k', [0, E + 1])
def test_top_k_outside_one_to_e_is_rejected(bad_k):
    model = tiny_model()
    with pytest.raises(ValueError, match='between 1 and the number of experts'):
        set_top_k(model, bad_k)


def test_set_top_k_changes_every_layer():
    model = tiny_model(moe_top_k=1)
    set_top_k(model, 3)
    assert [ff.gate.top_k for ff in model.moe_layers] == [3, 3]
    assert get_top_k(model) == 3


def backward_once(model, tokens):
    model.train()
    loss = model(tokens[:-1], tokens[1:])[0].mean()
    loss.backward()


def test_smoe_router_is_trained(tokens):
    model = tiny_model(gate_name='smoe')
    backward_once(model, tokens)
    for ff in model.moe_layers:
        assert ff.gate.gate.weight.requires_grad and ff.gate.gate.weight.grad.abs().sum() > 0


def test_smoe_dropout_router_stays_frozen(tokens):
    model = tiny_model(gate_name='smoe_dropout')
    backward_once(model, tokens)
    for ff in model.moe_layers:
        for p in ff.gate.parameters():
            assert not p.requires_grad and p.grad is None
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not trainable & {id(p) for ff in model.moe_layers for p in ff.gate.parameters()}


def test_hyper_router_trains_the_embedding_through_a_frozen_hypernetwork(tokens):
    model = tiny_model(gate_name='hyper_router', hyper_size=7)
    backward_once(model, tokens)
    for ff in model.moe_layers:
        assert ff.gate.hypernet[0].out_features == 7
        assert ff.gate.embedding.requires_grad and ff.gate.embedding.grad.abs().sum() > 0
        for p in ff.gate.hypernet.parameters():
            assert not p.requires_grad and p.grad is None


def test_hyper_router_embedding_starts_standard_normal_and_hypernet_small():
    model = tiny_model(gate_name='hyper_router', d_model=256, d_head=32, n_head=8)
    emb = torch.cat([ff.gate.embedding.view(-1) for ff in model.moe_layers])
    assert 0.85 < emb.std().item() < 1.15                 # N(0, 1), untouched by the N(0, 0.02) init
    w = model.moe_layers[0].gate.hypernet[2].weight
    assert abs(w.std().item() - 0.02) < 0.002


def test_hyper_router_eval_cache_follows_embedding_and_state_dict():
    torch.manual_seed(0)
    gate = HyperRouterGate(D, E, top_k=2, hyper_size=5)
    for p in gate.hypernet.parameters():
        p.data.normal_(0, 0.5)
    gate.eval()
    with torch.no_grad():
        cached_w, cached_b = gate.router()
        assert gate.router()[0] is cached_w                           # reused, not regenerated
        fresh_w, fresh_b = gate.generate_router()
        torch.testing.assert_close(cached_w, fresh_w)
        torch.testing.assert_close(cached_b, fresh_b)
        gate.embedding.add_(1.0)                                      # what an optimiser step does
        torch.testing.assert_close(gate.router()[0], gate.generate_router()[0])
        assert not torch.equal(gate.router()[0], cached_w)

    other = HyperRouterGate(D, E, top_k=2, hyper_size=5)
    with torch.no_grad():
        before = gate.router()[0].clone()
    gate.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gate.router()[0], other.generate_router()[0])
        assert not torch.equal(gate.router()[0], before)


def test_hyper_router_regenerates_with_grad_in_training():
    gate = HyperRouterGate(D, E, top_k=2, hyper_size=5)
    weight, _ = gate.router()
    assert weight.requires_grad
    weight.sum().backward()
    assert gate.embedding.grad is not None


def test_router_stats_entropy_and_load():
    stats = RouterStats(E)
    stats.update(torch.zeros(6, E), torch.tensor([[0, 1]] * 6))
    assert abs(stats.mean_entropy - torch.log(torch.tensor(float(E))).item()) < 1e-6
    assert stats.load_fraction == [0.5, 0.5, 0.0, 0.0]
    onehot = RouterStats(E)
    onehot.update(torch.tensor([[0.0, -1e4, -1e4, -1e4]] * 3), torch.tensor([[0]] * 3))
    assert onehot.mean_entropy < 1e-6 and onehot.std_entropy < 1e-6


def test_unknown_gate_and_backend_are_clear_errors():
    with pytest.raises(ValueError, match='unknown gate_name .*choose one of'):
        tiny_model(gate_name='Nope')
    with pytest.raises(ValueError, match='unknown moe_backend'):
        tiny_model(moe_backend='jax')


@pytest.mark.skipif(fastmoe_available(), reason='fastmoe is installed here')
def test_asking_for_fastmoe_without_it_is_a_clear_error():
    with pytest.raises(ValueError, match='import fmoe'):
        tiny_model(moe_backend='fastmoe')


@pytest.mark.skipif(not (fastmoe_available() and torch.cuda.is_available()), reason='needs fastmoe and CUDA')
@pytest.mark.parametrize('k', [1, 2, E])
def test_fastmoe_backend_matches_torch_backend(k):
    block = make_block('smoe', k).float().cuda()
    x = torch.randn(64, D, device='cuda', requires_grad=True)
    outs = {}
    for backend in ('torch', 'fastmoe'):
        block.backend = backend
        block.zero_grad()
        x.grad = None
        y = block.moe(x)
        y.sum().backward()
        outs[backend] = (y.detach(), x.grad.clone(), block.experts.htoh4.weight.grad.clone())
    for a, b in zip(outs['torch'], outs['fastmoe']):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
