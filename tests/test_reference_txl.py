"""Transformer-XL against a naive reference written from Dai et al. (2019), and against golden losses
produced by the reference implementation (kimiyoung/transformer-xl, tests/fixtures/txl_reference_losses.json).

The naive reference below shares nothing with mem_transformer.py but the parameter names: every
attention score is computed for its own (query i, key j) pair from the paper's four terms, with the
relative position embedding of that pair's distance (no shift trick, no fused kernel), in float64.
Weights are spread wide (`spread_state`) so that every term of the model moves the loss far above
float32 noise. Shapes: T segment length, M memory length, K = M + T keys, B batch, H heads, D d_head.
"""
import json
import math
import os

import pytest
import torch

from mem_transformer import MemTransformerLM
from tests.test_moe import naive_moe

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'txl_reference_losses.json')
BASE = dict(n_token=37, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=12, dropout=0.0, dropatt=0.0,
            tgt_len=5, mem_len=7)
MOE = dict(moe=True, moe_num_expert=4, moe_top_k=2, gate_name='smoe')
N_SEGMENTS, BATCH = 3, 3
VARIANTS = {
    'post_lnorm_with_memory': {},
    'without_memory': dict(mem_len=0),
    'same_length': dict(same_length=True),
    'clamp_len': dict(clamp_len=3),
    'pre_lnorm': dict(pre_lnorm=True),
    'adaptive_softmax': dict(cutoffs=[10, 25], div_val=2, tie_projs=[False, True, True]),
    'projected_softmax': dict(d_embed=8, tie_projs=[True]),
    'smoe': MOE,
    'hyper_router_in_layer_1': dict(MOE, gate_name='hyper_router', moe_top_k=1, hyper_size=6, moe_index='1'),
    'pre_lnorm_same_length_clamp_len_smoe': dict(MOE, pre_lnorm=True, same_length=True, clamp_len=3),
}
# dense configurations the reference implementation also runs (tests/fixtures/make_txl_reference_losses.py)
GOLDEN = {name: dict(BASE, **overrides) for name, overrides in {
    'post_lnorm': {},
    'pre_lnorm_same_length_clamp_len': dict(pre_lnorm=True, same_length=True, clamp_len=3),
    'adaptive_softmax': VARIANTS['adaptive_softmax'],
    'projected_softmax': VARIANTS['projected_softmax'],
}.items()}


# ----------------------------------------------------------------------------- shared weights and data

def spread_state(model, seed):
    """The model's state_dict redrawn: every tensor U(-0.5, 0.5), LayerNorm weights 1 + U(-0.5, 0.5).

    Drawn in state_dict order from a torch.Generator seeded with `seed`, in float64; tied tensors (the
    output layers and projections shared with the embedding) are drawn once. The inv_freq buffer is kept.
    This recipe also produced the golden losses: changing it invalidates the fixture.
    """
    gen = torch.Generator().manual_seed(seed)
    drawn, state = {}, {}
    for name, tensor in model.state_dict().items():
        if name.endswith('inv_freq'):
            state[name] = tensor
            continue
        if tensor.data_ptr() not in drawn:
            value = torch.rand(tensor.shape, generator=gen, dtype=torch.float64) - 0.5
            if name.endswith('layer_norm.weight'):
                value += 1.0
            drawn[tensor.data_ptr()] = value.to(tensor.dtype)
        state[name] = drawn[tensor.data_ptr()]
    return state


def build_model(config, seed=0):
    torch.manual_seed(seed)
    model = MemTransformerLM(**config)
    model.load_state_dict(spread_state(model, seed))
    return model


def segment_tokens(config, seed=1):
    """[N_SEGMENTS * tgt_len + 1, BATCH] token ids; segment s reads rows s T .. s T + T and predicts the next."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config['n_token'], (N_SEGMENTS * config['tgt_len'] + 1, BATCH), generator=gen)


def segments(tokens, tgt_len):
    return [(tokens[s * tgt_len:(s + 1) * tgt_len], tokens[s * tgt_len + 1:(s + 1) * tgt_len + 1])
            for s in range(N_SEGMENTS)]


def run_model(model, tokens, tgt_len):
    """[(nll [T, B], new mems or None)] of consecutive segments, memory carried from one to the next."""
    mems, results = (), []
    for data, target in segments(tokens, tgt_len):
        out = model(data, target, *mems)
        mems = tuple(out[1:])
        results.append((out[0], list(mems) or None))
    return results


# ----------------------------------------------------------------------------- the naive reference

def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def sinusoid(distance, d_model):
    """R_distance: sin(distance / 10000^(2i / d)) for i < d / 2, then the cosines (the reference's order)."""
    freq = torch.tensor([10000.0 ** (-2 * i / d_model) for i in range(d_model // 2)], dtype=torch.float64)
    return torch.cat([torch.sin(distance * freq), torch.cos(distance * freq)])


def cluster_bounds(cfg):
    ends = list(cfg.get('cutoffs', [])) + [cfg['n_token']]
    return list(zip([0] + ends[:-1], ends))


def embed(params, cfg, tokens):
    """tokens [T, B] -> [T, B, d]: each token's row of its cluster's table, projected to d, times sqrt(d)."""
    div_val = cfg.get('div_val', 1)
    rows = []
    for token in tokens.reshape(-1).tolist():
        cluster = next(i for i, (start, end) in enumerate(cluster_bounds(cfg)) if start <= token < end)
        table = 0 if div_val == 1 else cluster
        start = 0 if div_val == 1 else cluster_bounds(cfg)[cluster][0]
        vector = params[f'word_emb.emb_layers.{table}.weight'][token - start]
        if f'word_emb.emb_projs.{table}' in params:
            vector = params[f'word_emb.emb_projs.{table}'] @ vector
        rows.append(vector * math.sqrt(cfg['d_model']))
    return torch.stack(rows).view(*tokens.shape, cfg['d_model'])


def visible(cfg, query_pos, key_pos):
    """Whether the query at absolute position query_pos (memory included) sees the key at key_pos:
    never the future; with same_length only the mem_len newest keys, itself included."""
    distance = query_pos - key_pos
    return distance >= 0 and (not cfg.get('same_length') or distance < cfg['mem_len'])


def attention(params, cfg, layer, h, mem):
    """Relative multi-head attention (paper Sec. 3.3) of h [T, B, d] over [mem; h] -> [T, B, d].

    score(i, j) = (q_i . k_j + q_i . W_kR R_(i-j) + u . k_j + v . W_kR R_(i-j)) / sqrt(D), the terms (a)-(d),
    u = r_w_bias, v = r_r_bias, the distance i - j clamped at clamp_len for R.
    """
    prefix = f'layers.{layer}.dec_attn.'
    n_head, d_head = cfg['n_head'], cfg['d_head']
    cat = torch.cat([mem, h])                                                  # [K, B, d]
    mlen, bsz = mem.size(0), h.size(1)
    x = layer_norm(cat, params[prefix + 'layer_norm.weight'], params[prefix + 'layer_norm.bias']) \
        if cfg.get('pre_lnorm') else cat
    w_q, w_k, w_v = params[prefix + 'qkv_net.weight'].split(n_head * d_head)  # rows: queries | keys | values
    q = (x[mlen:] @ w_q.t()).view(h.size(0), bsz, n_head, d_head)              # [T, B, H, D]
    k = (x @ w_k.t()).view(cat.size(0), bsz, n_head, d_head)                   # [K, B, H, D]
    v = (x @ w_v.t()).view(cat.size(0), bsz, n_head, d_head)                   # [K, B, H, D]
    u, v_bias = params['r_w_bias'], params['r_r_bias']                         # [H, D]
    outputs = []
    for i in range(h.size(0)):
        keys = [j for j in range(cat.size(0)) if visible(cfg, mlen + i, j)]
        scores = []
        for j in keys:
            distance = mlen + i - j
            if cfg.get('clamp_len', -1) > 0:
                distance = min(distance, cfg['clamp_len'])
            r = (params[prefix + 'r_net.weight'] @ sinusoid(distance, cfg['d_model'])).view(n_head, d_head)
            term_a = (q[i] * k[j]).sum(-1)                                     # [B, H]
            term_b = (q[i] * r).sum(-1)
            term_c = (u * k[j]).sum(-1)
            term_d = (v_bias * r).sum(-1)                                      # [H]
            scores.append((term_a + term_b + term_c + term_d) / math.sqrt(d_head))
        prob = torch.softmax(torch.stack(scores), 0)                           # [keys, B, H]
        mixed = sum(prob[n, :, :, None] * v[j] for n, j in enumerate(keys))    # [B, H, D]
        outputs.append(mixed.reshape(bsz, n_head * d_head) @ params[prefix + 'o_net.weight'].t())
    out = torch.stack(outputs)                                                 # [T, B, d]
    if cfg.get('pre_lnorm'):
        return h + out
    return layer_norm(h + out, params[prefix + 'layer_norm.weight'], params[prefix + 'layer_norm.bias'])


def feed_forward(params, cfg, layer, h):
    """The dense FFN W3 ReLU(W0 x + b0) + b3, or the MoE mixture, with residual and LayerNorm."""
    prefix = f'layers.{layer}.pos_ff.'
    ln = params[prefix + 'layer_norm.weight'], params[prefix + 'layer_norm.bias']
    x = layer_norm(h, *ln) if cfg.get('pre_lnorm') else h
    flat = x.reshape(-1, cfg['d_model'])                                       # [T * B, d]
    if prefix + 'CoreNet.0.weight' in params:
        inner = torch.relu(flat @ params[prefix + 'CoreNet.0.weight'].t() + params[prefix + 'CoreNet.0.bias'])
        out = inner @ params[prefix + 'CoreNet.3.weight'].t() + params[prefix + 'CoreNet.3.bias']
    else:
        out = naive_moe(params, prefix, flat, cfg['moe_top_k'])
    out = out.view_as(h)
    return h + out if cfg.get('pre_lnorm') else layer_norm(h + out, *ln)


def cluster_logits(params, cfg, cluster, hidden):
    """hidden [N, d] -> logits [N, cluster size] from the cluster's (possibly projected) output layer."""
    start, end = cluster_bounds(cfg)[cluster]
    if cfg.get('div_val', 1) == 1:
        weight, bias = params['crit.out_layers.0.weight'][start:end], params['crit.out_layers.0.bias'][start:end]
    else:
        weight, bias = params[f'crit.out_layers.{cluster}.weight'], params[f'crit.out_layers.{cluster}.bias']
    if f'crit.out_projs.{cluster}' in params:
        hidden = hidden @ params[f'crit.out_projs.{cluster}']                 # [N, d_embed of the cluster]
    return hidden @ weight.t() + bias


def log_probs(params, cfg, hidden):
    """hidden [N, d] -> log p(w) [N, V]; with cutoffs the adaptive softmax (Grave et al. 2017): the head
    scores the shortlist and one logit per tail cluster (cluster i in head column -i, the reference's
    layout), and p(w) = p(cluster | head) p(w | cluster)."""
    n_clusters = len(cfg.get('cutoffs', []))
    if n_clusters == 0:
        return torch.log_softmax(cluster_logits(params, cfg, 0, hidden), -1)
    projected = hidden @ params['crit.out_projs.0'] if 'crit.out_projs.0' in params else hidden
    tail_logits = projected @ params['crit.cluster_weight'].t() + params['crit.cluster_bias']
    head = torch.log_softmax(torch.cat([cluster_logits(params, cfg, 0, hidden), tail_logits], -1), -1)
    shortlist = cfg['cutoffs'][0]
    parts = [head[:, :shortlist]]
    for cluster in range(1, n_clusters + 1):
        column = shortlist + n_clusters - cluster
        parts.append(head[:, column:column + 1] + torch.log_softmax(cluster_logits(params, cfg, cluster, hidden), -1))
    return torch.cat(parts, -1)


def naive_forward(params, cfg, data, target, mems):
    """One segment: (nll [T, B], new mems: per layer input [mem; h] keeping the last mem_len, or None)."""
    h = embed(params, cfg, data)                                               # [T, B, d]
    hiddens = [h]
    for layer in range(cfg['n_layer']):
        mem = mems[layer] if mems else h.new_zeros(0, *h.shape[1:])
        h = feed_forward(params, cfg, layer, attention(params, cfg, layer, h, mem))
        hiddens.append(h)
    logp = log_probs(params, cfg, h.reshape(-1, cfg['d_model']))               # [T * B, V]
    nll = -logp.gather(1, target.reshape(-1, 1)).view_as(target)
    if cfg['mem_len'] <= 0:
        return nll, None
    old = mems or [h.new_zeros(0, *h.shape[1:])] * len(hiddens)
    # memories are constants for the next segment: the paper's stop-gradient SG(m)
    return nll, [torch.cat([m, s])[-cfg['mem_len']:].detach() for m, s in zip(old, hiddens)]


def run_naive(params, cfg, tokens):
    mems, results = None, []
    for data, target in segments(tokens, cfg['tgt_len']):
        nll, mems = naive_forward(params, cfg, data, target, mems)
        results.append((nll, mems))
    return results


def float64_state(model):
    return {name: tensor.double() for name, tensor in model.state_dict().items()}


def assert_same_segments(got, expected, atol, rtol):
    for s, ((nll, mems), (nll_ref, mems_ref)) in enumerate(zip(got, expected)):
        torch.testing.assert_close(nll.double(), nll_ref, atol=atol, rtol=rtol, msg=lambda m: f'segment {s} nll: {m}')
        assert (mems is None) == (mems_ref is None)
        for layer, (mem, mem_ref) in enumerate(zip(mems or [], mems_ref or [])):
            torch.testing.assert_close(mem.double(), mem_ref, atol=atol, rtol=rtol,
                                       msg=lambda m: f'segment {s} memory {layer}: {m}')


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize('mode', ['train', 'eval'])
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_model_matches_naive_reference_over_three_segments(variant, mode):
    """Losses and new memories of 3 consecutive segments; train mode (dropout 0) runs the explicit
    attention path, eval mode under no_grad the fused one."""
    cfg = dict(BASE, **VARIANTS[variant])
    model = build_model(cfg).train(mode == 'train')
    tokens = segment_tokens(cfg)
    with torch.set_grad_enabled(mode == 'train'):
        got = run_model(model, tokens, cfg['tgt_len'])
    expected = run_naive(float64_state(model), cfg, tokens)
    assert_same_segments(got, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_gradients_match_naive_reference(variant):
    """Gradients of the summed mean losses of 3 segments w.r.t. every parameter, model in float64."""
    cfg = dict(BASE, **VARIANTS[variant])
    model = build_model(cfg).double().train()
    tokens = segment_tokens(cfg)
    sum(nll.mean() for nll, _ in run_model(model, tokens, cfg['tgt_len'])).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    params = model.state_dict(keep_vars=True)                                  # the model's own leaves
    sum(nll.mean() for nll, _ in run_naive(params, cfg, tokens)).backward()
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    assert 'r_r_bias' in grads and 'r_w_bias' in grads
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], atol=1e-6, rtol=1e-5, msg=lambda m: f'{name}: {m}')


def load_golden():
    with open(FIXTURE) as f:
        return json.load(f)


def weight_checksum(model):
    """Sum of every entry of the state_dict: tells whether `spread_state` still draws the fixture's weights."""
    return sum(tensor.double().sum().item() for tensor in model.state_dict().values())


@pytest.mark.parametrize('name', sorted(GOLDEN))
def test_golden_fixture_was_made_from_these_configurations_and_weights(name):
    golden = load_golden()
    assert golden['configs'][name] == GOLDEN[name]
    assert weight_checksum(build_model(GOLDEN[name])) == pytest.approx(golden['weight_checksums'][name], rel=1e-12), \
        'spread_state no longer draws the weights the fixture was made with (torch RNG change?): regenerate it'


@pytest.mark.parametrize('implementation', ['model_train', 'model_eval', 'naive'])
@pytest.mark.parametrize('name', sorted(GOLDEN))
def test_losses_match_the_reference_implementation(name, implementation):
    """Per-token losses of 3 segments with memory equal those kimiyoung/transformer-xl computed on the
    same weights and tokens (float32, so 1e-5); the naive reference is held to them as well."""
    cfg = GOLDEN[name]
    model = build_model(cfg).train(implementation == 'model_train')
    tokens = segment_tokens(cfg)
    if implementation == 'naive':
        got = [nll for nll, _ in run_naive(float64_state(model), cfg, tokens)]
    else:
        with torch.set_grad_enabled(implementation == 'model_train'):
            got = [nll for nll, _ in run_model(model, tokens, cfg['tgt_len'])]
    expected = torch.tensor(load_golden()['losses'][name], dtype=torch.float64)      # [segment, T, B]
    torch.testing.assert_close(torch.stack(got).double(), expected, atol=1e-5, rtol=1e-5)
