"""Switch, GShard and noisy top-k: each router's defining behaviour against a computation written here, and
each through training, evaluation and every analysis on the built-in corpus."""
import glob
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import analysis
import eval as eval_script
import evaluation
import train
from custom_gate import GShardGate, NoisyTopKGate, SwitchGate, prob_in_top_k
from hyper_router import param_breakdown
from moe import GATES, MoEPositionwiseFF
from tests.conftest import TINY, tiny_model
from tests.test_train import MOE_ARGS, TINY_ARGS, read_metrics

E, D = 4, 16


def identity_router(gate_cls, **kwargs):
    """A gate on d_model = E whose logits are its input (W = I), so a test writes the logits it wants."""
    gate = gate_cls(E, E, **kwargs)
    with torch.no_grad():
        for p in gate.parameters():
            p.copy_(torch.eye(E))
    return gate


def binomial_bound(n, p, sigmas=5):
    """|count - n p| allowed for a Binomial(n, p) count: `sigmas` standard deviations."""
    return sigmas * math.sqrt(n * p * (1 - p))


# ----------------------------------------------------------------------------- Switch

@pytest.mark.parametrize('k', [1, 2])
def test_switch_gate_value_is_the_full_softmax_probability_of_each_chosen_expert(k):
    torch.manual_seed(0)
    gate = SwitchGate(D, E, top_k=k).eval()
    x = torch.randn(30, D)
    top_idx, top_score = gate(x)
    probs = torch.softmax(x @ gate.gate.weight.T, -1)                   # [T, E], by hand
    expected_idx = probs.argsort(-1, descending=True)[:, :k]
    assert torch.equal(top_idx, expected_idx)
    torch.testing.assert_close(top_score, probs.gather(1, expected_idx))
    assert (top_score.sum(-1) < 1).all()                                 # not renormalised over the chosen


def naive_switch_moe(block, x):
    """y_t = p_e(x_t) * expert_e(x_t), e = argmax of the router's softmax, token by token."""
    w_r = block.gate.gate.weight
    w1, b1 = block.experts.htoh4.weight, block.experts.htoh4.bias
    w2, b2 = block.experts.h4toh.weight, block.experts.h4toh.bias
    rows = []
    for x_t in x:
        p = torch.softmax(w_r @ x_t, -1)
        e = int(p.argmax())
        rows.append(p[e] * (w2[e] @ torch.relu(w1[e] @ x_t + b1[e]) + b2[e]))
    return torch.stack(rows)


def block_with(gate_name, k):
    """An MoE block (4 experts of 8, fp64) with every parameter drawn N(0, 0.5): the block alone leaves its
    experts uninitialised (the model initialises them)."""
    block = MoEPositionwiseFF(D, 8, 0.0, num_expert=E, top_k=k, gate_name=gate_name, backend='torch').double()
    for p in block.parameters():
        p.data.normal_(0, 0.5)
    return block.eval()


def test_switch_block_at_k_1_matches_a_brute_force_and_trains_its_router():
    """At k = 1 the router gets its gradient through p_e; SMoE's renormalised gate (softmax over one logit)
    gets none, which is why Switch does not renormalise."""
    torch.manual_seed(0)
    block = block_with('switch', 1)
    x = torch.randn(25, D, dtype=torch.double)
    y = block.moe(x)
    y_ref = naive_switch_moe(block, x)
    torch.testing.assert_close(y, y_ref)
    grad_out = torch.randn_like(y)
    (grad,) = torch.autograd.grad((y * grad_out).sum(), block.gate.gate.weight)
    (grad_ref,) = torch.autograd.grad((y_ref * grad_out).sum(), block.gate.gate.weight)
    torch.testing.assert_close(grad, grad_ref)
    assert grad.abs().sum() > 0
    smoe = block_with('smoe', 1)
    (smoe_grad,) = torch.autograd.grad((smoe.moe(x) * grad_out).sum(), smoe.gate.gate.weight)
    assert smoe_grad.abs().sum() == 0


def test_switch_jitter_scales_the_router_input_in_training_only_within_one_plus_minus_eps():
    gate = identity_router(SwitchGate, top_k=1, jitter=0.01)
    x = torch.rand(4000, E) + 0.5                                        # positive: the ratio is the factor
    torch.manual_seed(1)
    _, _, logits = gate.train()(x, return_logits=True)
    factor = logits / x                                                  # [T, E]
    assert factor.min() >= 0.99 - 1e-6 and factor.max() <= 1.01 + 1e-6
    assert factor.min() < 0.9905 and factor.max() > 1.0095               # spread over the whole interval
    assert abs(factor.mean().item() - 1) < 1e-3
    torch.manual_seed(1)                                                 # the global RNG: reproducible
    assert torch.equal(gate(x, return_logits=True)[2], logits)
    assert torch.equal(gate.eval()(x, return_logits=True)[2], x)         # evaluation: no jitter
    assert torch.equal(identity_router(SwitchGate, top_k=1, jitter=0.0)(x, return_logits=True)[2], x)


def test_switch_jitter_outside_zero_one_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(['--moe', '--gate_name', 'switch', '--switch_jitter', '1.5'])
    assert '--switch_jitter must be in [0, 1)' in capsys.readouterr().err
    with pytest.raises(ValueError, match='jitter must be in'):
        SwitchGate(D, E, jitter=-0.1)


# ----------------------------------------------------------------------------- GShard

def test_gshard_drops_the_second_expert_at_rate_one_minus_two_g2():
    """Logits (2, 1, -5, -5): g2 = e^1 / (e^2 + e^1) = 0.2689 normalised over the top two, kept with
    probability 2 g2 = 0.5379; a tie of the top two (g2 = 1/2) is always kept."""
    gate = identity_router(GShardGate, top_k=2).train()
    n = 20000
    x = torch.tensor([2.0, 1.0, -5.0, -5.0]).repeat(n, 1)
    torch.manual_seed(0)
    top_idx, top_score = gate(x)
    g2 = math.exp(1) / (math.exp(2) + math.exp(1))
    dropped = int((top_idx[:, 1] == -1).sum())
    assert abs(dropped - n * (1 - 2 * g2)) < binomial_bound(n, 1 - 2 * g2)
    assert set(top_idx[:, 0].tolist()) == {0} and set(top_idx[:, 1].tolist()) == {-1, 1}
    torch.testing.assert_close(top_score, torch.tensor([1 - g2, g2]).repeat(n, 1))   # g1 not renormalised
    tie = torch.tensor([1.0, 1.0, -5.0, -5.0]).repeat(n, 1)
    assert (gate(tie)[0] >= 0).all()


def test_gshard_drops_the_second_expert_in_evaluation_too_the_same_draws_every_evaluation():
    """Algorithm 1 (Lepikhin et al. 2021) has no training condition, and Mesh TensorFlow's default is
    second_policy_eval="random": in evaluation the second expert is dropped at rate 1 - 2 g2 too, from the gate's
    own seeded stream, so two evaluations give the same routing and the global RNG is left as it was."""
    gate = identity_router(GShardGate, top_k=2).eval()
    n = 20000
    x = torch.tensor([2.0, 1.0, -5.0, -5.0]).repeat(n, 1)
    g2 = math.exp(1) / (math.exp(2) + math.exp(1))
    torch.manual_seed(0)
    first = gate(x)[0]
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))                             # the global RNG is left untouched
    dropped = int((first[:, 1] == -1).sum())
    assert abs(dropped - n * (1 - 2 * g2)) < binomial_bound(n, 1 - 2 * g2)
    gate.train()
    gate(x)
    gate.eval()
    assert torch.equal(gate(x)[0], first)                                # the next evaluation draws the same
    other_layer = identity_router(GShardGate, top_k=2, eval_seed=1).eval()
    assert not torch.equal(other_layer(x)[0], first)                     # each layer its own seed


def test_gshard_eval_policy_all_keeps_every_second_expert_in_evaluation_only():
    gate = identity_router(GShardGate, top_k=2, eval_policy='all')
    x = torch.tensor([2.0, 1.0, -5.0, -5.0]).repeat(2000, 1)
    assert (gate.eval()(x)[0][:, 1] == 1).all()
    assert (gate.train()(x)[0][:, 1] == -1).any()
    with pytest.raises(ValueError, match='unknown GShard evaluation policy'):
        GShardGate(D, E, eval_policy='none')
    with pytest.raises(SystemExit):
        train.parse_args(['--moe', '--gate_name', 'gshard', '--gshard_eval_policy', 'none'])


def test_gshard_drop_rate_follows_each_tokens_own_gate():
    """Tokens with different g2 in one batch: each group's drop count within its binomial bound."""
    gate = identity_router(GShardGate, top_k=2).train()
    gaps = torch.tensor([0.25, 1.0, 2.5])                                # l1 - l2 of each group
    n = 8000
    x = torch.zeros(3 * n, E) - 5
    x[:, 0] = 1.0
    x[:, 1] = 1.0 - gaps.repeat_interleave(n)
    torch.manual_seed(3)
    kept = (gate(x)[0][:, 1] >= 0).view(3, n)
    for gap, kept_group in zip(gaps.tolist(), kept):
        drop = 1 - 2 / (1 + math.exp(gap))                              # 1 - 2 sigmoid(-gap)
        assert abs(int((~kept_group).sum()) - n * drop) < binomial_bound(n, drop)


# ----------------------------------------------------------------------------- noisy top-k

def noisy_gate(k=2, seed=0):
    torch.manual_seed(seed)
    gate = NoisyTopKGate(D, E, top_k=k)
    with torch.no_grad():
        gate.w_gate.normal_(0, 0.3)
        gate.w_noise.normal_(0, 0.3)
    return gate


def test_noisy_topk_starts_at_zero_and_has_no_noise_in_evaluation():
    fresh = NoisyTopKGate(D, E)
    assert not fresh.w_gate.any() and not fresh.w_noise.any()
    assert not tiny_model(gate_name='noisy_topk').moe_layers[0].gate.w_gate.any()   # the model's init leaves them
    gate = noisy_gate().eval()
    x = torch.randn(40, D)
    top_idx, top_score, logits = gate(x, return_logits=True)
    torch.testing.assert_close(logits, x @ gate.w_gate)
    clean_top = (x @ gate.w_gate).topk(2)
    assert torch.equal(top_idx, clean_top.indices)
    torch.testing.assert_close(top_score, torch.softmax(clean_top.values, -1))
    assert gate.aux_terms() == {}


def test_noisy_topk_noise_is_standard_normal_times_softplus_of_x_w_noise():
    gate = noisy_gate().train()
    x = torch.randn(1, D).repeat(20000, 1)                               # one token, many draws
    torch.manual_seed(5)
    _, _, logits = gate(x, return_logits=True)
    noise = logits - x @ gate.w_gate                                     # [N, E]
    std = F.softplus(x[0] @ gate.w_noise) + NoisyTopKGate.noise_epsilon  # [E], the paper's code's epsilon
    n = noise.size(0)
    torch.testing.assert_close(noise.std(0), std, rtol=5 / math.sqrt(2 * n), atol=0)
    assert (noise.mean(0).abs() < 5 * std / math.sqrt(n)).all()


def hand_load(clean, noisy, std, k):
    """Shazeer et al. (2017) Appendix A, token by token: P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / std_i)."""
    rows = []
    for c, h, s in zip(clean, noisy, std):
        row = []
        for i in range(len(h)):
            others = torch.cat([h[:i], h[i + 1:]]).sort(descending=True).values
            row.append(0.5 * (1 + torch.erf((c[i] - others[k - 1]) / (s[i] * math.sqrt(2)))))
        rows.append(torch.stack(row))
    return torch.stack(rows).sum(0)                                      # [E]


def test_noisy_topk_load_loss_is_the_smooth_estimators_cv_squared_with_its_gradient():
    gate = noisy_gate().train()
    x = torch.randn(12, D)
    torch.manual_seed(7)
    _, _, noisy = gate(x, return_logits=True)
    load_loss = gate.aux_terms()['load']
    torch.manual_seed(7)                                                 # the same noise, drawn by hand
    clean = x @ gate.w_gate
    std = F.softplus(x @ gate.w_noise) + NoisyTopKGate.noise_epsilon
    noisy_ref = clean + torch.randn(12, E) * std
    torch.testing.assert_close(noisy, noisy_ref)
    load = hand_load(clean, noisy_ref, std, k=2)
    expected = ((load - load.mean()) ** 2).mean() / load.mean() ** 2
    torch.testing.assert_close(load_loss, expected)
    grads = torch.autograd.grad(load_loss, [gate.w_gate, gate.w_noise])
    grads_ref = torch.autograd.grad(expected, [gate.w_gate, gate.w_noise])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
        assert g.abs().sum() > 0                                         # the load loss trains W_noise too


def test_noisy_topk_smooth_load_is_a_monte_carlo_estimate_of_staying_in_the_top_k():
    """P(x, i): redraw expert i's noise alone, the others' noisy logits fixed, and count how often i is in the top k."""
    gate = noisy_gate(k=2, seed=2).train()
    x = torch.randn(6, D)
    torch.manual_seed(11)
    with torch.no_grad():
        _, _, noisy = gate(x, return_logits=True)
        clean, std = x @ gate.w_gate, gate.noise_std(x)
    draws = 20000
    redrawn = clean + torch.randn(draws, 6, E) * std                     # [N, T, E], each expert's own redraw
    prob = torch.zeros(6, E)
    for i in range(E):
        h = noisy.expand(draws, 6, E).clone()
        h[..., i] = redrawn[..., i]
        prob[:, i] = (h.topk(2, -1).indices == i).any(-1).float().mean(0)
    estimate = prob_in_top_k(clean, noisy, std, k=2)                     # [T, E]
    assert ((estimate - prob).abs() <= 5 * (estimate * (1 - estimate) / draws).sqrt() + 1e-3).all()
    assert estimate.min() < 0.5 < estimate.max()                         # a case with both kinds of expert


def test_noisy_topk_at_k_equal_e_has_zero_load_loss():
    gate = noisy_gate(k=E).train()
    gate(torch.randn(10, D))
    assert gate.aux_terms()['load'].item() == 0


# ----------------------------------------------------------------------------- method defaults

def test_each_router_trains_with_its_papers_defaults():
    """Golden values: Switch (Fedus et al. 2022, with Mesh TF's factors), GShard (Lepikhin et al. 2021; its
    C = 2N/E for two experts per token is factor 1.0; loss coefficient of its Mesh TF code), noisy top-k
    (Shazeer et al. 2017, w_importance = w_load = 0.1)."""
    assert (SwitchGate.default_aux_losses, SwitchGate.default_capacity_factor) == ({'balance': 0.01}, (1.25, 2.0))
    assert (GShardGate.default_aux_losses, GShardGate.default_capacity_factor) == ({'balance': 0.01}, (1.0, 2.0))
    assert NoisyTopKGate.default_aux_losses == {'importance': 0.1, 'load': 0.1}
    assert NoisyTopKGate.own_aux_losses == ('load',)
    assert NoisyTopKGate.default_capacity_factor == (None, None)                           # dropless
    assert SwitchGate(D, E).top_k == 1 and GShardGate(D, E).top_k == 2


def methods_table():
    """{method: {column: cell}} of the methods table in docs/routing.md."""
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'docs', 'routing.md')) as f:
        lines = [line for line in f if line.startswith('| ')]
    header = [cell.strip() for cell in lines[0].strip().strip('|').split(' | ')]
    rows = [[cell.strip() for cell in line.strip().strip('|').split(' | ')] for line in lines[1:]]
    return {row[0]: dict(zip(header, row)) for row in rows if len(row) == len(header)}


def test_the_methods_table_states_each_routers_loss_weights_and_hypermoes_differ_from_noisy_topks():
    """Each row's auxiliary losses are its router's defaults (GATES[...].default_aux_losses); HyperMoE's are its
    scripts' (0.01 each, its LM code), next to noisy top-k's 0.1 each (Shazeer et al. 2017, Appendix C.1)."""
    table = methods_table()
    for method, row in table.items():
        if method == 'HyperMoE':
            with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'script', 'table1',
                                   'hypermoe_enwik8.sh')) as f:
                script = f.read()
            assert '--importance_loss 0.01' in script and '--load_loss 0.01' in script
            expected = 'importance 0.01, load 0.01'
        else:
            gate_name = row['`--gate_name`'].split('`')[1]
            weights = GATES[gate_name].default_aux_losses
            expected = ', '.join(f'{name} {weight:g}' for name, weight in weights.items()) or 'none'
        assert row['auxiliary losses (weight)'].startswith(expected), method
    assert 'Appendix C.1' in table['Noisy top-k']['auxiliary losses (weight)']
    assert 'tensor2tensor' in table['Noisy top-k']['auxiliary losses (weight)']


# ----------------------------------------------------------------------------- Tables A3 / A4

@pytest.mark.parametrize('gate_name,router_weights', [('switch', 1), ('gshard', 1), ('noisy_topk', 2)])
def test_param_counts_put_every_router_matrix_in_the_router_column(gate_name, router_weights):
    """Per MoE layer the router is W [E, d] without bias (noisy top-k: W_g and W_noise); the rest as SMoE's."""
    counts, smoe = param_breakdown(tiny_model(gate_name=gate_name)), param_breakdown(tiny_model())
    n_layer, d, n_expert = TINY['n_layer'], TINY['d_model'], 4
    assert counts['router'] == n_layer * router_weights * n_expert * d
    assert smoe['router'] == n_layer * (n_expert * d + n_expert)         # SMoE's router has a bias
    assert counts['transformer'] == smoe['transformer']
    assert counts['trainable'] == counts['total'] == counts['router'] + counts['transformer']
    _, status = analysis.param_row(tiny_model(gate_name=gate_name))
    assert status['router'] == 'T'


@pytest.mark.parametrize('gate_name', ['switch', 'gshard', 'noisy_topk'])
def test_inference_flops_are_smoes_every_router_one_d_by_e_product(gate_name):
    """In evaluation each router is one [T, d] @ [d, E] product (no jitter, no noise: W_noise costs nothing),
    SMoE's too (its bias add is no matmul); the counts agree with SMoE's, and the router's share is 2 T d E."""
    bsz, qlen, mlen = 2, 6, 6
    for k in (1, 2):
        counted = analysis.count_eval_flops(tiny_model(gate_name=gate_name), k, bsz, qlen, mlen)
        assert counted == analysis.count_eval_flops(tiny_model(), k, bsz, qlen, mlen)
        thor = analysis.count_eval_flops(tiny_model(gate_name='thor'), k, bsz, qlen, mlen)
        assert counted - thor == TINY['n_layer'] * 2 * bsz * qlen * TINY['d_model'] * 4


# ----------------------------------------------------------------------------- end to end

ROUTERS_A = ['switch', 'gshard', 'noisy_topk']
TOP_K = {'switch': '1', 'gshard': '2', 'noisy_topk': '2'}
RUN_FLAGS = ['--max_step', '4', '--eval-interval', '2', '--log-interval', '1', '--lr', '0.01', '--eval_ks', '1,2']



def train_run(work, synthetic_dir, gate_name, *extra):
    train.main(['--dataset', 'synthetic', '--data', synthetic_dir, '--work_dir', work, *TINY_ARGS, *MOE_ARGS,
                '--gate_name', gate_name, '--moe-top-k', TOP_K[gate_name], *RUN_FLAGS, *extra])
    return sorted(glob.glob(f'{work}-synthetic/*'))[-1]


@pytest.mark.parametrize('gate_name', ROUTERS_A)
def test_router_trains_resumes_exactly_evaluates_at_k_1_and_2_and_is_analysed(gate_name, synthetic_dir, tmp_path,
                                                                              capsys):
    whole = train_run(str(tmp_path / 'a'), synthetic_dir, gate_name)
    split = train_run(str(tmp_path / 'b'), synthetic_dir, gate_name, '--stop_step', '2')
    train.main(['--dataset', 'synthetic', '--data', synthetic_dir, *TINY_ARGS, *MOE_ARGS, '--gate_name', gate_name,
                '--moe-top-k', TOP_K[gate_name], *RUN_FLAGS, '--restart', '--restart_dir', split])
    drop_speed = lambda rows: [{k: v for k, v in r.items() if k != 'tokens_per_s'} for r in rows]  # noqa: E731
    assert drop_speed(read_metrics(split)) == drop_speed(read_metrics(whole))      # the noise drawn again alike
    with open(os.path.join(whole, 'results.json')) as f:
        results = json.load(f)
    method = evaluation.method_name({'moe': True, 'gate_name': gate_name})
    assert {e['method'] for e in results} == {method}
    assert all(set(e['results']) == {'1', '2'} and all(map(math.isfinite, e['results'].values())) for e in results)
    capsys.readouterr()
    for command in (['--entropy'], ['--load'], ['--flops'], ['--params'], ['--jacobian', '--max_tokens', '40'],
                    ['--routers', '--tokens', '3', '--out', str(tmp_path / 'routers.png')]):
        eval_script.main([command[0], whole, *command[1:], '--max_eval_steps', '2'])
        assert method in capsys.readouterr().out, command[0]
