"""The MoE block against a brute-force reference, the gate contract, router gradients and caching."""
import pytest
import torch
import torch.nn.functional as F

from custom_gate import BaseGate
from hyper_router import HyperRouterGate, get_top_k, set_top_k
from moe import ROUTERS, RouterStats, fastmoe_available, torch_moe
from moe_engine import grouped_mm_problem
from tests.conftest import TINY, tiny_model

E, D, H = 4, 16, 16                            # widths of 16 bf16 rows are 32 bytes, as grouped_mm needs
FULL_SOFTMAX_SCORES = ('switch',)              # gate value: the full softmax of the chosen, not renormalised
AUX_LOSSES = {'balance', 'importance', 'load', 'z'}     # the auxiliary-loss names of the gate contract
NAIVE_ROUTERS = ('smoe', 'smoe_dropout', 'hyper_router')   # routers naive_router computes by hand
# (engine, dtype of the experts): the reference is the float64 brute force
ENGINE_CASES = [('loop', torch.float64), ('loop', torch.float32), ('grouped', torch.float32), ('grouped', torch.bfloat16)]


def make_block(gate_name, k, seed=0, engine='auto'):
    """The first MoE block of a tiny model (built by the model, so a router gets whatever it needs from it)."""
    block = tiny_model(seed, gate_name=gate_name, moe_num_expert=E, moe_top_k=k, d_inner=H, moe_backend='torch',
                       moe_engine=engine).moe_layers[0]
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


def naive_mixture(params, prefix, x, top_idx, top_score):
    """y [T, d]: per token, sum over its routed slots (index >= 0) of score * expert(x), one by one."""
    return torch.stack([sum((score * naive_expert(params, prefix, e, x_t)
                             for e, score in zip(idx.tolist(), scores) if e >= 0), torch.zeros_like(x_t))
                        for x_t, idx, scores in zip(x, top_idx, top_score)])


def token_ids(n_tok, seed=0):
    """[T] input token ids of the tiny model's vocabulary, for the routers that read them."""
    return torch.randint(0, TINY['n_token'], (n_tok,), generator=torch.Generator().manual_seed(seed))


def seeded_routing(gate, x, ids):
    """gate(x) with the global RNG reset first: a router that draws (THOR, noise) draws the same each call."""
    torch.manual_seed(5)
    return gate(x, ids)


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
@pytest.mark.parametrize('gate_name', ROUTERS)
@pytest.mark.parametrize('k', [1, 2, E])
def test_sparse_moe_matches_brute_force_forward_and_backward(gate_name, k, engine, dtype, device):
    """The routers naive_router knows are routed by hand too; any other router's decisions (top_idx, scores,
    drawn from the same RNG state on both sides) are the input of both, and the experts' mixture is checked."""
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
    ids = token_ids(29).to(device)
    params = block.state_dict(keep_vars=True)
    if gate_name in NAIVE_ROUTERS:
        reference = lambda inp: naive_moe(params, '', inp, k)                                    # noqa: E731
    else:
        reference = lambda inp: naive_mixture(params, '', inp, *seeded_routing(block.gate, inp, ids))  # noqa: E731
    y_ref, gx_ref, g_ref = moe_outputs_and_grads(block, reference, x, grad_out)
    # the router sees the same fp64 input on both sides, so both route alike; the experts run in dtype
    block.experts.to(dtype)
    y, gx, g = moe_outputs_and_grads(block, lambda inp: torch_moe(inp.to(dtype), *seeded_routing(block.gate, inp, ids),
                                                                  block.experts, engine), x, grad_out)
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


@pytest.mark.parametrize('gate_name', ROUTERS)
def test_gate_contract(gate_name):
    """What every router returns (custom_gate.py): top_idx [T, k] int64 of distinct experts or -1 (a slot routed
    to no expert), fp32 scores, full logits [T, E], auxiliary terms named as the contract names them; a router
    with the default scores gives the softmax over its k chosen logits."""
    gate = tiny_model(gate_name=gate_name, moe_num_expert=E, moe_top_k=2).moe_layers[0].gate
    x, ids = torch.randn(50, D), token_ids(50)
    assert set(gate.default_aux_losses) <= AUX_LOSSES and all(w >= 0 for w in gate.default_aux_losses.values())
    for training in (True, False):
        gate.train(training)
        for k in (1, 2, 3, E):
            gate.top_k = k
            gate.set_step(0)
            top_idx, top_score, logits = gate(x, ids, return_logits=True)
            width = E if training and getattr(gate, 'dense', False) else k   # DTS-Gate's dense phase: E columns
            assert top_idx.shape == top_score.shape == (50, width) and logits.shape == (50, E)
            assert top_idx.dtype == torch.int64 and top_score.dtype == logits.dtype == torch.float32
            routed = top_idx >= 0
            assert ((top_idx >= -1) & (top_idx < E)).all() and routed.any(-1).all()
            assert all(len(set(row) - {-1}) == len([e for e in row if e >= 0]) for row in top_idx.tolist())
            assert torch.isfinite(top_score[routed]).all() and (top_score[routed] >= 0).all()
            terms = gate.aux_terms()
            assert set(terms) <= AUX_LOSSES and all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())
            if type(gate).scores is BaseGate.scores and routed.all():
                chosen = F.softmax(logits, -1).gather(1, top_idx)
                torch.testing.assert_close(top_score, chosen / chosen.sum(-1, keepdim=True))
            if gate_name in FULL_SOFTMAX_SCORES:
                chosen = F.softmax(logits, -1).gather(1, top_idx.clamp(min=0))
                torch.testing.assert_close(top_score[routed], chosen[routed])
            if type(gate).choose is BaseGate.choose:
                assert (top_score[:, :-1] >= top_score[:, 1:]).all()            # best expert first
    if gate.needs_token_ids:
        with pytest.raises(ValueError, match='token'):
            gate(x)


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


# the gate parameters each method keeps frozen (name prefixes within the gate); every other one trains
FROZEN_IN_GATE = {'smoe_dropout': ('gate.',), 'hyper_router': ('hypernet.',)}


@pytest.mark.parametrize('gate_name', ROUTERS)
def test_which_router_parameters_train(gate_name, tokens):
    """After one training backward at k = 2, a frozen gate parameter has no gradient and is not trainable;
    every other gate parameter is trainable and has a nonzero gradient."""
    model = tiny_model(gate_name=gate_name)
    backward_once(model, tokens)
    for ff in model.moe_layers:
        for name, p in ff.gate.named_parameters():
            if name.startswith(FROZEN_IN_GATE.get(gate_name, ())):
                assert not p.requires_grad and p.grad is None, name
            else:
                assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name


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
    with pytest.raises(ValueError, match='unknown router .*choose one of'):
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
