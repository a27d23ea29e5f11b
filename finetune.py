"""Fine-tune a pretrained Transformer-XL (dense or MoE) on text classification (paper Table 3, Table A2).

  python finetune.py --pretrained RUN_OR_CHECKPOINT --task sst2 [--data data/finetune/sst2] [--eval_split dev]
  python finetune.py --table RUN_A RUN_B ...     # Table 3 from the runs' results.json

The backbone, experts and routers are the pretraining checkpoint's (a run directory means its
model_best_dense.pt, the best validation with all experts; a dense run has only model_best.pt). Text
is read with the checkpoint's own byte vocabulary (finetune_data.ByteEncoder), cut to its first
--max_len bytes. A classification head Linear(d_model, n_classes) reads the mean of the last layer's
states over the real tokens (--pool mean; --pool last: the state of the last real token, which with
causal attention is the only one that has seen the whole text, as the original code's final-token
head). Batches are right-padded; attention is causal, so padding never changes a real token's state,
and the pooling skips it. Every batch starts from an empty memory: no context crosses examples.

Fine-tuning is dense (k = E, all experts, as the paper) with the method's frozen parts kept frozen
(SMoE-Dropout's router, HyperRouter's hypernetwork: the rebuilt model marks them requires_grad=False).
There is no checkpoint selection: after the last step the model is tested at every k of --eval_ks
(<= E) on --eval_split, and the run directory (<work_dir>-<task>/<time stamp>) gets model_final.pt,
results.json, config.json, train.log, metrics.jsonl and TensorBoard events. checkpoint_last.pt
(written every --save_interval steps, at each epoch end and on Ctrl-C / SIGTERM) resumes a run
exactly with --restart --restart_dir RUN.

One file of about 600 lines: the classifier, its loading from a pretraining checkpoint, the training loop and
Table 3 are one pipeline behind one command line, none used elsewhere; the data side is finetune_data.py.
"""
import argparse
import json
import os
import shlex
import sys
import time
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluation
import router_registry
from finetune_data import TASKS, ByteEncoder, FinetuneDataError, encode_rows, load_task
from hyper_router import param_breakdown, set_top_k
from mem_transformer import MemTransformerLM
from model_config import router_name
from optimization import NonFiniteLoss, learning_rate, make_optimizer
from run_utils import (RunError, RunLog, StopRequest, git_commit, keep_freed_memory, make_progress, make_run_dir,
                       rng_state, save_atomic, set_rng_state)
from train_args import add

FORMAT = 'hyperrouter-finetune-1'
PRETRAIN_FORMAT = 'hyperrouter-checkpoint'     # the prefix of train.py's formats
FINAL_CHECKPOINT = 'model_final.pt'
# --method -> the paper names (eval.method_name) a checkpoint may carry, and the script that pretrains it: dense,
# and every registered router (router_registry.py)
METHODS = {'dense': (('Dense', 'Dense+Dropout'), 'directly_dense_enwik8.sh or directly_dense_dropout_enwik8.sh'),
           **{spec.name: ((spec.display_name,), f'{spec.name}_enwik8.sh') for spec in router_registry.specs()}}
METHOD_ORDER = ('Dense', 'Dense+Dropout', 'SMoE', 'SMoE-Dropout', 'HyperRouter')
# Flags a resumed run must share with the run it continues.
RESUME_ARGS = ('pretrained', 'task', 'pool', 'max_len', 'batch_size', 'seed', 'dropout', 'epochs', 'max_step')


class FinetuneError(Exception):
    """A checkpoint or a flag that cannot be used; the message says what to change."""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add(p, '--pretrained', help='pretraining run directory of train.py, or one of its checkpoint files')
    add(p, '--method', choices=list(METHODS), help='the method the checkpoint must have been pretrained with')
    add(p, '--task', help=f'task name: {", ".join(TASKS)} or any name for your own data')
    add(p, '--data', help='folder of train.tsv, dev.tsv, test.tsv (default: data/finetune/<task>)')
    add(p, '--eval_split', default='test', choices=['dev', 'test'], help='split of the final test')
    add(p, '--max_len', type=int, default=512, help='keep the first max_len bytes of each text')
    add(p, '--pool', default='mean', choices=['mean', 'last'], help='how the head reads the token states')
    add(p, '--dropout', type=float, help='dropout rate while fine-tuning (default: the pretraining one)')
    add(p, '--optim', default='adam', choices=['adam', 'sgd', 'adagrad'])
    add(p, '--lr', type=float, default=1e-4, help='initial learning rate')
    add(p, '--mom', type=float, default=0.0, help='SGD momentum')
    add(p, '--scheduler', default='cosine', choices=['cosine', 'inv_sqrt', 'constant'],
        help='cosine: annealed to eta_min over the planned steps')
    add(p, '--warmup_step', type=int, default=0, help='linear warm-up steps')
    add(p, '--eta_min', type=float, default=0.0, help='final learning rate of the cosine schedule')
    add(p, '--clip', type=float, default=0.25, help='gradient-norm clipping')
    add(p, '--epochs', type=int, default=3, help='passes over train.tsv')
    add(p, '--max_step', type=int, default=-1, help='stop after this many steps (also the schedule length)')
    add(p, '--stop_step', type=int, default=-1, help='stop after this step with a resumable checkpoint')
    add(p, '--batch_size', type=int, default=16, help='examples per step')
    add(p, '--eval_batch_size', type=int, default=16, help='examples per evaluation batch')
    add(p, '--max_eval_batches', type=int, default=-1, help='evaluate at most this many batches')
    add(p, '--eval_ks', type=evaluation.parse_ks, default=list(evaluation.DEFAULT_KS), help='k of the test (<= E)')
    add(p, '--valid_ks', type=evaluation.parse_ks, default=None,
        help='also measure the dev accuracy at each of these k (<= E) at every epoch end, logged as '
             'valid/accuracy/k<k>; off by default: each k is one more pass over dev.tsv')
    add(p, '--seed', type=int, default=1111, help='random seed (head initialisation, shuffling, dropout)')
    add(p, '--log-interval', type=int, default=50, help='steps between log lines')
    add(p, '--save_interval', type=int, default=1000, help='steps between checkpoint_last.pt writes')
    add(p, '--work_dir', default='runs/finetune/FT', help='runs go to <work_dir>-<task>/<time stamp>')
    add(p, '--cuda', action='store_true', help='fine-tune on the GPU')
    add(p, '--restart', action='store_true', help='resume the run in --restart_dir')
    add(p, '--restart_dir', default='', help='run directory to resume')
    add(p, '--table', nargs='+', metavar='RUN', help="print Table 3 from runs' results.json and exit")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.table:
        return args
    if not args.pretrained or not args.task:
        parser.error('give --pretrained RUN_OR_CHECKPOINT and --task NAME (or --table RUN ...)')
    for name in ('max_len', 'batch_size', 'eval_batch_size', 'epochs', 'log_interval', 'save_interval'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1')
    if args.cuda and not torch.cuda.is_available():
        parser.error('--cuda given but no CUDA device is available; drop --cuda to fine-tune on the CPU')
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        parser.error('finetune.py runs in one process; launch it without torchrun (N_GPU=1)')
    if args.restart and not os.path.isfile(os.path.join(args.restart_dir, evaluation.LAST_CHECKPOINT)):
        parser.error(f'--restart needs --restart_dir RUN holding {evaluation.LAST_CHECKPOINT}; '
                     f'none in {args.restart_dir!r}')
    args.data = args.data or os.path.join('data', 'finetune', args.task)
    return args


# ----------------------------------------------------------------------------- model

class TextClassifier(nn.Module):
    """Pretrained Transformer-XL -> pooled state over the real tokens -> Linear(d_model, n_classes)."""

    def __init__(self, backbone, n_classes, pool='mean', init_std=0.02):
        super().__init__()
        if pool not in ('mean', 'last'):
            raise ValueError(f"pool must be 'mean' or 'last'; got {pool!r}")
        self.backbone, self.pool = backbone, pool
        self.head = nn.Linear(backbone.d_model, n_classes)
        nn.init.normal_(self.head.weight, 0.0, init_std)
        nn.init.zeros_(self.head.bias)

    def pooled(self, hidden, lengths):
        """hidden [T, B, d], lengths [B] -> [B, d], from the first lengths[b] states of column b only."""
        if self.pool == 'last':
            return hidden[lengths - 1, torch.arange(hidden.size(1), device=hidden.device)]
        real = torch.arange(hidden.size(0), device=hidden.device)[:, None] < lengths[None]   # [T, B]
        total = (hidden * real.unsqueeze(-1).to(hidden.dtype)).sum(0)                       # [B, d]
        return total / lengths.unsqueeze(-1).to(hidden.dtype)

    def forward(self, data, lengths):
        """data [T, B] right-padded ids, lengths [B] -> logits [B, n_classes]; no memory in or out."""
        hidden, _ = self.backbone.forward_hidden(data)                      # [T, B, d]
        return self.head(self.pooled(hidden, lengths))


def collate(examples, pad_id, device='cpu'):
    """Right-padded batch: data [T, B] (time-major, T the longest length), lengths [B], labels [B]."""
    lengths = torch.tensor([len(e.ids) for e in examples])
    data = torch.full((int(lengths.max()), len(examples)), pad_id, dtype=torch.long)      # [T, B]
    for b, e in enumerate(examples):
        data[:len(e.ids), b] = torch.from_numpy(e.ids)
    labels = torch.tensor([e.label for e in examples])
    return data.to(device), lengths.to(device), labels.to(device)


class Pretrained(NamedTuple):
    backbone: nn.Module
    model_config: dict      # as rebuilt here (with the fine-tuning dropout)
    encoder: ByteEncoder
    info: dict              # path, method, gate, step, dataset of the pretraining checkpoint


def resolve_pretrained(path):
    """A run directory -> its model_best_dense.pt (model_best.pt for a dense run); a file -> itself."""
    if os.path.isdir(path):
        for name in (evaluation.CHECKPOINTS['best_dense'], evaluation.CHECKPOINTS['best']):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.abspath(os.path.join(path, name))
        raise FinetuneError(f'{path} holds neither {evaluation.CHECKPOINTS["best_dense"]} nor '
                            f'{evaluation.CHECKPOINTS["best"]}: give a pretraining run directory of train.py '
                            'that has validated at least once, or a checkpoint file')
    if not os.path.isfile(path):
        raise FinetuneError(f'no pretrained run or checkpoint at {path}')
    return os.path.abspath(path)


def read_checkpoint(path, expected_format):
    try:
        ckpt = evaluation.load_checkpoint(path)
    except Exception as err:            # whatever makes the file unreadable, the same explanation
        raise FinetuneError(f'{path} is not a checkpoint written by this code (train.py / finetune.py): '
                            f'{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}. '
                            'The original code pickled whole modules; those cannot be loaded') from err
    found = ckpt.get('format', '') if isinstance(ckpt, dict) else ''
    if not found.startswith(expected_format):
        kinds = {PRETRAIN_FORMAT: 'a pretraining checkpoint of train.py',
                 FORMAT: 'a fine-tuning checkpoint of finetune.py'}
        what = next((kind for prefix, kind in kinds.items() if found.startswith(prefix)), f'of format {found!r}'
                    if found else 'not a checkpoint of this code (it has no format entry)')
        raise FinetuneError(f'{path} is {what}; expected {kinds[expected_format]}')
    return ckpt


def check_method(method, model_config, path):
    found = evaluation.method_name(model_config)
    names, script = METHODS[method]
    if found not in names:
        raise FinetuneError(f'--method {method} fine-tunes a {" or ".join(names)} model, but {path} holds a {found} '
                            f'model (gate {router_name(model_config) if model_config["moe"] else "none, dense FFN"}); '
                            f'give it the run of script/table1/{script}, or use the script of {found}')


def load_pretrained(path, method=None, dropout=None, device='cpu'):
    """Pretrained(backbone, model_config, encoder, info) from a pretraining run or checkpoint, checked for use."""
    path = resolve_pretrained(path)
    ckpt = read_checkpoint(path, PRETRAIN_FORMAT)
    config = dict(ckpt['model_config'], moe_backend='auto')     # the backend is this machine's choice
    if method is not None:
        check_method(method, config, path)
    try:
        encoder = ByteEncoder(ckpt['vocab'])
    except FinetuneDataError as err:
        raise FinetuneError(f'{path}: {err}') from err
    if len(ckpt['vocab']) != config['n_token']:
        raise FinetuneError(f'{path}: the vocabulary has {len(ckpt["vocab"])} symbols but the model '
                            f'{config["n_token"]} embeddings')
    if dropout is not None:
        config['dropout'] = dropout
    try:
        backbone = evaluation.model_from_checkpoint({'model_config': config, 'model': ckpt['model']}, device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise FinetuneError(f'the weights in {path} do not fit the model its model_config describes (another '
                            f'architecture or code version): {str(err)[:500]}') from err
    info = {'path': path, 'method': evaluation.method_name(ckpt['model_config']), 'step': ckpt['step'],
            'gate': router_name(config) if config['moe'] else 'dense', 'dataset': ckpt['args']['dataset']}
    return Pretrained(backbone, config, encoder, info)


def n_experts(model_config):
    return model_config['moe_num_expert'] if model_config['moe'] else None


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def accuracy(model, examples, pad_id, batch_size, device, max_batches=-1):
    """Accuracy in percent of model (at its current k); examples sorted by length so batches pad little."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    correct = total = 0
    for b, start in enumerate(range(0, len(order), batch_size)):
        if 0 <= max_batches <= b:
            break
        data, lengths, labels = collate([examples[i] for i in order[start:start + batch_size]], pad_id, device)
        correct += (model(data, lengths).argmax(-1) == labels).sum().item()
        total += len(labels)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def accuracy_over_k(model, model_config, examples, pad_id, args, device):
    """{'k': accuracy} for each k of --eval_ks <= E, or {'dense': accuracy} for a dense model."""
    results = {}
    for k in evaluation.eval_ks(model_config, args.eval_ks):
        if k is not None:
            set_top_k(model, k)
        results['dense' if k is None else str(k)] = accuracy(model, examples, pad_id, args.eval_batch_size, device,
                                                             args.max_eval_batches)
    if model_config['moe']:
        set_top_k(model, n_experts(model_config))
    return results


def task_title(task):
    return TASKS.get(task, task)


def table3_rows(results):
    """The k rows of Table 3: half the experts and all of them (8 and 16 for E = 16), as evaluated."""
    ks = sorted(int(k) for k in results if k != 'dense')
    if not ks:
        return [None]
    return [k for k in (ks[-1] // 2, ks[-1]) if k in ks]


def format_table3(entries):
    """Paper Table 3 shape: a row per method and k (dense rows first, then by k), a column per task; in percent."""
    rows, tasks = {}, []
    for e in entries:
        tasks += [e['dataset']] if e['dataset'] not in tasks else []
        for k in table3_rows(e['results']):
            order = (k or 0, METHOD_ORDER.index(e['method']) if e['method'] in METHOD_ORDER else len(METHOD_ORDER))
            name = e['method'] if k is None else f"{e['method']} (k={k})"
            rows.setdefault((order, name), {})[e['dataset']] = e['results']['dense' if k is None else str(k)]
    tasks.sort(key=lambda t: list(TASKS).index(t) if t in TASKS else len(TASKS))
    width = max([22] + [len(name) + 2 for _, name in rows])
    lines = [' ' * width + ''.join(f'{task_title(t):>11}' for t in tasks)]
    for (_, name), cells in sorted(rows.items()):
        lines.append(f'{name:<{width}}' + ''.join(f'{cells[t]:>11.2f}' if t in cells else f'{"-":>11}' for t in tasks))
    return '\n'.join(lines)


def read_results(paths):
    entries = []
    for path in paths:
        path = os.path.join(path, 'results.json') if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise FinetuneError(f'{path} not found: that fine-tuning run has not finished')
        with open(path) as f:
            entries += json.load(f)
    return entries


# ----------------------------------------------------------------------------- training

def fresh_window():
    """Sums over the steps since the last log line."""
    return {'loss': 0.0, 'steps': 0, 'correct': 0, 'examples': 0, 'start': time.time()}


class FineTuner:
    """The fine-tuning loop and everything a resumed run needs to continue bit for bit."""

    def __init__(self, args, model, pretrained, data, run_dir, device, ckpt=None):
        self.args, self.model, self.pretrained, self.run_dir, self.device = args, model, pretrained, run_dir, device
        self.labels, self.encoder = data.labels, pretrained.encoder
        self.examples = {split: encode_rows(rows, data.labels, self.encoder, args.max_len)
                         for split, rows in data.splits.items()}
        self.pad_id = self.encoder.fallback_id          # any id: padding is never attended to nor pooled
        self.fallback_fraction = self.encoder.unknown_fraction([text for text, _ in data.splits['train']],
                                                               args.max_len)
        self.model.train()                               # the pretrained backbone arrives in eval mode
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, args, device)
        self.steps_per_epoch = -(-len(self.examples['train']) // args.batch_size)
        planned = self.steps_per_epoch * args.epochs
        self.total_steps = min(planned, args.max_step) if args.max_step > 0 else planned
        self.schedule = argparse.Namespace(lr=args.lr, warmup_step=args.warmup_step, scheduler=args.scheduler,
                                           eta_min=args.eta_min, max_step=self.total_steps)
        self.n_expert = n_experts(pretrained.model_config)
        if self.n_expert:
            set_top_k(model, self.n_expert)             # dense fine-tuning: every expert
        self.step, self.epoch, self.batch = 0, 1, 0
        self.stop_signal = 0            # the signal that stopped the run, if one did
        self.window = fresh_window()
        if ckpt is not None:
            self._load_state(ckpt)
        self.log = RunLog(run_dir, True, resume_step=self.step if ckpt is not None else None)

    def epoch_batches(self):
        """This epoch's batches of example indices: a shuffle seeded by (seed, epoch), so a resume redraws it."""
        gen = torch.Generator().manual_seed(self.args.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.examples['train']), generator=gen).tolist()
        return [order[i:i + self.args.batch_size] for i in range(0, len(order), self.args.batch_size)]

    # ---------------------------------------------------------------- state
    def payload(self, kind):
        p = self.pretrained
        return {'format': FORMAT, 'kind': kind, 'step': self.step, 'model_config': p.model_config,
                'labels': self.labels, 'pool': self.args.pool, 'args': vars(self.args),
                'vocab': self.encoder.idx2sym, 'pretrained': p.info, 'model': self.model.state_dict()}

    def save_last(self):
        payload = self.payload('last')
        payload.update(optimizer=self.optimizer.state_dict(), rng=rng_state(self.args.cuda), train_state={
            'epoch': self.epoch, 'batch': self.batch, 'window': self.window})
        save_atomic(payload, os.path.join(self.run_dir, evaluation.LAST_CHECKPOINT))

    def _load_state(self, ckpt):
        if ckpt['labels'] != self.labels:
            raise FinetuneError(f'--restart: the labels of {self.args.data}/train.tsv ({self.labels[:10]}) are not '
                                f'those of the run ({ckpt["labels"][:10]}): the data changed')
        self.model.load_state_dict(ckpt['model'])
        self.optimizer.load_state_dict(ckpt['optimizer'])
        state = ckpt['train_state']
        self.step, self.epoch, self.batch = ckpt['step'], state['epoch'], state['batch']
        self.window = {**state['window'], 'start': time.time()}
        set_rng_state(ckpt['rng'], self.args.cuda)

    # ---------------------------------------------------------------- training
    def train_step(self, indices):
        """One optimiser update on the examples `indices`; returns (loss, number correct)."""
        data, lengths, labels = collate([self.examples['train'][i] for i in indices], self.pad_id, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(data, lengths)                                  # [B, C]
        loss = F.cross_entropy(logits.float(), labels)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f'non-finite training loss ({loss.item()}) at step {self.step + 1}')
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.args.clip)
        for group in self.optimizer.param_groups:
            group['lr'] = learning_rate(self.step, self.schedule)
        self.optimizer.step()
        return loss.item(), (logits.argmax(-1) == labels).sum().item()

    def log_progress(self, loss, correct, n):
        w = self.window
        w['loss'], w['steps'], w['correct'], w['examples'] = (w['loss'] + loss, w['steps'] + 1,
                                                               w['correct'] + correct, w['examples'] + n)
        if self.step % self.args.log_interval:
            return
        elapsed = time.time() - w['start']
        mean, acc = w['loss'] / w['steps'], 100.0 * w['correct'] / w['examples']
        lr = self.optimizer.param_groups[0]['lr']
        self.log(f'| epoch {self.epoch:3d} step {self.step:>7d} | {self.batch:>6d}/{self.steps_per_epoch} batches '
                 f'| lr {lr:.3g} | ms/batch {elapsed * 1000 / w["steps"]:6.1f} | loss {mean:6.4f} '
                 f'| accuracy {acc:6.2f}' + (f' | k {self.n_expert}' if self.n_expert else ''))
        self.log.record(self.step, 'train', loss=mean, accuracy=acc, lr=lr, top_k=self.n_expert,
                        examples_per_s=w['examples'] / max(elapsed, 1e-9))
        self.window = fresh_window()

    def end_epoch(self):
        """Dense dev accuracy (for the log only: no checkpoint is selected on it), then checkpoint_last.pt."""
        if 'dev' in self.examples:
            acc = accuracy(self.model, self.examples['dev'], self.pad_id, self.args.eval_batch_size, self.device,
                           self.args.max_eval_batches)
            self.log(f'| end of epoch {self.epoch:3d} at step {self.step:>7d} | dev accuracy {acc:6.2f}'
                     + (f' | k {self.n_expert} (all experts)' if self.n_expert else ''))
            self.log.record(self.step, 'valid', accuracy=acc, top_k=self.n_expert, epoch=self.epoch)
            self.dev_at_ks()
        self.epoch, self.batch = self.epoch + 1, 0
        self.save_last()

    def dev_at_ks(self):
        """--valid_ks: the dev accuracy at each k, logged as valid/accuracy/k<k>; then back to every expert."""
        if not (self.args.valid_ks and self.n_expert):
            return
        values = {}
        for k in evaluation.eval_ks(self.pretrained.model_config, self.args.valid_ks):
            set_top_k(self.model, k)
            values[f'accuracy/k{k}'] = accuracy(self.model, self.examples['dev'], self.pad_id,
                                                self.args.eval_batch_size, self.device, self.args.max_eval_batches)
        set_top_k(self.model, self.n_expert)
        self.log('| dev accuracy at k ' + ', '.join(f'{name[10:]}: {value:6.2f}' for name, value in values.items()))
        self.log.record(self.step, 'valid', **values)

    def run(self):
        """Train for the planned steps ('done') or until stopped by a signal or --stop_step ('stopped')."""
        progress = make_progress(self.total_steps, self.step, True)
        with StopRequest() as stop:
            while self.step < self.total_steps:
                batches = self.epoch_batches()
                while self.batch < len(batches) and self.step < self.total_steps:
                    loss, correct = self.train_step(batches[self.batch])
                    self.batch, self.step = self.batch + 1, self.step + 1
                    progress.update(1)
                    self.log_progress(loss, correct, len(batches[self.batch - 1]))
                    if stop.requested or self.step == self.args.stop_step:
                        self.stop_signal = stop.signum or 0
                        self.save_last()
                        progress.close()
                        return 'stopped'
                    if self.step % self.args.save_interval == 0:
                        self.save_last()
                if self.batch == len(batches):
                    self.end_epoch()
        progress.close()
        return 'done'


# ----------------------------------------------------------------------------- the run

def resume_pretrained(ckpt, device):
    """The backbone architecture, encoder and pretraining facts of a fine-tuning checkpoint (weights come later)."""
    backbone = MemTransformerLM(**ckpt['model_config']).to(device)
    return Pretrained(backbone, ckpt['model_config'], ByteEncoder(ckpt['vocab']), ckpt['pretrained'])


def check_resume(saved_args, args):
    diffs = [f'--{name} {saved_args.get(name)!r} (run) vs {getattr(args, name)!r}'
             for name in RESUME_ARGS if saved_args.get(name) != getattr(args, name)]
    if diffs:
        raise FinetuneError('--restart: the command line describes another fine-tuning run: ' + '; '.join(diffs))


def results_entry(tuner, results):
    """A results.json entry with the keys of eval.results_entry, plus the pretrained checkpoint's path."""
    info = tuner.pretrained.info
    return {'dataset': tuner.args.task, 'metric': 'accuracy', 'split': tuner.args.eval_split, 'gate': info['gate'],
            'method': info['method'], 'checkpoint': 'final', 'step': tuner.step, 'seed': tuner.args.seed,
            'results': results, 'pretrained': info['path']}


def final_test(tuner):
    """Save model_final.pt, test it at each k, print the per-k table and the Table 3 rows, write results.json."""
    args, log = tuner.args, tuner.log
    save_atomic(tuner.payload('final'), os.path.join(tuner.run_dir, FINAL_CHECKPOINT))
    examples = tuner.examples[args.eval_split]
    results = accuracy_over_k(tuner.model, tuner.pretrained.model_config, examples, tuner.pad_id, args, tuner.device)
    entry = results_entry(tuner, results)
    evaluation.write_json(os.path.join(tuner.run_dir, 'results.json'), [entry])
    log.record(tuner.step, args.eval_split, **evaluation.result_scalars(entry, table_ks(tuner)))
    log.end_hparams()
    log('=' * 100)
    log(f'{args.eval_split} accuracy (%) of the fine-tuned {entry["method"]} on {task_title(args.task)} '
        f'({len(examples)} examples, step {tuner.step}):')
    log(evaluation.format_table({entry['method']: results}, 'accuracy'))
    log('Table 3 (accuracy %):')
    log(format_table3([entry]))
    log('=' * 100)
    log(f'results: {os.path.join(tuner.run_dir, "results.json")}')


def setup(args, device):
    """Load the data and the model (pretrained, or the run being resumed) and check them; returns a FineTuner."""
    args.pretrained = resolve_pretrained(args.pretrained)
    data = load_task(args.data)
    if args.eval_split not in data.splits:
        raise FinetuneError(f'no {args.eval_split}.tsv in {args.data} to test on' + (
            ' (GLUE SST-2 has no labelled test set: use --eval_split dev, as script/table2/sst2/*.sh do)'
            if args.eval_split == 'test' else ''))
    ckpt = None
    if args.restart:
        ckpt = read_checkpoint(os.path.join(args.restart_dir, evaluation.LAST_CHECKPOINT), FORMAT)
        check_resume(ckpt['args'], args)
        pretrained = resume_pretrained(ckpt, device)
    else:
        pretrained = load_pretrained(args.pretrained, args.method, args.dropout, device)
    torch.manual_seed(args.seed)
    model = TextClassifier(pretrained.backbone, len(data.labels), args.pool,
                           pretrained.model_config['init_std']).to(device)
    run_dir = args.restart_dir if args.restart else make_run_dir(f'{args.work_dir}-{args.task}')
    return FineTuner(args, model, pretrained, data, run_dir, device, ckpt)


def write_config(tuner):
    args = tuner.args
    config = {'args': vars(args), 'model_config': tuner.pretrained.model_config, 'pretrained': tuner.pretrained.info,
              'labels': tuner.labels, 'examples': {s: len(e) for s, e in tuner.examples.items()},
              'fallback_byte_fraction': tuner.fallback_fraction,
              'steps': {'per_epoch': tuner.steps_per_epoch, 'total': tuner.total_steps},
              'params': param_breakdown(tuner.model), 'git_commit': git_commit(), 'torch': torch.__version__,
              'start_step': tuner.step}
    with open(os.path.join(tuner.run_dir, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    return config


def table_ks(tuner):
    """The k columns of the run's HParams row: --eval_ks up to E (a dense model's value goes in the last)."""
    return evaluation.table_ks(tuner.pretrained.model_config, tuner.args.eval_ks)


def run_hparams(tuner):
    """The run's columns in TensorBoard's HParams table, those of a train.py run (evaluation.run_hparams): k 'all',
    as fine-tuning uses every expert; the test columns show the final model; and the pretrained checkpoint."""
    args, info, model = tuner.args, tuner.pretrained.info, tuner.pretrained.model_config
    return {'method': info['method'], 'gate': info['gate'], 'k': 'all', 'experts': tuner.n_expert or 0,
            'layers': model['n_layer'], 'd_model': model['d_model'], 'dropout': model['dropout'], 'lr': args.lr,
            'steps': tuner.total_steps, 'batch': args.batch_size, 'dataset': args.task, 'seed': args.seed,
            'checkpoint': 'final', 'pretrained': info['path']}


def record_start(tuner, config, command):
    """TensorBoard's record of the run: its HParams row (filled by the final test) and, in the Text tab, the
    command line and config.json; a resumed run adds its command line at the step it resumed from."""
    if tuner.args.restart:
        tuner.log.text('run/command', f'    {command}', tuner.step)
        return
    tuner.log.hparams(run_hparams(tuner), evaluation.result_tags('accuracy', table_ks(tuner), tuner.args.eval_split),
                      evaluation.SHOWN_HPARAMS)
    tuner.log.text('run/command', f'    {command}')
    tuner.log.text('run/config', '```\n' + json.dumps(config, indent=2) + '\n```')


def log_header(tuner, config):
    args, info, log = tuner.args, tuner.pretrained.info, tuner.log
    log(f'run directory: {tuner.run_dir}' + (f' (resumed at step {tuner.step})' if args.restart else ''))
    log('    ' + ' '.join(f'--{k} {v}' for k, v in vars(args).items()))
    log(f'pretrained: {info["method"]} (gate {info["gate"]}, step {info["step"]}, {info["dataset"]}) '
        f'from {info["path"]}')
    log(f'task {args.task}: ' + ', '.join(f'{s} {n:,}' for s, n in config['examples'].items())
        + f'; {len(tuner.labels)} labels; {tuner.fallback_fraction:.3%} of the train bytes are outside '
        f'the vocabulary (read as id {tuner.pad_id})')
    log(f'{tuner.steps_per_epoch} steps per epoch, {tuner.total_steps} in all; parameters: {config["params"]}')


def main(argv=None):
    """Returns the exit status: None (0) when the run finished or stopped at --stop_step, 128 + the signal
    (130, 143) when Ctrl-C / SIGTERM stopped it after writing its checkpoint, as train.py."""
    args = parse_args(argv)
    command = shlex.join(['python', 'finetune.py', *(sys.argv[1:] if argv is None else argv)])
    keep_freed_memory()
    try:
        if args.table:
            print(format_table3(read_results(args.table)))
            return
        tuner = setup(args, torch.device('cuda' if args.cuda else 'cpu'))
    except (FinetuneError, FinetuneDataError, RunError) as err:
        sys.exit(f'error: {err}')
    log = tuner.log
    config = write_config(tuner)
    record_start(tuner, config, command)
    log_header(tuner, config)
    try:
        status = tuner.run()
    except NonFiniteLoss as err:
        log(f'{err}; stopping. The last good checkpoint is '
            f'{os.path.join(tuner.run_dir, evaluation.LAST_CHECKPOINT)}')
        sys.exit(1)
    if status == 'stopped':
        log(f'stopped at step {tuner.step}; resume with: python finetune.py <same flags> --restart '
            f'--restart_dir {tuner.run_dir}')
    else:
        final_test(tuner)
    log.close()
    return 128 + tuner.stop_signal if tuner.stop_signal else None


if __name__ == '__main__':
    sys.exit(main())
