"""The figures of the analyses (matplotlib, file output only): Figures 1, 3 and 4 of the paper, the
router entropy, the expert-load heat-map (sorted load profiles over seeds) and the spectra of the Jacobian's
router term. analysis.py computes what they show; with several seeds a figure draws the mean and ± one
sample standard deviation (error bars or a band).
"""
import os

import torch

from output_files import save_figure
from seeds import mean_std

YELLOW, GREY = '#f6d55c', '#c8c8c8'


def entropy_of(p):
    """Entropy (nats) of one probability vector."""
    return -(p * p.clamp(min=1e-30).log()).sum().item()


def pyplot():
    """pyplot on the file-only Agg backend (no display needed); imported only when a figure is drawn."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save(fig, out):
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    save_figure(fig, out)
    pyplot().close(fig)
    print(f'wrote {out}')


def plot_metric_vs_k(summaries, out):
    """Figure 1: test metric (log scale) against the k used at inference, one line per method; a dense model
    is a dashed horizontal line, the corpus floor (when known) a dotted one. A method run with several seeds
    is drawn as its mean with error bars of ± one sample std (a band around a dense model's line).
    summaries: {label: eval.group_summary record ({'results': {k: {'mean', 'std'}}, 'metric', ...})}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    all_ks = set()
    for label, summary in summaries.items():
        res = summary['results']
        if 'dense' in res:
            mean, std = res['dense']['mean'], res['dense']['std']
            ax.axhline(mean, ls='--', lw=1.2, color='black', label=label)
            if std is not None:
                ax.axhspan(mean - std, mean + std, color='black', alpha=0.15, lw=0)
            continue
        ks = sorted(int(k) for k in res)
        all_ks.update(ks)
        means = [res[str(k)]['mean'] for k in ks]
        if any(res[str(k)]['std'] is not None for k in ks):
            ax.errorbar(ks, means, yerr=[res[str(k)]['std'] or 0.0 for k in ks], marker='o', capsize=3,
                        label=f"{label} (n={summary['n']})")
        else:
            ax.plot(ks, means, marker='o', label=label)
    floor = next((s['bpc_floor'] for s in summaries.values() if s.get('bpc_floor')), None)
    if floor:
        ax.axhline(floor, ls=':', color='grey', label='corpus floor')
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
    ax.minorticks_off()
    low, high = ax.get_ylim()
    ticks = [low * (high / low) ** (i / 5) for i in range(6)]          # evenly spaced on the log axis
    ax.set_yticks(ticks, [f'{t:.3g}' for t in ticks])
    metric = next(iter(summaries.values()))['metric']
    ax.set(xlabel='experts used at inference (k)', ylabel=f'test {metric} (log scale)')
    ax.grid(alpha=0.3, which='both')
    ax.legend()
    save(fig, out)


def plot_entropy(values_by_label, out):
    """Router entropy (nats) per router, a bar per method; several seeds: the mean with ± one sample std.
    values_by_label: {label: {layer: [mean entropy of each seed's run]}}."""
    plt = pyplot()
    labels = list(values_by_label)
    layers = sorted({i for values in values_by_label.values() for i in values})
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(layers) * len(labels) ** 0.5, 3.4))
    for n, label in enumerate(labels):
        stats = [mean_std(values_by_label[label][i]) for i in layers]
        spread = [std for _, std in stats]
        ax.bar([i + (n - (len(labels) - 1) / 2) * width for i in range(len(layers))], [m for m, _ in stats], width,
               yerr=None if all(s is None for s in spread) else [s or 0.0 for s in spread], capsize=3, label=label)
    ax.set_xticks(range(len(layers)), [f'router {i + 1}' for i in layers])
    ax.set(ylabel='entropy (nats)', title='router entropy on the test split (mean ± std over seeds)')
    ax.legend(fontsize=7)
    save(fig, out)


def plot_load_profiles(profiles_by_label, out):
    """Expert load with several seeds: one panel per method, a line per router of the load of its experts sorted
    from the most used (expert numbers mean nothing across seeds), the mean with a band of ± one sample std.
    profiles_by_label: {label: {layer: [[sorted load fractions] of each seed's run]}}."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(profiles_by_label), figsize=(4.5 * len(profiles_by_label), 3), squeeze=False,
                             sharey=True, layout='constrained')
    for ax, (label, layers) in zip(axes[0], profiles_by_label.items()):
        for i, runs in layers.items():
            ranks = range(1, len(runs[0]) + 1)
            stats = [mean_std([100 * run[r] for run in runs]) for r in range(len(runs[0]))]
            mean = [m for m, _ in stats]
            line, = ax.plot(ranks, mean, marker='.', label=f'router {i + 1}')
            if len(runs) > 1:
                ax.fill_between(ranks, [m - s for m, s in stats], [m + s for m, s in stats], color=line.get_color(),
                                alpha=0.25, lw=0)
        n_expert = len(next(iter(layers.values()))[0])
        ax.axhline(100 / n_expert, ls='--', color='grey', lw=1)
        ax.set(title=f'{label} (n={len(next(iter(layers.values())))})', xlabel='expert, most used first')
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel('% of routed token slots')
    save(fig, out)


def plot_router_outputs(probs_by_label, out):
    """Figure 4: one panel per method (a row per token), the routers' softmax over the experts, a bar group
    per expert with one bar per router."""
    plt = pyplot()
    labels = list(probs_by_label)
    tokens = list(probs_by_label[labels[0]])
    fig, axes = plt.subplots(len(tokens), len(labels), figsize=(4.2 * len(labels), 2.8 * len(tokens)),
                             squeeze=False, sharey=True, layout='constrained')
    for col, label in enumerate(labels):
        for row, t in enumerate(tokens):
            ax, layers = axes[row][col], probs_by_label[label][t]
            width = 0.8 / len(layers)
            for n, (i, p) in enumerate(layers.items()):
                ax.bar([e + (n - (len(layers) - 1) / 2) * width for e in range(len(p))], p.tolist(), width,
                       label=f'router {i + 1} (H {entropy_of(p):.2f})')
            ax.set(title=f'({chr(97 + col)}) {label}, token {t}', xlabel='expert', ylim=(0, 1))
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel('router probability')
    save(fig, out)


def plot_load(stats_by_label, out):
    """Heat-map of the expert load: one panel per method, routers x experts, fraction of routed token slots."""
    plt = pyplot()
    loads = {label: torch.tensor([s.load_fraction for s in stats.values()]) for label, stats in stats_by_label.items()}
    vmax = max(v.max().item() for v in loads.values())
    fig, axes = plt.subplots(1, len(loads), figsize=(4.5 * len(loads), 2.6), squeeze=False, layout='constrained')
    for ax, (label, load) in zip(axes[0], loads.items()):
        image = ax.imshow(load.numpy(), vmin=0, vmax=vmax, cmap='viridis', aspect='auto')
        ax.set(title=label, xlabel='expert', xticks=range(load.size(1)), yticks=range(len(load)))
        ax.tick_params(axis='x', labelsize=7)
        ax.set_yticklabels([f'router {i + 1}' for i in stats_by_label[label]])
    fig.colorbar(image, ax=axes[0].tolist(), label='fraction of token slots')
    save(fig, out)


def plot_spectra(rows_by_label, out):
    """Singular values (normalised) of the router term per method (rows) and router (columns), one line per
    checkpoint, darker later in training; the dashed line marks E - 1, the most one router can span."""
    plt = pyplot()
    layers = sorted({r['layer'] for _, rows in rows_by_label.values() for r in rows})
    fig, axes = plt.subplots(len(rows_by_label), len(layers), figsize=(3.6 * len(layers), 2.6 * len(rows_by_label)),
                             squeeze=False, sharey=True, layout='constrained')
    for row, (label, (cfg, rows)) in enumerate(rows_by_label.items()):
        steps = sorted({r['step'] for r in rows})
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            for r in (r for r in rows if r['layer'] == layer):
                shade = plt.cm.viridis(0.85 - 0.75 * steps.index(r['step']) / max(len(steps) - 1, 1))
                s = [max(v, 1e-12) for v in r['s']]
                ax.semilogy(range(1, len(s) + 1), s, color=shade, label=f"{r['checkpoint']} ({r['step']})")
            ax.axvline(cfg['moe_num_expert'] - 1, ls='--', color='grey', lw=1)
            ax.set(title=f'{label}, router {layer + 1}', xlabel='singular value index', ylim=(1e-10, 2))
            ax.legend(fontsize=7)
        axes[row][0].set_ylabel('s / s_max')
    save(fig, out)


def _box(ax, x, y, text, style, w=3.0, h=1.1):
    """A module centred at (x, y): 'trainable' yellow, 'frozen' grey with a lock, 'generated' dashed white."""
    from matplotlib.patches import FancyBboxPatch
    face = {'trainable': YELLOW, 'frozen': GREY, 'generated': 'white', 'data': '#dfe9f5'}[style]
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle='round,pad=0.05', fc=face, ec='black',
                                ls='--' if style == 'generated' else '-'))
    ax.text(x, y, text, ha='center', va='center', fontsize=9)
    if style == 'frozen':
        _lock(ax, x + w / 2 + 0.4, y + h / 2 - 0.25)


def _lock(ax, x, y):
    """A padlock drawn with patches (fonts rarely carry the emoji): a body and its shackle."""
    from matplotlib.patches import Arc, Rectangle
    ax.add_patch(Rectangle((x - 0.2, y - 0.15), 0.4, 0.3, fc='#444444', ec='black', lw=0.6, zorder=5))
    ax.add_patch(Arc((x, y + 0.15), 0.26, 0.34, theta1=0, theta2=180, lw=2, color='#444444', zorder=5))


def _arrow(ax, start, end, **style):
    ax.annotate('', xy=end, xytext=start, arrowprops=dict(arrowstyle='->', lw=1.1, **style))


def plot_framework(out):
    """Figure 3: SMoE, SMoE-Dropout and HyperRouter side by side; yellow trainable, grey frozen (lock)."""
    from matplotlib.patches import Patch
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    panels = [('(a) SMoE', 'trainable', 'router $W_r$\n(trained)', 'router trained with the experts, fixed k'),
              ('(b) SMoE-Dropout', 'frozen', 'router $W_r$\n(random)', 'router frozen at init, k grows in training'),
              ('(c) HyperRouter', 'generated', 'router\n$W_r = H(e)$', 'frozen H generates the router from a trained e')]
    mix = r'$y = \sum_{j \in \mathrm{top}\,k}\ S_j(h)\ \mathcal{E}_j(h)$'
    for ax, (title, router, router_text, note) in zip(axes, panels):
        ax.set(xlim=(0, 11.5), ylim=(0, 9.2))
        ax.set_title(title, fontsize=12)
        ax.axis('off')
        _box(ax, 7.3, 0.8, 'input token $h$', 'data')
        _box(ax, 7.3, 2.8, router_text, router)
        _arrow(ax, (7.3, 1.3), (7.3, 2.3))
        for e, x in enumerate((1.5, 4.1, 6.7, 9.9)):
            _box(ax, x, 5.2, f'expert {e + 1}' if e < 3 else 'expert E', 'trainable', w=2.2)
            chosen = e in (1, 2)
            _arrow(ax, (7.3, 3.3), (x, 4.7), color='black' if chosen else '#bbbbbb', ls='-' if chosen else ':')
            if chosen:
                _arrow(ax, (x, 5.7), (5.8, 7.2))
        ax.text(8.3, 5.2, '...', ha='center', va='center')
        ax.text(5.8, 7.6, mix, ha='center', fontsize=10)
        ax.text(5.8, 8.6, note, ha='center', fontsize=9, style='italic')
        if router == 'generated':
            _box(ax, 2.0, 0.8, 'embedding $e$', 'trainable')
            _box(ax, 2.0, 2.8, 'hypernetwork\n$H$', 'frozen')
            _arrow(ax, (2.0, 1.3), (2.0, 2.3))
            _arrow(ax, (3.55, 2.8), (5.75, 2.8))
    fig.legend(handles=[Patch(fc=YELLOW, ec='black', label='trainable'),
                        Patch(fc=GREY, ec='black', label='frozen (lock)'),
                        Patch(fc='white', ec='black', ls='--', label='generated at each step, not a parameter')],
               loc='lower center', ncol=3, frameon=False, fontsize=10)
    save(fig, out)
