"""What a training run checks and records around its training: that the data fits, that a resume continues its
checkpoint's run, and the run's records (config.json, resumes.jsonl, results.json, TensorBoard's HParams row and
Text tab).
"""
import functools
import hashlib
import json
import os
import shlex
import time

import torch

import evaluation
import train_args
from data_utils import dataset_metric
from hyper_router import param_breakdown
from model_config import ModelConfig
from run_utils import RunError, git_commit, git_tree_modified
from train_args import ARCHITECTURE_ARGS, DATA_LAYOUT_ARGS, dts_anneal_steps

@functools.lru_cache(maxsize=1)
def data_signature(corpus):
    """{split: [tokens, SHA-1 of the ids]}: saved with checkpoint_last.pt, so a resume can tell that the data
    files changed, wherever they were moved (a second or so for enwik8's 90M tokens; cached, as a resume
    checks it before the trainer saves it)."""
    return {split: [len(ids), hashlib.sha1(ids.contiguous().numpy()).hexdigest()[:16]]
            for split, ids in (('train', corpus.train), ('valid', corpus.valid), ('test', corpus.test))}


def check_data_fits(corpus, args):
    """Every split must hold one whole segment per batch column (before a run directory is made)."""
    needs = {'train': (args.batch_size, args.tgt_len, 'a smaller --batch_size or --tgt_len'),
             'valid': (evaluation.EVAL_BATCH_SIZE, args.eval_tgt_len, 'a smaller --eval_tgt_len'),
             'test': (evaluation.EVAL_BATCH_SIZE, args.eval_tgt_len, 'a smaller --eval_tgt_len')}
    for split, (bsz, length, fix) in needs.items():
        n = len(getattr(corpus, split))
        if n // bsz < length + 1:
            raise RunError(f'the {split} split of {args.data} has {n:,} tokens, too few for one segment of '
                           f'{length} tokens in each of {bsz} batch columns ({(length + 1) * bsz:,} tokens); '
                           f'give {fix}, or more data')


def check_resume(ckpt, args, corpus):
    """A resume continues the checkpoint's run: the same model, the same data cut into the same windows,
    and a --max_step not behind it. Anything else would change the run without saying so."""
    defaults = train_args.build_parser()      # runs saved before a flag existed used its default
    saved = {name: ckpt['args'].get(name, defaults.get_default(name)) for name in ARCHITECTURE_ARGS + DATA_LAYOUT_ARGS}
    saved['gate_name'] = train_args.canonical_router(saved['gate_name'], ckpt['args'].get('freeze_gate', False))
    diffs = [f'--{name} {saved[name]!r} (checkpoint) vs {getattr(args, name)!r}'
             for name in saved if saved[name] != getattr(args, name)]
    saved_anneal = getattr(ModelConfig.from_dict(ckpt['model_config']).router.settings, 'anneal_steps', None)
    if args.moe and args.gate_name == 'dts' and saved_anneal != dts_anneal_steps(args):
        diffs.append(f'DTS-Gate anneals over {saved_anneal} steps in the checkpoint, {dts_anneal_steps(args)} here '
                     f'(--dts_anneal_steps -1 is half of --max_step: give the run\'s --max_step or its '
                     f'--dts_anneal_steps {saved_anneal})')
    signature = data_signature(corpus)
    saved_signature = ckpt['train_state'].get('data_signature', signature)     # older checkpoints have none
    changed = [split for split in signature if saved_signature[split] != signature[split]]
    if ckpt['vocab'] != corpus.vocab.idx2sym or changed:
        diffs.append(f'the data in {args.data} is not the data of the checkpoint (' + (
            f'{", ".join(changed)} split(s) differ' if changed else 'another vocabulary') + ')')
    if diffs:
        raise RunError('--restart: the command line describes another run than the checkpoint (give the run\'s '
                       'own flags, or start a new run): ' + '; '.join(diffs))
    if args.max_step < ckpt['step']:
        raise RunError(f'--restart: --max_step {args.max_step} is below the checkpoint\'s step {ckpt["step"]}, so '
                       f'nothing would be trained; give the run\'s --max_step {ckpt["args"]["max_step"]} (or any '
                       f'value from {ckpt["step"]} on)')


def write_config(run_dir, args, trainer, ddp):
    config = {'args': vars(args), 'model_config': trainer.config, 'git_commit': git_commit(),
              'git_modified': git_tree_modified(), 'torch': torch.__version__, 'world_size': ddp.world_size,
              'params': param_breakdown(trainer.model), 'start_step': trainer.step,
              'precision': evaluation.run_precision(vars(args))}
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    return config


def record_start(log, config, args, command):
    """TensorBoard's record of a new run: its HParams row (the test columns fill at the end) and, in the Text
    tab, the command line and config.json that produced the curves."""
    ks = evaluation.table_ks(config['model_config'], evaluation.parse_ks(args.eval_ks))
    log.hparams(evaluation.run_hparams(config), evaluation.result_tags(dataset_metric(args.dataset), ks),
                evaluation.SHOWN_HPARAMS)
    log.text('run/command', f'    {command}')
    log.text('run/config', '```\n' + json.dumps(config, indent=2) + '\n```')


def record_resume(run_dir, ckpt, args):
    """One line of resumes.jsonl per resume; config.json keeps the arguments the run started with."""
    ignored = ('restart', 'restart_dir', 'work_dir')        # a resume stays in its own directory
    changed = {name: [ckpt['args'].get(name), value] for name, value in vars(args).items()
               if name not in ignored and ckpt['args'].get(name) != value}
    record = {'step': ckpt['step'], 'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'git_commit': git_commit(),
              'git_modified': git_tree_modified(), 'changed': changed}
    with open(os.path.join(run_dir, 'resumes.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')


def resume_hint(command, run_dir):
    """What a stopped run prints after 'stopped at step N; ': the command lines that resume it."""
    return (f'resume with:\n    {resume_command(command, run_dir)}\n(or the script that started it, with --restart '
            f'--restart_dir {shlex.quote(run_dir)} after its flags)')


def resume_command(command, run_dir):
    """The command line that resumes the run in `run_dir`: `command` (the run's own, a shell line) with its
    --restart flags, if any, replaced by those naming `run_dir`."""
    words, kept = shlex.split(command), []
    while words:
        word = words.pop(0)
        name = word.split('=', 1)[0].replace('-', '_')
        if name == '__restart_dir' and '=' not in word and words:
            words.pop(0)
        if name not in ('__restart', '__restart_dir'):
            kept.append(word)
    return shlex.join([*kept, '--restart', '--restart_dir', run_dir])


def record_final_test(trainer, args):
    """Test every kept checkpoint at k in --eval_ks, print the Table-1-shaped result, write results.json; the
    test of the checkpoint the HParams row names goes to its columns (test/<metric>/k<k>, at that checkpoint's
    step), which closes the row."""
    log = trainer.log
    log('=' * 100)
    ks = evaluation.parse_ks(args.eval_ks)
    entries = evaluation.test_checkpoints(trainer.run_dir, trainer.corpus, 'test', ks, args.max_eval_steps,
                                          trainer.ddp.device, log=log)
    evaluation.write_json(os.path.join(trainer.run_dir, 'results.json'), entries)
    entry = evaluation.table_entry({'args': vars(args), 'model_config': trainer.config}, entries)
    if entry is not None:
        log.record(entry['step'], 'test', **evaluation.result_scalars(entry, evaluation.table_ks(trainer.config, ks)))
        log(evaluation.column_note(entry))
    log.end_hparams()
    log('=' * 100)
    log(f'results: {os.path.join(trainer.run_dir, "results.json")}')
