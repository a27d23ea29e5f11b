"""Evaluation of saved checkpoints with the reference Transformer-XL protocol, and the tables of runs.

The library under eval.py (the command line), train.py, finetune.py and analysis.py: loading a checkpoint
and rebuilding its model (from the configuration stored in it; a checkpoint written on a GPU loads on a
CPU-only machine), the protocol (batch 10, windows of eval_tgt_len, the memory extended to
mem_len + tgt_len - eval_tgt_len, the token-weighted mean NLL as bits per character or perplexity) at
several k, the results.json records, and the side-by-side and seed-grouped tables of runs.
"""
import argparse
import json
import math
import os

import torch

import router_registry
import seeds
from capacity import DEFAULT_GROUP_SIZE
from data_utils import dataset_metric, loss_to_metric
from hyper_router import set_top_k, top_k_schedule
from mem_transformer import MemTransformerLM
from model_config import router_name
from moe import set_capacity
from output_files import write_text
from run_utils import RunError

EVAL_BATCH_SIZE = 10
DEFAULT_KS = (1, 2, 4, 8, 16)
CHECKPOINTS = {'best': 'model_best.pt', 'best_dense': 'model_best_dense.pt'}
# which kept checkpoint a table shows: `training_k`, the rule of every table (a run's column comes from the
# checkpoint validated at the k it trained at: Table 1's SMoE at k = 2 from model_best.pt, SMoE-Dropout and
# HyperRouter, whose k grows to all 16 experts, from model_best_dense.pt), or one kind for every run
TABLE_RULE = 'training_k'
TABLE_CHECKPOINTS = ('training_k', 'best_dense', 'best')
CHECKPOINT_WORDS = {'best': 'model_best.pt (best validation at --moe-top-k, a dense run\'s only one)',
                    'best_dense': 'model_best_dense.pt (best validation with all experts)'}
RULE_WORDS = {'training_k': 'each run\'s checkpoint validated at the k it trained at',
              'best': 'every run\'s model_best.pt (--table_checkpoint best)',
              'best_dense': 'every run\'s model_best_dense.pt (--table_checkpoint best_dense)'}
LAST_CHECKPOINT = 'checkpoint_last.pt'


def load_checkpoint(path):
    """The checkpoint at `path`, every tensor on the CPU; FileNotFoundError when there is none, RunError when it
    cannot be read.

    Always the CPU, whatever device the run uses: its RNG states must stay CPU byte tensors for
    torch.set_rng_state, and the model, optimiser state and memory are copied to the device by whoever
    takes them (load_state_dict, Optimizer.load_state_dict, .to), so a GPU never holds a second copy."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no checkpoint at {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:            # whatever makes the file unreadable (truncated, overwritten), one line
        detail = str(err).splitlines()[0] if str(err) else ''
        raise RunError(f'the checkpoint {path} cannot be read, it is corrupt or truncated '
                       f'({type(err).__name__}: {detail})') from err


def model_from_checkpoint(ckpt, device='cpu', eval_capacity_factor=None, **config_overrides):
    """The checkpoint's model on `device`, in eval mode; the MoE backend and engine are chosen anew for this machine.
    Its capacity factors are the run's (`eval_capacity_factor`, a number or 'none' for dropless, replaces the
    evaluation one); `config_overrides` change inference-only settings of the model configuration (thor_inference)."""
    model = MemTransformerLM(**dict(ckpt['model_config'], moe_backend='auto', moe_engine='auto', **config_overrides))
    model.load_state_dict(ckpt['model'])
    run_args = ckpt.get('args', {})   # finetune.py's have none; those saved before the capacity flags: dropless
    if eval_capacity_factor is None:
        eval_capacity_factor = run_args.get('eval_capacity_factor')
    eval_factor = None if eval_capacity_factor == 'none' else eval_capacity_factor
    set_capacity(model, run_args.get('capacity_factor'), eval_factor,
                 run_args.get('capacity_group_size', DEFAULT_GROUP_SIZE))
    return model.to(device).eval()


def parse_capacity_factor(text):
    """'1.25' -> 1.25, 'none' -> 'none' (dropless); anything else is an argparse error."""
    if text.strip().lower() == 'none':
        return 'none'
    try:
        factor = float(text)
    except ValueError:
        factor = math.nan
    if not factor > 0 or math.isinf(factor):
        raise argparse.ArgumentTypeError(f'needs a positive number (such as 1.25) or none (dropless); got {text!r}')
    return factor


def method_name(model_config):
    """The column name the paper uses for this model; an unregistered router is a ValueError (never 'SMoE')."""
    if not model_config['moe']:
        return 'Dense+Dropout' if model_config['dropout'] > 0 else 'Dense'
    name = router_registry.spec_of(router_name(model_config)).display_name
    if model_config.get('moe_variant') == 'hypermoe':    # HyperMoE's published router: noisy top-k
        return 'HyperMoE' if name == 'Noisy top-k' else f'{name}+HyperMoE'
    return name


def eval_lengths(args):
    """(tgt_len, ext_len, mem_len) for evaluation: shorter windows, the context kept as long as in training."""
    extra = args['tgt_len'] - args['eval_tgt_len']
    if args['mem_len'] == 0:
        return args['eval_tgt_len'], args['ext_len'] + extra, 0
    return args['eval_tgt_len'], args['ext_len'], args['mem_len'] + extra


def evaluate(model, eval_iter, args, max_eval_steps=-1):
    """Token-weighted mean NLL of `model` (at its current k) over `eval_iter`, memory carried across windows."""
    train_lengths = (model.tgt_len, model.ext_len, model.mem_len)
    was_training = model.training
    model.eval()
    model.reset_length(*eval_lengths(args))
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        mems = ()
        for i, (data, target, _) in enumerate(eval_iter):
            if 0 < max_eval_steps <= i:
                break
            out = model(data, target, *mems)
            loss, mems = out[0], out[1:]
            total_loss += loss.double().sum().item()
            total_tokens += loss.numel()
    model.reset_length(*train_lengths)
    model.train(was_training)
    return total_loss / max(total_tokens, 1)


def eval_ks(model_config, ks=DEFAULT_KS):
    """The k to test (those <= E), or [None] for a dense model."""
    if not model_config['moe']:
        return [None]
    return [k for k in ks if k <= model_config['moe_num_expert']]


def evaluate_over_k(model, eval_iter, args, ks, max_eval_steps=-1):
    """{'k': metric} (or {'dense': metric}) with the metric of the dataset (bpc or ppl)."""
    results = {}
    for k in ks:
        if k is not None:
            set_top_k(model, k)
        loss = evaluate(model, eval_iter, args, max_eval_steps)
        results['dense' if k is None else str(k)] = loss_to_metric(loss, args['dataset'])
    return results


def results_entry(ckpt, kind, split, results, bpc_floor=None):
    entry = {'dataset': ckpt['args']['dataset'], 'metric': dataset_metric(ckpt['args']['dataset']),
             'split': split, 'gate': router_name(ckpt['model_config']) if ckpt['model_config']['moe'] else 'dense',
             'method': method_name(ckpt['model_config']), 'checkpoint': kind, 'step': ckpt['step'],
             'seed': ckpt['args']['seed'], 'results': results}
    if bpc_floor is not None:
        entry['bpc_floor'] = bpc_floor
    return entry


def format_table(columns, metric, floor=None):
    """Paper Table 1 shape: rows k, one column per method; a dense model's value sits in the last row.
    A cell is a number (written with 3 decimals) or a text such as '1.080 ± 0.004'."""
    ks = sorted({int(k) for res in columns.values() for k in res if k != 'dense'}) or [16]
    texts = [len(v) for res in columns.values() for v in res.values() if isinstance(v, str)]
    width = max(14, *(len(name) + 2 for name in columns), *(n + 2 for n in texts))
    lines = [f"{'k':>4}" + ''.join(f'{name:>{width}}' for name in columns)]
    for k in ks:
        cells = []
        for res in columns.values():
            value = res.get(str(k), res.get('dense') if k == ks[-1] else None)
            value = '-' if value is None else value
            cells.append(f'{value:>{width}}' if isinstance(value, str) else f'{value:>{width}.3f}')
        lines.append(f'{k:>4}' + ''.join(cells))
    if floor is not None:
        lines.append(f'corpus floor ({metric}): {floor:.3f}')
    return '\n'.join(lines)


def checked_ks(model_config, ks):
    """eval_ks, or a RunError when none of `ks` fits the model's experts."""
    fitting = eval_ks(model_config, ks)
    if not fitting:
        n_expert = model_config['moe_num_expert']
        raise RunError(f'no k in {",".join(map(str, ks))} is at most the number of experts ({n_expert}); '
                       f'give k from 1 to {n_expert}, e.g. --ks 1,2,{n_expert}')
    return fitting


def checkpoint_model(path, device, **config_overrides):
    """(checkpoint, model) of a kept checkpoint, or a RunError naming the file when it is unusable."""
    ckpt = load_checkpoint(path)
    try:
        return ckpt, model_from_checkpoint(ckpt, device, **config_overrides)
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        detail = str(err).splitlines()[0][:300] if str(err) else ''
        raise RunError(f'the weights in {path} do not fit the model its configuration describes (another '
                       f'architecture or code version): {type(err).__name__}: {detail}') from err


def test_checkpoints(run_dir, corpus, split='test', ks=DEFAULT_KS, max_eval_steps=-1, device='cpu', log=print,
                     problems=None, **config_overrides):
    """Evaluate every kept checkpoint of a run at each k; returns the results.json entries.

    A kept checkpoint that cannot be used (corrupt, or not fitting its configuration) is skipped and its
    error appended to `problems` while the others are evaluated; with `problems` None, or when no
    checkpoint is left, it is a RunError.
    """
    entries, found = [], []
    for kind, filename in CHECKPOINTS.items():
        path = os.path.join(run_dir, filename)
        if not os.path.isfile(path):
            continue
        found.append(filename)
        try:
            ckpt, model = checkpoint_model(path, device, **config_overrides)
        except RunError as err:
            if problems is None:
                raise
            problems.append(str(err))
            continue
        ks_here = checked_ks(ckpt['model_config'], ks)
        eval_iter = corpus.get_iterator(split, EVAL_BATCH_SIZE, ckpt['args']['eval_tgt_len'], device=device,
                                        ext_len=ckpt['args']['ext_len'])
        results = evaluate_over_k(model, eval_iter, ckpt['args'], ks_here, max_eval_steps)
        entries.append(dict(results_entry(ckpt, kind, split, results, corpus.bpc_floor), **config_overrides))
        metric = dataset_metric(ckpt['args']['dataset'])
        log(f'{split} {metric} of {CHECKPOINT_WORDS[kind]}, step {ckpt["step"]}, {method_name(ckpt["model_config"])}:')
        log(format_table({f'{method_name(ckpt["model_config"])} ({kind})': results}, metric, corpus.bpc_floor))
    if not found:
        raise RunError(f'no kept checkpoint ({", ".join(CHECKPOINTS.values())}) in {run_dir}: the run has not '
                       'validated yet (train.py validates every --eval-interval steps and at its last step); '
                       'resume it with --restart, or wait for its first validation')
    if not entries:
        raise RunError('; '.join(problems))
    return entries


def write_json(path, entries):
    """Write `entries` as JSON to `path` (`-`: standard output) as output_files.write_text does: atomically
    for a file, in place for a FIFO or device; a failed write (full disk) raises the OSError."""
    write_text(path, json.dumps(entries, indent=2) + '\n')


def read_results(run_dir, kind='best_dense'):
    """The results.json entry of the run's `kind` checkpoint (the first entry if there is none of that kind)."""
    path = os.path.join(run_dir, 'results.json')
    if not os.path.isfile(path):
        raise RunError(f'{path} not found: the run has not finished its final test; give a finished run, or '
                       f'test its kept checkpoints with: python eval.py --run {run_dir}')
    try:
        with open(path) as f:
            entries = json.load(f)
    except json.JSONDecodeError as err:
        raise RunError(f'{path} is not valid JSON ({err}); rewrite it with: python eval.py --run {run_dir} '
                       f'--json {path}') from err
    return next((e for e in entries if e['checkpoint'] == kind), entries[0])


def run_checkpoint(kind, config):
    """The kept checkpoint (`best` or `best_dense`) to show of a run with this config.json: `kind` itself, or
    for `training_k` the one validated at the k the run trained at. A run trained at one fixed k (SMoE, THOR,
    HyperMoE) is shown from `best`, validated at that k; a dynamic-k run, whose k grows to all experts (the
    scripts' 8 -> 16), and a dense run from `best_dense`."""
    if kind != 'training_k':
        return kind
    args = config['args']
    return 'best' if args.get('moe') and not args.get('dynamic_moe') else 'best_dense'


def fixed_training_k(config):
    """The k a run trained at, for a run trained at one fixed k (its `best` checkpoint validated there), else None."""
    args = config['args']
    return args.get('moe_top_k') if run_checkpoint('training_k', config) == 'best' else None


# the HParams columns shown before the reader ticks more (TensorBoard shows five): what tells a table's rows apart
SHOWN_HPARAMS = ('checkpoint', 'gate', 'k', 'method', 'seed')


def run_hparams(config):
    """A train.py run's columns in TensorBoard's HParams table, from its config.json: the method as the tables
    name it, the router, k (the fixed k, or the schedule run, scheduled_k; 'all' for a dense model), the experts
    (0: a dense FFN), the model's size, the recipe, the data, the seed (as text: TensorBoard shows a number as a
    float, 1111.0), the kept checkpoint whose test the k columns show (table_checkpoint), and the precision
    (run_precision)."""
    args, model = config['args'], config['model_config']
    if not model['moe']:
        k = 'all'
    elif args.get('dynamic_moe'):
        k = scheduled_k(args)
    else:
        k = str(args['moe_top_k'])
    return {'method': method_name(model), 'gate': router_name(model) if model['moe'] else 'dense', 'k': k,
            'experts': model['moe_num_expert'] if model['moe'] else 0, 'layers': model['n_layer'],
            'd_model': model['d_model'], 'dropout': model['dropout'], 'lr': args['lr'], 'steps': args['max_step'],
            'batch': args['batch_size'], 'dataset': args['dataset'], 'seed': str(args['seed']),
            'checkpoint': table_checkpoint(config), 'precision': run_precision(args)}


def run_precision(args):
    """How a run's matmuls computed, from its arguments (a dict): 'bf16' (--amp), 'tf32' (fp32 on CUDA with TF32
    matmuls, train.py's default there) or 'fp32'."""
    if args.get('amp'):
        return 'bf16'
    return 'tf32' if args.get('cuda') and not args.get('no_tf32') else 'fp32'


def scheduled_k(args):
    """The k schedule a run follows, as 'k_first-k_last mode': the k of its first and of its last step (the schedule
    of a run shorter than its k schedule stops short of --moe-top-k-max, and says so)."""
    steps = args.get('dynamic_overall_steps', -1)
    steps = steps if steps > 0 else args['max_step']
    k_first, k_last = (top_k_schedule(step, args['dynamic_moe_mode'], args['moe_top_k_min'], args['moe_top_k_max'],
                                      steps) for step in (0, args['max_step'] - 1))
    return f"{k_first}-{k_last} {args['dynamic_moe_mode']}"


def table_checkpoint(config):
    """The kept checkpoint a run's HParams row shows: run_checkpoint's `training_k` rule for an MoE run; a dense
    run keeps one, model_best.pt (`best`)."""
    return run_checkpoint('training_k', config) if config['model_config']['moe'] else 'best'


def table_ks(model_config, ks):
    """The k columns of a run's table: those of `ks` up to E (a dense model: all, its value in the last)."""
    return eval_ks(model_config, ks) if model_config['moe'] else sorted(ks)


def result_tags(metric, ks, split='test'):
    """The scalar tags of the HParams table's metric columns: <split>/<metric>/k<k> for each k."""
    return [f'{split}/{metric}/k{k}' for k in ks]


def result_scalars(entry, ks):
    """{'<metric>/k<k>': value} of a results.json entry (result_tags without the split): a dense model's one value
    under the largest of `ks`, where the tables put it."""
    return {f"{entry['metric']}/k{max(ks) if k == 'dense' else k}": value for k, value in entry['results'].items()}


def column_note(entry):
    """The line under a run's final test naming the checkpoint (`entry`, table_entry's) that is its column."""
    return (f'the run\'s column in the tables (eval.py --table, the HParams row): '
            f'{CHECKPOINT_WORDS[entry["checkpoint"]]}, as {RULE_WORDS[TABLE_RULE]}')


def table_entry(config, entries):
    """The entry of the checkpoint that run_hparams names (None if it was not tested)."""
    kind = table_checkpoint(config)
    return next((e for e in entries if e['checkpoint'] == kind), None)


def read_runs(run_dirs, kind=TABLE_RULE):
    """[(label, [(seed, run_dir, results.json entry)])]: the runs grouped by configuration (those that differ
    only in seed form one group, seeds.group_runs), labelled with the method's name; `kind` (TABLE_CHECKPOINTS)
    says which checkpoint's entry."""
    configs = [seeds.read_config(d) for d in run_dirs]
    entries = [read_results(d, run_checkpoint(kind, c)) for d, c in zip(run_dirs, configs)]
    groups = seeds.group_runs(configs, [e['method'] for e in entries])
    run_seeds = [e['seed'] if 'seed' in e else seeds.run_seed(c) for e, c in zip(entries, configs)]  # older runs
    return [(label, [(run_seeds[i], run_dirs[i], entries[i]) for i in members]) for label, members in groups]


def group_summary(label, runs):
    """The --table record of one configuration: its seeds, its runs and {k: {mean, std, n, values}}."""
    first = runs[0][2]
    summary = {'method': label, 'dataset': first['dataset'], 'metric': first['metric'], 'split': first['split'],
               'checkpoint': first['checkpoint'], 'n': len(runs), 'seeds': [seed for seed, _, _ in runs],
               'runs': [run_dir for _, run_dir, _ in runs],
               'results': seeds.summarise([entry['results'] for _, _, entry in runs])}
    if 'bpc_floor' in first:
        summary['bpc_floor'] = first['bpc_floor']
    return summary


def table_of_runs(run_dirs, kind=TABLE_RULE):
    """(text, records): the runs' results.json side by side (the `kind` checkpoint of each); runs that differ
    only in seed make one column, mean ± sample std, with the seeds of each column under the table."""
    run_dirs, skipped = trained_runs(run_dirs)
    groups = read_runs(run_dirs, kind)
    summaries = [group_summary(label, runs) for label, runs in groups]
    columns = {s['method']: {k: seeds.format_cell(stats, s['n']) for k, stats in s['results'].items()}
               for s in summaries}
    notes = seed_notes(summaries)
    if kind == 'training_k':
        trained = {s['method']: fixed_training_k(seeds.read_config(runs[0][1])) for s, (_, runs) in zip(summaries, groups)}
        columns = {name: mark_training_k(cells, trained[name]) for name, cells in columns.items()}
        if any(k is not None for k in trained.values()):
            notes.append('* the k a fixed-k run was trained at')
    floor = next((s['bpc_floor'] for s in summaries if 'bpc_floor' in s), None)
    text = [checkpoint_header(summaries, kind), format_table(columns, summaries[-1]['metric'], floor), *notes,
            *(f'skipped {run_dir}: it never trained (no config.json; train.py stopped before its first step)'
              for run_dir in skipped)]
    return '\n'.join(text), summaries


def trained_runs(run_dirs):
    """(the directories that hold a config.json, those that do not): a glob over a script's folder (`--table
    runs/table1-enwik8/*/*`) also matches a directory left by a run that stopped before training; it is named and
    skipped, not an error, as long as some run is left."""
    untrained = [d for d in run_dirs if os.path.isdir(d) and not os.path.isfile(os.path.join(d, 'config.json'))]
    if len(untrained) == len(run_dirs):
        raise RunError(f'none of {", ".join(run_dirs)} is a run directory of train.py (no config.json): give the '
                       'directories train.py printed as "run directory: ..."')
    return [d for d in run_dirs if d not in untrained], untrained


def mark_training_k(cells, k):
    """A column's cells {k: number or text} with the cell of the training k (None: no mark) marked with '*'."""
    if k is None or str(k) not in cells:
        return cells
    value = cells[str(k)]
    return dict(cells, **{str(k): (value if isinstance(value, str) else f'{value:.3f}') + '*'})


def checkpoint_header(summaries, kind):
    """The line above every table of runs: the rule (`kind`) and which column comes from which checkpoint."""
    by_kind = {}
    for s in summaries:
        by_kind.setdefault(s['checkpoint'], []).append(s['method'])
    return (f'checkpoint: {RULE_WORDS[kind]}: ' + '; '.join(
        f"{', '.join(methods)} from {CHECKPOINT_WORDS.get(checkpoint, checkpoint)}"
        for checkpoint, methods in by_kind.items()))


def seed_notes(summaries):
    """The lines under a table with several seeds: what the spread is, the seeds of each column, repeated seeds."""
    if all(s['n'] == 1 for s in summaries):
        return []
    seed_lists = {' '.join(map(str, s['seeds'])) for s in summaries}
    if len(seed_lists) == 1:
        lines = [f"mean ± sample std (n - 1) over n = {summaries[0]['n']} seeds ({seed_lists.pop()}) in every column"]
    else:
        lines = ['mean ± sample std (n - 1) over seeds; n (seeds): ' + ', '.join(
            f"{s['method']} {s['n']} ({' '.join(map(str, s['seeds']))})" for s in summaries)]
    for s in summaries:
        repeated = sorted({seed for seed in s['seeds'] if s['seeds'].count(seed) > 1})
        if repeated:
            lines.append(f"note: {s['method']} has several runs of seed {', '.join(map(str, repeated))}; each counts "
                         'in its mean and std (on a CPU, one seed gives the same numbers: the std is understated)')
    return lines


def one_run_per_seed(flag, groups):
    """(label, {seed: entry}) of one side of --compare, which must be one configuration with distinct seeds."""
    if len(groups) != 1:
        raise RunError(f'the runs of side {flag} must differ only in their seed; they are {len(groups)} '
                         f'configurations: {", ".join(label for label, _ in groups)}')
    label, runs = groups[0]
    by_seed = {}
    for seed, run_dir, entry in runs:
        if seed in by_seed:
            raise RunError(f'side {flag} has two runs of seed {seed}; give one run per seed')
        by_seed[seed] = entry
    return label, by_seed


def compare_runs(runs_a, runs_b, kind=TABLE_RULE):
    """Two configurations compared seed by seed at each k (seeds.compare_by_seed), as text."""
    label_a, a = one_run_per_seed('A', read_runs(runs_a, kind))
    label_b, b = one_run_per_seed('B', read_runs(runs_b, kind))
    metric_a, metric_b = next(iter(a.values()))['metric'], next(iter(b.values()))['metric']
    if metric_a != metric_b:
        raise RunError(f'side A reports {metric_a} and side B {metric_b}: compare runs on the same dataset')
    try:
        matched, rows = seeds.compare_by_seed({s: e['results'] for s, e in a.items()},
                                              {s: e['results'] for s, e in b.items()})
    except ValueError as err:                     # too few seeds on both sides
        raise RunError(str(err)) from err
    summaries = [{'method': label, 'checkpoint': next(iter(side.values()))['checkpoint']}
                 for label, side in ((label_a, a), (label_b, b))]
    return '\n'.join([checkpoint_header(summaries, kind),
                      seeds.format_comparison(label_a, label_b, f'test {metric_a}', matched, rows)])


def parse_ks(text):
    """'1,2,4' -> [1, 2, 4]; anything else is an argparse error asking for positive integers."""
    try:
        ks = [int(k) for k in text.split(',') if k.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f'needs positive integers separated by commas, such as 1,2,4,8,16; '
                                         f'got {text!r}')
    return ks


def read_run_config(run_dir):
    """config.json of a train.py run directory, or a RunError saying what was given instead."""
    if not os.path.exists(run_dir):
        raise RunError(f'no run directory {run_dir}: give the directory train.py printed as "run directory: ..."')
    if not os.path.isdir(run_dir):
        raise RunError(f'{run_dir} is a file; --run takes the run directory that holds it '
                       f'({os.path.dirname(run_dir) or "."}), whose kept checkpoints are all tested')
    path = os.path.join(run_dir, 'config.json')
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise RunError(f'{run_dir} is not a run directory of train.py: cannot read its config.json '
                       f'({getattr(err, "strerror", None) or err})') from err
