"""The analysis commands of eval.py (`python eval.py --entropy|--load|--flops|--params|--jacobian|--plot|--routers
RUN ...`, `--diagram`): their options, and each command's tables and figures from what analysis.py computes
and figures.py draws. Runs that differ only in seed are one configuration: entropy, load and Figure 1 report
mean ± sample std over the seeds, the analyses of one model's weights or shape take its first run.
"""
import math
import sys

import evaluation
from analysis import (DEFAULT_JACOBIAN_CHECKPOINTS, config_groups, eval_iterator, first_seeds, flops_over_k,
                      format_entropy_over_seeds, format_entropy_table, format_flops_table, format_jacobian_table,
                      format_load_profile, format_load_table, format_param_table, format_router_outputs, jacobian_rows,
                      load_model, n_experts, param_row, prepare, router_probabilities, router_stats)
from data_utils import DataError
from figures import (plot_entropy, plot_framework, plot_load, plot_load_profiles, plot_metric_vs_k, plot_router_outputs,
                     plot_spectra)
from mem_transformer import MemTransformerLM
from model_flops import SMALL, analytic_eval_flops
from moe import ROUTERS, uses_thor
from output_files import STDOUT
from run_utils import RunError

FIGURE_DEFAULTS = {'plot': 'Figs/fig1_metric_vs_k.png', 'routers': 'Figs/fig4_router_outputs.png',
                   'diagram': 'Figs/fig3_framework.png'}


def add_arguments(parser):
    """The analysis commands and their options, added to eval.py's parser."""
    group = parser.add_argument_group('analyses (paper tables and figures, on the CPU; one command at a time; '
                                      'runs that differ only in seed are grouped: --plot, --entropy and --load '
                                      'give their mean ± sample std, the others analyse the first run of a group)')
    cmd = group.add_mutually_exclusive_group()
    cmd.add_argument('--entropy', nargs='+', metavar='RUN', help="Tables 4/A5: entropy of each router's softmax "
                                                                 '(bars with --out)')
    cmd.add_argument('--load', nargs='+', metavar='RUN', help='expert load per router (heat-map with --out; with '
                                                              'several seeds, the sorted load, mean ± std)')
    cmd.add_argument('--flops', nargs='*', metavar='RUN', help='Table A3: inference FLOPs at each k of --ks '
                                                              "(no RUN: the paper's small enwik8 model)")
    cmd.add_argument('--params', nargs='*', metavar='RUN', help="Table A4: parameters (no RUN: the paper's model)")
    cmd.add_argument('--jacobian', nargs='+', metavar='RUN', help='Section 3.3: rank of the router term of dL/dh '
                                                                  'over --checkpoints (spectra with --out)')
    cmd.add_argument('--plot', nargs='+', metavar='RUN', help="Figure 1: test metric vs k from the runs' results.json "
                                                              '(runs differing only in seed: mean ± std)')
    cmd.add_argument('--routers', nargs='+', metavar='RUN', help="Figure 4: the routers' softmax at --tokens")
    cmd.add_argument('--diagram', action='store_true', help='Figure 3: SMoE, SMoE-Dropout and HyperRouter')
    group.add_argument('--out', help='figure file (.png); defaults: ' + ', '.join(
        f'--{name} {path}' for name, path in FIGURE_DEFAULTS.items()))
    group.add_argument('--checkpoint', default='best_dense',
                       help='checkpoint analysed: best, best_dense, last, init (step 0, rebuilt) or a file; --plot '
                            'also takes training_k (as eval.py --table_checkpoint)')
    group.add_argument('--checkpoints', default=DEFAULT_JACOBIAN_CHECKPOINTS,
                       help='comma-separated checkpoints for --jacobian, analysed in the order of their step')
    group.add_argument('--mem_len', type=int, help='memory length for --flops (default: the evaluation memory, '
                                                    'mem_len + tgt_len - eval_tgt_len, 896 for the paper model)')
    group.add_argument('--k', type=int, help="k of the analysed model (default: the run's --moe-top-k)")
    group.add_argument('--tokens', default='100', help='comma-separated token positions (first batch column) '
                                                       'for --routers')
    group.add_argument('--max_tokens', type=int, default=2048, help='tokens whose router terms --jacobian collects')
    group.add_argument('--rtol', type=float, default=1e-5, help='--jacobian: singular values above rtol * the '
                                                                'largest count in the rank')


def moe_groups(run_dirs):
    """config_groups of the runs that have MoE layers; dense runs are skipped with a note."""
    kept = []
    for label, group, cfg in config_groups(run_dirs):
        if cfg['moe']:
            kept.append((label, group, cfg))
        else:
            print(f'{", ".join(group)}: a dense model has no router, skipped', file=sys.stderr)
    if not kept:
        sys.exit('none of the runs has MoE layers')
    return kept


def stats_command(args, runs):
    """{label: [{layer: RouterStats} of each seed's run]} at the chosen checkpoint and k, with the k of each
    in a header line."""
    stats, ks = {}, []
    for label, group, _ in moe_groups(runs):
        stats[label] = []
        for run_dir in group:
            ckpt, model = load_model(run_dir, args.checkpoint)
            k = prepare(model, ckpt, args.k)
            stats[label].append(router_stats(model, eval_iterator(ckpt, args.split, args.data), ckpt['args'],
                                             args.max_eval_steps))
        ks.append(f'{label} k = {k}' + (f' ({len(group)} seeds)' if len(group) > 1 else ''))
    print(f'{args.split} split, checkpoint {args.checkpoint}, ' + ', '.join(ks)
          + (f', first {args.max_eval_steps} windows' if args.max_eval_steps > 0 else ''))
    return stats


def entropy_command(args):
    stats = stats_command(args, args.entropy)
    n_expert = n_experts(next(iter(stats.values()))[0])
    uniform = f'uniform: log {n_expert} = {math.log(n_expert):.4f}'
    values = {label: {i: [run[i].mean_entropy for run in runs] for i in runs[0]} for label, runs in stats.items()}
    if all(len(runs) == 1 for runs in stats.values()):
        print(f"Entropy of the routers' softmax over all tokens, mean ± std (nats; {uniform})")
        print(format_entropy_table({label: runs[0] for label, runs in stats.items()}))
    else:
        print(f"Entropy of the routers' softmax, mean over the tokens, then mean ± sample std over seeds "
              f'(nats; {uniform})')
        print(format_entropy_over_seeds(values))
    if args.out:
        plot_entropy(values, args.out)




def load_command(args):
    stats = stats_command(args, args.load)
    if all(len(runs) == 1 for runs in stats.values()):
        for label, runs in stats.items():
            print(format_load_table(label, runs[0]))
        if args.out:
            plot_load({label: runs[0] for label, runs in stats.items()}, args.out)
        return
    profiles = {label: {i: [sorted(run[i].load_fraction, reverse=True) for run in runs] for i in runs[0]}
                for label, runs in stats.items()}
    for label, layers in profiles.items():
        dropped = {i: [run[i].drop_fraction for run in stats[label]] for i in layers}
        print(format_load_profile(label, layers, dropped))
    if args.out:
        plot_load_profiles(profiles, args.out)




def paper_models():
    """The paper's small enwik8 model (model_flops.SMALL) under every router (moe.ROUTERS, the paper's three first),
    HyperMoE on its published noisy top-k router, and the dense twin: the rows of Tables A3 and A4."""
    configs = [dict(SMALL, gate_name=g) for g in ROUTERS]
    configs.append(dict(SMALL, gate_name='noisy_topk', moe_variant='hypermoe'))
    configs.append(dict(SMALL, moe=False, d_inner=SMALL['d_inner'] * SMALL['moe_num_expert']))
    return [(evaluation.method_name(cfg), cfg, MemTransformerLM(**cfg)) for cfg in configs]


def run_models(run_dirs):
    """[(label, config, model)] of one run per configuration, built from its config.json (weights do not change
    a count, nor does the seed)."""
    return [(label, *load_model(run_dir, 'init')) for label, run_dir, _ in first_seeds(config_groups(run_dirs))]


def flops_command(args):
    """Table A3 of the runs (at their evaluation lengths) or of the paper's model (128 tokens, memory 896),
    the latter next to its analytic count (model_flops)."""
    if args.flops:
        models = [(label, config['model_config'], model, evaluation.eval_lengths(config['args']))
                  for label, config, model in run_models(args.flops)]
    else:
        models = [(label, cfg, model, (128, 0, 896)) for label, cfg, model in paper_models()]
    columns, lengths = {}, set()
    for label, cfg, model, (qlen, _, mlen) in models:
        mlen = mlen if args.mem_len is None else args.mem_len
        lengths.add(f'{qlen} tokens x batch {evaluation.EVAL_BATCH_SIZE}, memory {mlen}')
        # the paper gives THOR at k = E only (every expert, weight 1/E; no router to compute)
        ks = [cfg['moe_num_expert']] if not args.flops and uses_thor(cfg['moe'], cfg.get('gate_name')) else args.ks
        columns[label] = flops_over_k(model, cfg, ks, qlen, mlen)
    if not args.flops:          # every paper model has the same lengths
        columns['analytic'] = {str(k): analytic_eval_flops(SMALL, k, qlen=qlen, mlen=mlen)
                               for k in args.ks if k <= SMALL['moe_num_expert']}
    print(format_flops_table(columns))
    print('one evaluation batch: ' + '; '.join(sorted(lengths)))


def params_command(args):
    if args.params:
        models = [(label, model) for label, _, model in run_models(args.params)]
    else:
        models = [(label, model) for label, cfg, model in paper_models() if cfg['moe']]
    print(format_param_table({label: param_row(model) for label, model in models}))


def jacobian_command(args):
    checkpoints = [c for c in args.checkpoints.split(',') if c.strip()]
    results = {}
    for label, run_dir, cfg in first_seeds(moe_groups(args.jacobian)):
        rows = jacobian_rows(run_dir, checkpoints, args.data, args.split, args.max_tokens, args.k, args.rtol)
        results[label] = (cfg, rows)
        print(format_jacobian_table(label, cfg, rows))
    if args.out:
        plot_spectra(results, args.out)


def plot_command(args):
    summaries = {label: evaluation.group_summary(label, runs) for label, runs in
                 evaluation.read_runs(args.plot, args.checkpoint)}
    plot_metric_vs_k(summaries, args.out or FIGURE_DEFAULTS['plot'])


def routers_command(args):
    tokens = [int(t) for t in args.tokens.split(',') if t.strip()]
    probs = {}
    for label, run_dir, _ in first_seeds(moe_groups(args.routers)):
        ckpt, model = load_model(run_dir, args.checkpoint)
        prepare(model, ckpt, args.k)
        probs[label] = router_probabilities(model, eval_iterator(ckpt, args.split, args.data), ckpt['args'], tokens)
        print(format_router_outputs(label, probs[label]))
    plot_router_outputs(probs, args.out or FIGURE_DEFAULTS['routers'])


COMMANDS = {'entropy': entropy_command, 'load': load_command, 'flops': flops_command, 'params': params_command,
            'jacobian': jacobian_command, 'plot': plot_command, 'routers': routers_command,
            'diagram': lambda args: plot_framework(args.out or FIGURE_DEFAULTS['diagram'])}


def run(args, parser):
    """Run the analysis command given on the command line; False when there is none."""
    chosen = [name for name in COMMANDS if getattr(args, name) not in (None, False)]
    if not chosen:
        return False
    if args.run or args.table or args.compare:
        parser.error(f'--{chosen[0]} is a command of its own; drop --run / --table / --compare')
    if args.out == STDOUT:
        parser.error('--out writes a figure (.png), which cannot go to standard output: give a file name')
    try:
        COMMANDS[chosen[0]](args)
    except (DataError, RunError) as err:
        sys.exit(f'error: {err}')
    return True
