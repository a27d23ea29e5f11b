"""Evaluate saved checkpoints at several k, with the reference Transformer-XL protocol.

  python eval.py --run RUN_DIR [--ks 1,2,4,8,16] [--split test|valid] [--max_eval_steps N] [--json OUT]
                 [--thor_inference random|average] [--eval_capacity_factor F|none]
  python eval.py --table RUN_A RUN_B ... [--json OUT]  # the runs' results.json side by side; runs that
                                              # differ only in seed: one column, mean ± std over the seeds
  python eval.py --compare RUN_A ... -- RUN_B ...  # A against B seed by seed: paired t-test at each k
  python eval.py --entropy|--load|--jacobian|--plot|--routers RUN ...  # analyses (analysis_commands.py; see --help)
  python eval.py --flops|--params [RUN ...]   # Tables A3, A4 (no RUN: the paper's small enwik8 model)
  python eval.py --diagram                    # Figure 3

The model is rebuilt from the configuration stored in the checkpoint; evaluation uses batch 10,
windows of eval_tgt_len and the memory extended to mem_len + tgt_len - eval_tgt_len, and reports the
token-weighted mean NLL as bits per character or perplexity. A checkpoint written on a GPU loads on
a CPU-only machine.
"""
import argparse
import contextlib
import os
import sys

import torch

import analysis_commands
import evaluation
from custom_gate import THOR_INFERENCE
from data_utils import DataError, dataset_metric, get_lm_corpus
from moe import uses_thor
from output_files import STDOUT
from run_utils import RunError, describe_os_error, keep_freed_memory, write_hparams


def split_compare(argv):
    """(argv without the runs after `--`, those runs): `--compare A ... -- B ...` gives two lists of runs."""
    if '--compare' not in argv or '--' not in argv:
        return argv, None
    cut = argv.index('--')
    end = next((i for i in range(cut + 1, len(argv)) if argv[i].startswith('-')), len(argv))
    return argv[:cut] + argv[end:], argv[cut + 1:end]


def show_table(run_dirs, kind=evaluation.TABLE_RULE):
    """Print the --table of `run_dirs` (`kind`: one of TABLE_CHECKPOINTS); returns its records, for --json."""
    text, summaries = evaluation.table_of_runs(run_dirs, kind)
    print(text)
    return summaries


def tensorboard_prefix(split, settings):
    """Where eval.py's results go in the run's TensorBoard record: `test`, the tags of train.py's final test, for
    a full test (the whole test split under the run's own settings: the HParams row then shows this newer test);
    otherwise eval_<split>[_<setting>_<value>...] (`settings`: the inference overrides and a --max_eval_steps), so
    that the validation curves and the row's test stay as they are."""
    if split == 'test' and not settings:
        return 'test'
    return '_'.join([f'eval_{split}', *(f'{name}_{value}' for name, value in settings.items())])


def partial_test(args, config):
    """{setting: value} of what makes this test less than a full one (at every k of the run's HParams row, on the
    whole split or on the windows of the run's own test): --max_eval_steps N, or --ks without some of the row's k;
    {} for a full test."""
    row_ks = evaluation.table_ks(config['model_config'], evaluation.parse_ks(config['args']['eval_ks']))
    own_windows = config['args'].get('max_eval_steps', -1)
    partial = {'max_eval_steps': args.max_eval_steps} if 0 < args.max_eval_steps != own_windows else {}
    if config['model_config']['moe'] and not set(row_ks) <= set(args.ks):
        partial['ks'] = '-'.join(map(str, args.ks))
    return partial


def record_in_tensorboard(run_dir, config, entries, prefix):
    """Add the results to the run's TensorBoard record as train.py's final test does: for a full test (`prefix`
    test) the HParams row (written again, for runs from before it existed; its columns stay the run's --eval_ks);
    and the test of the checkpoint the row names, as <prefix>/<metric>/k<k> at that checkpoint's step."""
    from torch.utils.tensorboard import SummaryWriter
    ks = evaluation.table_ks(config['model_config'], evaluation.parse_ks(config['args']['eval_ks']))
    entry = evaluation.table_entry(config, entries)
    metric = dataset_metric(config['args']['dataset'])
    with SummaryWriter(run_dir) as tb:
        if prefix == 'test':
            write_hparams(tb, evaluation.run_hparams(config), evaluation.result_tags(metric, ks),
                          evaluation.SHOWN_HPARAMS)
        else:
            print(f'not written to the HParams row (test/{metric}/k<k>), which shows full tests only: these results '
                  f'are under {prefix}/{metric}/k<k>')
        if entry is not None:
            for name, value in evaluation.result_scalars(entry, ks).items():
                tb.add_scalar(f'{prefix}/{name}', value, entry['step'])


def evaluate_run(args, parser):
    """eval.py --run: test every kept checkpoint and add the results to the run's TensorBoard record;
    (results.json entries, the errors of the damaged ones)."""
    config = evaluation.read_run_config(args.run)
    run_args = config['args']
    overrides = {}
    if args.thor_inference:
        if not uses_thor(run_args['moe'], run_args['gate_name']):
            parser.error(f'--thor_inference applies to THOR runs (--gate_name thor); {args.run} used '
                         f'{run_args["gate_name"] if run_args["moe"] else "no MoE"}')
        overrides['thor_inference'] = args.thor_inference
    if args.eval_capacity_factor is not None:
        if not run_args['moe']:
            parser.error(f'--eval_capacity_factor applies to MoE runs; {args.run} has no MoE layers')
        overrides['eval_capacity_factor'] = args.eval_capacity_factor
    corpus = get_lm_corpus(args.data or run_args['data'], run_args['dataset'])
    problems = []
    entries = evaluation.test_checkpoints(args.run, corpus, args.split, args.ks, args.max_eval_steps,
                               'cuda' if args.cuda else 'cpu', problems=problems, **overrides)
    record_in_tensorboard(args.run, config, entries, tensorboard_prefix(args.split, {**overrides, **partial_test(
        args, config)}))
    return entries, problems


def write_output(out, records):
    """--json OUT (`-`: the standard output, which then holds the JSON alone: see run_command)."""
    evaluation.write_json(out, records)
    if out != STDOUT:
        print(f'wrote {out}')


def run_command(args, compare_b, parser):
    """--compare, --table or --run. With --json -, whatever else they print goes to stderr, so that the
    standard output is the JSON alone (`eval.py --run RUN --json - | jq`)."""
    problems, records = [], None
    with contextlib.redirect_stdout(sys.stderr) if args.json == STDOUT else contextlib.nullcontext():
        if args.compare:
            print(evaluation.compare_runs(args.compare, compare_b, args.table_checkpoint))
        elif args.table:
            records = show_table(args.table, args.table_checkpoint)
        else:
            records, problems = evaluate_run(args, parser)
    out = args.json or (args.run and os.path.join(args.run, f'eval_{args.split}.json'))
    if records is not None and out:
        write_output(out, records)
    if problems:
        raise RunError('; '.join(problems) + ' (skipped; the other checkpoints were tested)')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--run', help='run directory written by train.py')
    parser.add_argument('--table', nargs='+', metavar='RUN',
                        help="print the runs' results.json side by side; runs that differ only in seed are one "
                             'column, mean ± sample std (n - 1) over the seeds (--json OUT: write it too)')
    parser.add_argument('--compare', nargs='+', metavar='RUN',
                        help='--compare RUN_A ... -- RUN_B ...: method A against method B, seed by seed (runs '
                             'matched by seed): at each k the mean of A - B and a two-sided paired t-test '
                             '(Student t, n - 1 degrees of freedom); p < 0.05 is called beyond the seed-to-seed '
                             'spread')
    parser.add_argument('--table_checkpoint', choices=evaluation.TABLE_CHECKPOINTS, default=evaluation.TABLE_RULE,
                        help='which kept checkpoint --table and --compare show (the line above the table says): '
                             'training_k (default, the rule of every table here: each run\'s checkpoint validated '
                             'at the k it trained at, model_best.pt for a fixed-k or dense run, model_best_dense.pt '
                             'for a dynamic-k run), or for every run best_dense (best validation with all experts) '
                             'or best (best validation at --moe-top-k)')
    parser.add_argument('--ks', type=evaluation.parse_ks, default=list(evaluation.DEFAULT_KS),
                        help='k to evaluate (those <= E)')
    parser.add_argument('--split', choices=['test', 'valid'], default='test')
    parser.add_argument('--max_eval_steps', type=int, default=-1, help='evaluate at most this many windows')
    parser.add_argument('--data', help='data folder, if not the one recorded in the run')
    parser.add_argument('--json', help='write the results here, - for the standard output (--run: default '
                                       'RUN/eval_<split>.json; --table: the table as records of mean, std, n and '
                                       'values per k)')
    parser.add_argument('--cuda', action='store_true', help='evaluate on the GPU')
    parser.add_argument('--thor_inference', choices=THOR_INFERENCE,
                        help="a THOR run's inference, if not the one it was trained with: random (k random experts "
                             'per token) or average (every expert, weight 1/E)')
    parser.add_argument('--eval_capacity_factor', type=evaluation.parse_capacity_factor,
                        help='expert capacity factor F of evaluation (each expert takes at most ceil(F * n * k / E) '
                             'of each group of n tokens, the run\'s --capacity_group_size), or none (dropless); default: the run\'s own (its '
                             '--eval_capacity_factor), so a checkpoint is evaluated as trained')
    analysis_commands.add_arguments(parser)
    argv, compare_b = split_compare(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    keep_freed_memory()
    if analysis_commands.run(args, parser):
        return
    if args.compare and not compare_b:
        parser.error('--compare needs two lists of runs: --compare RUN_A ... -- RUN_B ...')
    if not (args.run or args.table or args.compare):
        parser.error('give --run RUN_DIR (or --table RUN ..., --compare RUN_A ... -- RUN_B ..., or an analysis '
                     'command)')
    if args.cuda and not torch.cuda.is_available():
        parser.error('--cuda given but no CUDA device is available; drop --cuda to evaluate on the CPU')
    try:
        run_command(args, compare_b, parser)
    except (RunError, DataError) as err:
        sys.exit(f'error: {err}')
    except OSError as err:
        sys.exit(f'error: {describe_os_error(err)}')


if __name__ == '__main__':
    main()
