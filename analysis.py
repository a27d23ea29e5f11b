"""Analyses of trained runs: the paper's router tables and figures, and the Jacobian of its Section 3.3.

    router entropy per layer (Tables 4 / A5), expert load   router_stats, format_entropy_table, format_load_table,
                                                            format_entropy_over_seeds, format_load_profile
    inference FLOPs at each k (Table A3)                    count_eval_flops (PyTorch's FlopCounterMode)
    parameters (Table A4)                                   format_param_table
    router term of dL/dh (Section 3.3, Eqs. 3-4)            router_terms, spectrum, jacobian_rows
    Figure 1 (metric vs k), 3 (the three methods), 4 (the routers' softmax), load heat-map, Jacobian spectra:
    drawn by figures.py from what is computed here

Every analysis reads a run directory written by train.py and runs on the CPU, whatever device trained it.
Runs that differ only in seed are one configuration (seeds.group_runs): entropy, load and Figure 1 report
their mean ± sample std over the seeds; the analyses of one model's weights or shape take its first run.
The command line is eval.py's, in analysis_commands.py (`python eval.py --help`).

Shapes: N tokens, T window length, B batch, d = d_model, E experts, L MoE layers.
"""
import contextlib
import math
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import evaluation
from capacity import DEFAULT_GROUP_SIZE
from data_utils import get_lm_corpus
from figures import entropy_of
from hyper_router import HyperRouterGate, moe_gates, param_breakdown, set_top_k
from mem_transformer import MemTransformerLM
from moe import moe_blocks, record_router_stats, set_capacity
from seeds import group_runs, mean_std, read_config

CHECKPOINT_FILES = {**evaluation.CHECKPOINTS, 'last': evaluation.LAST_CHECKPOINT}
DEFAULT_JACOBIAN_CHECKPOINTS = 'init,best,best_dense,last'


# ----------------------------------------------------------------------------- runs and checkpoints

def load_model(run_dir, checkpoint='best_dense'):
    """(checkpoint dict, model on the CPU in eval mode).

    `checkpoint`: a kind (best, best_dense, last), a file of the run, a path, or `init`: the model at
    step 0, rebuilt from the run's config and seed exactly as train.py builds it (SMoE-Dropout's router
    and every hypernetwork are the trained model's; tests/test_analysis.py checks it).
    """
    if checkpoint == 'init':
        config = read_config(run_dir)
        torch.manual_seed(config['args']['seed'])
        model = MemTransformerLM(**dict(config['model_config'], moe_backend='auto'))
        set_capacity(model, config['args'].get('capacity_factor'), config['args'].get('eval_capacity_factor'),
                     config['args'].get('capacity_group_size', DEFAULT_GROUP_SIZE))
        return dict(config, step=0), model.eval()
    path = os.path.join(run_dir, CHECKPOINT_FILES.get(checkpoint, checkpoint))
    if not os.path.isfile(path) and os.path.isfile(checkpoint):
        path = checkpoint
    ckpt = evaluation.load_checkpoint(path)
    return ckpt, evaluation.model_from_checkpoint(ckpt)


def config_groups(run_dirs):
    """[(label, [run_dir, ...], model_config)]: the runs grouped by configuration (those that differ only in seed
    are one group), labelled with the paper's method name (seeds.group_runs)."""
    configs = [read_config(d) for d in run_dirs]
    groups = group_runs(configs, [evaluation.method_name(c['model_config']) for c in configs])
    return [(label, [run_dirs[i] for i in members], configs[members[0]]['model_config']) for label, members in groups]


def first_seeds(groups):
    """[(label, run_dir, model_config)]: one run per configuration, for analyses of one model's weights (the
    routers' softmax, the Jacobian) or of its shape (FLOPs, parameters); a note says which run stands for several."""
    for label, run_dirs, _ in groups:
        if len(run_dirs) > 1:
            print(f'{label}: {len(run_dirs)} runs differing only in seed; analysing the first, {run_dirs[0]}',
                  file=sys.stderr)
    return [(label, run_dirs[0], cfg) for label, run_dirs, cfg in groups]


def eval_iterator(ckpt, split='test', data=None):
    args = ckpt['args']
    corpus = get_lm_corpus(data or args['data'], args['dataset'])
    return corpus.get_iterator(split, evaluation.EVAL_BATCH_SIZE, args['eval_tgt_len'], ext_len=args['ext_len'])


def prepare(model, ckpt, k=None):
    """Evaluation lengths of the run, and k (default: the run's --moe-top-k, the k of its 'best' validation)."""
    model.reset_length(*evaluation.eval_lengths(ckpt['args']))
    cfg = ckpt['model_config']
    k = min(k or cfg['moe_top_k'], cfg['moe_num_expert'])
    set_top_k(model, k)
    return k


# ----------------------------------------------------------------------------- entropy and load (Tables 4 / A5)

def router_stats(model, eval_iter, args, max_eval_steps=-1):
    """{layer: RouterStats} over a split, run as eval.py evaluates it (memory carried across windows)."""
    with record_router_stats(model) as stats:
        evaluation.evaluate(model, eval_iter, args, max_eval_steps)
    return stats


def format_entropy_table(rows):
    """Table A5 shape: one row per method, one column per router (layer i + 1), 'mean ± std' in nats."""
    layers = sorted({i for stats in rows.values() for i in stats})
    width = max(14, *(len(label) + 2 for label in rows))
    lines = [f"{'Method':<{width}}" + ''.join(f'{f"Router {i + 1}":>17}' for i in layers)]
    for label, stats in rows.items():
        cells = [f'{stats[i].mean_entropy:.4f} ± {stats[i].std_entropy:.2f}' if i in stats else '-' for i in layers]
        lines.append(f'{label:<{width}}' + ''.join(f'{c:>17}' for c in cells))
    return '\n'.join(lines)


def n_experts(stats):
    """E of {layer: RouterStats}."""
    return next(iter(stats.values())).load.numel()


def format_load_table(label, stats):
    """Per layer, the percentage of routed (token, slot) pairs that each expert received (the router's choice),
    max / mean, and the percentage of those pairs dropped over the experts' capacity (0 when dropless)."""
    n_expert = n_experts(stats)
    lines = [f'{label}: expert load (% of routed token slots; uniform = {100 / n_expert:.1f} %)',
             'layer' + ''.join(f'{f"e{e}":>6}' for e in range(n_expert)) + '  max/mean  dropped %']
    for i, s in stats.items():
        frac = s.load_fraction
        lines.append(f'{i + 1:>5}' + ''.join(f'{100 * f:6.1f}' for f in frac) + f'{max(frac) * n_expert:10.2f}'
                     + f'{100 * s.drop_fraction:11.1f}')
    return '\n'.join(lines)


def format_entropy_over_seeds(values):
    """Table A5 shape over seeds: {label: {layer: [mean entropy of each seed's run]}} -> 'mean ± std' cells."""
    layers = sorted({i for layer_values in values.values() for i in layer_values})
    labels = {label: f'{label} (n={len(next(iter(v.values())))})' for label, v in values.items()}
    width = max(14, *(len(text) + 2 for text in labels.values()))
    lines = [f"{'Method':<{width}}" + ''.join(f'{f"Router {i + 1}":>17}' for i in layers)]
    for label, layer_values in values.items():
        cells = []
        for i in layers:
            mean, std = mean_std(layer_values[i]) if i in layer_values else (None, None)
            cells.append('-' if mean is None else f'{mean:.4f}' + ('' if std is None else f' ± {std:.4f}'))
        lines.append(f'{labels[label]:<{width}}' + ''.join(f'{c:>17}' for c in cells))
    return '\n'.join(lines)


def format_load_profile(label, layers, dropped_by_layer):
    """Per layer, the load of the experts sorted from the most used (mean over seeds, %; an expert's number means
    nothing across seeds), max / mean and the % of routed slots dropped over capacity ({layer: [fraction of each
    seed's run]}), as mean ± sample std over seeds."""
    n_expert, n_runs = len(next(iter(layers.values()))[0]), len(next(iter(layers.values())))
    lines = [f'{label}: expert load sorted from the most used expert, mean of {n_runs} seeds '
             f'(% of routed token slots; uniform = {100 / n_expert:.1f} %)',
             'layer' + ''.join(f'{f"#{r + 1}":>6}' for r in range(n_expert)) + f"{'max/mean':>16}{'dropped %':>16}"]
    for i, runs in layers.items():
        mean_profile = [mean_std([run[r] for run in runs])[0] for r in range(n_expert)]
        peak = mean_std_cell([run[0] * n_expert for run in runs], 2)
        dropped = mean_std_cell([100 * fraction for fraction in dropped_by_layer[i]], 1)
        lines.append(f'{i + 1:>5}' + ''.join(f'{100 * f:6.1f}' for f in mean_profile) + f'{peak:>16}{dropped:>16}')
    return '\n'.join(lines)


def mean_std_cell(values, digits):
    """'mean ± std' of the values, the mean alone for one value (a method run with one seed beside others)."""
    mean, std = mean_std(values)
    return f'{mean:.{digits}f}' + ('' if std is None else f' ± {std:.{digits}f}')


# ----------------------------------------------------------------------------- FLOPs (Table A3)

def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one that F.scaled_dot_product_attention
# dispatches to under no_grad (it would count the attention products as zero); same formula, its CPU op.
CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_eval_flops(model, k, bsz=evaluation.EVAL_BATCH_SIZE, qlen=128, mlen=896):
    """FLOPs of one evaluation forward (bsz columns of qlen tokens, memory of mlen states full), counted by
    torch.utils.flop_counter.FlopCounterMode (matmuls, 2 per multiply-add) on the inference path."""
    if k is not None:
        set_top_k(model, k)
    model.eval().reset_length(qlen, 0, mlen)
    data = torch.zeros(qlen, bsz, dtype=torch.long)           # the count does not depend on the tokens
    mems = [torch.zeros(mlen, bsz, model.d_model) for _ in range(model.n_layer + 1)]
    with torch.no_grad():
        model(data, data, *mems)        # HyperRouter generates its routers once, then reuses them (paper C.4)
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
            model(data, data, *mems)
    return counter.get_total_flops()


def flops_over_k(model, cfg, ks, qlen, mlen):
    """{'k': FLOPs} for an MoE model (k <= E), or {'dense': FLOPs}."""
    if not cfg['moe']:
        return {'dense': count_eval_flops(model, None, qlen=qlen, mlen=mlen)}
    return {str(k): count_eval_flops(model, k, qlen=qlen, mlen=mlen) for k in ks if k <= cfg['moe_num_expert']}


def format_flops_table(columns):
    """Table A3 shape (rows k, columns methods; in 1e10 FLOPs as the paper for its model, in the power of ten
    that leaves 1 to 100 for others), then FLOPs(k = 1) / FLOPs(largest k) per method."""
    exponent = max(0, int(math.log10(max(v for res in columns.values() for v in res.values()))))
    table = evaluation.format_table(
        {name: {k: v / 10 ** exponent for k, v in res.items()} for name, res in columns.items()}, 'FLOPs')
    ratios = [f'{name} {res["1"] / res[max(res, key=int)]:.2f}' for name, res in columns.items() if '1' in res]
    return '\n'.join([f'Inference FLOPs (1e{exponent}) of one evaluation batch', table,
                      'FLOPs(k = 1) / FLOPs(largest k): ' + ', '.join(ratios)])


# ----------------------------------------------------------------------------- parameters (Table A4)

def param_row(model):
    """param_breakdown plus the status of each category: T trainable, F frozen, G generated each step."""
    counts = param_breakdown(model)
    gates = [gate for _, gate in moe_gates(model)]
    if any(isinstance(g, HyperRouterGate) for g in gates):
        router = 'G'
    else:
        router = 'T' if any(p.requires_grad for g in gates for p in g.parameters()) else 'F'
    return counts, {'router_embedding': 'T', 'router': router, 'hypernetwork': 'F', 'hyper_expert': 'T',
                    'transformer': 'T'}


def format_param_table(rows):
    """Table A4 shape: Router Emb. | Router | HyperNetwork | Transformer, then the trainable/frozen/generated totals;
    a HyperExpert column (HyperMoE's embeddings, MLPs and hypernetwork) when a model has one."""
    columns = [('router_embedding', 'Router Emb.'), ('router', 'Router'), ('hypernetwork', 'HyperNetwork'),
               ('transformer', 'Transformer')]
    if any(counts['hyper_expert'] for counts, _ in rows.values()):
        columns.insert(3, ('hyper_expert', 'HyperExpert'))
    totals = [('trainable', 'trainable'), ('frozen', 'frozen'), ('generated_router', 'generated')]
    width = max(14, *(len(label) + 2 for label in rows))
    lines = [f"{'Method':<{width}}" + ''.join(f'{title:>16}' for _, title in columns + totals)]
    for label, (counts, status) in rows.items():
        cells = [f'{counts[key]:,} ({status[key]})' if counts[key] else '-' for key, _ in columns]
        cells += [f'{counts[key]:,}' for key, _ in totals]
        lines.append(f'{label:<{width}}' + ''.join(f'{c:>16}' for c in cells))
    lines.append('T trainable, F frozen, G generated by the hypernetwork at every step (not a parameter)')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------- Jacobian (Section 3.3)

@contextlib.contextmanager
def router_term_probe(blocks):
    """Within the block the router of each MoE block reads h + delta, delta a zero leaf [N, d] made at each
    forward. The experts still read h, so after a backward delta.grad is exactly J2^T dL/dy = sum_i c_i W_{r,i}
    (Eqs. 3-4): the part of dL/dh that flows through the router's scores. The forward is unchanged.
    blocks: {layer: MoEPositionwiseFF}; yields {layer: [delta of each forward]}.
    """
    deltas, handles = {}, []
    for i, block in blocks.items():
        deltas[i] = []

        def add_delta(gate, args, kwargs, store=deltas[i]):
            delta = torch.zeros_like(args[0], requires_grad=True)
            store.append(delta)
            return (args[0] + delta, *args[1:]), kwargs
        handles.append(block.gate.register_forward_pre_hook(add_delta, with_kwargs=True))
    try:
        yield deltas
    finally:
        for handle in handles:
            handle.remove()


def router_terms(model, eval_iter, max_tokens=2048):
    """{layer: [N, d]} router terms of the loss (mean NLL of each window) for the first max_tokens tokens.

    Windows run in order with the memory carried, as in evaluation, with gradients on and dropout off.
    """
    collected = {}
    mems = ()
    with router_term_probe(moe_blocks(model)) as deltas:
        for data, target, _ in eval_iter:
            out = model(data, target, *mems)
            mems = out[1:]
            layers = list(deltas)
            inputs = [deltas[i][-1] for i in layers]
            # a router that ignores its input (THOR's random gate) has no router term: unused, zero
            grads = torch.autograd.grad(out[0].float().mean(), inputs, allow_unused=True)
            for i, delta, grad in zip(layers, inputs, grads):
                collected.setdefault(i, []).append(torch.zeros_like(delta) if grad is None else grad)
                deltas[i].clear()
            if sum(g.size(0) for g in collected[layers[0]]) >= max_tokens:
                break
    return {i: torch.cat(g)[:max_tokens] for i, g in collected.items()}


def spectrum(terms, rtol=1e-5):
    """Singular values of the rows [N, d] (float64, normalised by the largest), the numerical rank (those above
    rtol; float32 rounding leaves the others near 1e-7) and the effective rank exp(H(s / sum s))
    (Roy & Vetterli 2007), with an orthonormal basis [rank, d] of the span."""
    _, s, vh = torch.linalg.svd(terms.double(), full_matrices=False)
    if not len(s) or s[0] == 0:                                     # no term at all (THOR: no router)
        return {'s': s, 'rank': 0, 'effective_rank': 0.0, 'basis': vh[:0]}
    s = s / s[0]
    rank = int((s > rtol).sum())
    p = s[s > 0] / s.sum()
    return {'s': s, 'rank': rank, 'effective_rank': math.exp(-(p * p.log()).sum().item()), 'basis': vh[:rank]}


def principal_cosines(a, b):
    """Cosines of the principal angles between the spans of two orthonormal bases [r, d], largest first."""
    return torch.linalg.svdvals(a @ b.T).clamp(max=1)


def subspace_overlap(a, b):
    """(mean squared cosine, largest angle in degrees) of the principal angles between two spans:
    (1, 0) when one span contains the other, (0, 90) when they are orthogonal."""
    cos = principal_cosines(a, b)
    if not len(cos):
        return float('nan'), float('nan')
    return cos.square().mean().item(), math.degrees(math.acos(cos[-1].item()))


def jacobian_rows(run_dir, checkpoints, data=None, split='test', max_tokens=2048, k=None, rtol=1e-5):
    """One row per (checkpoint, MoE layer): rank and effective rank of the router term, overlap of its span
    with the first checkpoint's and the rank of the union of the spans seen so far (training drift)."""
    loaded = []
    for name in checkpoints:
        try:
            ckpt, model = load_model(run_dir, name)
        except FileNotFoundError:
            print(f'{run_dir}: no checkpoint {name!r}, skipped', file=sys.stderr)
            continue
        if ckpt['step'] not in {c['step'] for _, c, _ in loaded}:   # best_dense and last are often one state
            loaded.append((name, ckpt, model))
    rows, first, union = [], {}, {}
    for name, ckpt, model in sorted(loaded, key=lambda item: item[1]['step']):
        used_k = prepare(model, ckpt, k)
        terms = router_terms(model, eval_iterator(ckpt, split, data), max_tokens)
        for layer, g in terms.items():
            spec = spectrum(g, rtol)
            first.setdefault(layer, spec['basis'])
            union[layer] = torch.cat([union.get(layer, spec['basis'][:0]), spec['basis']])
            overlap, angle = subspace_overlap(first[layer], spec['basis'])
            rows.append({'checkpoint': name, 'step': ckpt['step'], 'layer': layer, 'k': used_k, 'tokens': len(g),
                         'rank': spec['rank'], 'effective_rank': spec['effective_rank'], 's': spec['s'].tolist(),
                         'overlap_first': overlap, 'angle_first': angle,
                         'union_rank': spectrum(union[layer], rtol)['rank']})
    return rows


def format_jacobian_table(label, cfg, rows):
    n_expert = cfg['moe_num_expert']
    title = (f'{label}: router term J2^T dL/dy of dL/dh, d = {cfg["d_model"]}, E = {n_expert} '
             f'(one router spans <= E - 1 = {n_expert - 1} dims: its softmax ignores a shift of all logits)')
    header = (f"{'checkpoint':<12}{'step':>8}{'k':>4}{'router':>7}{'tokens':>8}{'rank':>6}{'eff.rank':>10}"
              f"{'overlap w/ first':>18}{'max angle':>11}{'union rank':>12}")
    lines = [title, header]
    if all(r['rank'] == 0 for r in rows):
        lines[0] += '; none here: the routing does not read h (no angles to measure)'
    for r in rows:
        lines.append(f"{r['checkpoint']:<12}{r['step']:>8}{r['k']:>4}{r['layer'] + 1:>7}{r['tokens']:>8}{r['rank']:>6}"
                     f"{r['effective_rank']:>10.2f}{r['overlap_first']:>18.3f}{r['angle_first']:>10.1f}°"
                     f"{r['union_rank']:>12}")
    return '\n'.join(lines)


# ----------------------------------------------------------------------------- routers' outputs (Figure 4)

def router_probabilities(model, eval_iter, args, tokens):
    """{token: {layer: [E]}}: the full softmax of every router at position `token` of the split's first
    batch column, with the context it has in evaluation (windows in order, memory carried)."""
    tgt_len = args['eval_tgt_len']
    logits, probs, handles = {}, {}, []
    for i, block in moe_blocks(model).items():
        def keep(gate, inputs, output, layer=i):
            logits[layer] = output[2]                                 # gate(x, return_logits=True)[2]: [T * B, E]
        handles.append(block.gate.register_forward_hook(keep))
    try:
        mems = ()
        with torch.no_grad():
            for window, (data, target, _) in enumerate(eval_iter):
                if window > max(tokens) // tgt_len:
                    break
                mems = model(data, target, *mems)[1:]
                for t in (t for t in tokens if t // tgt_len == window):
                    row = (data.size(0) - target.size(0) + t % tgt_len) * data.size(1)   # rows are [T * B]; column 0
                    probs[t] = {i: torch.softmax(lg[row].float(), -1) for i, lg in logits.items()}
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(tokens) - set(probs))
    if missing:
        raise ValueError(f'tokens {missing} lie beyond the first column of the split')
    return probs


def format_router_outputs(label, probs):
    lines = []
    for t, layers in probs.items():
        cells = [f'router {i + 1}: H {entropy_of(p):.2f}, top {p.argmax().item()} ({p.max().item():.2f})'
                 for i, p in layers.items()]
        lines.append(f'{label}, token {t}: ' + '; '.join(cells))
    return '\n'.join(lines)
