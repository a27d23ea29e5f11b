"""Pretrain a Transformer-XL with mixture-of-experts layers (SMoE, SMoE-Dropout, HyperRouter, THOR, HyperMoE, dense).

  python train.py --dataset synthetic --moe --gate_name HyperRouterGate --dynamic_moe ...
  torchrun --nproc_per_node 4 train.py ...        # DistributedDataParallel, one process per GPU

Accepts the original scripts' flags (`--moe-num-expert` and `--moe_num_expert` alike). Each run
writes a time-stamped directory under `<work_dir>-<dataset>/` holding config.json (resolved
arguments, model configuration, git commit), the sources, train.log, metrics.jsonl, TensorBoard
events, checkpoints and results.json. `--restart --restart_dir RUN` resumes a run exactly where its
checkpoint_last.pt left it; Ctrl-C or SIGTERM writes that checkpoint before exiting.

Exit status: 0 when the run finished or stopped at --stop_step; 130 / 143 (128 + the signal) when
Ctrl-C / SIGTERM stopped it after writing its checkpoint; 1 for an `error: ...` line or a non-finite
loss; 2 for a bad command line.
"""
import contextlib
import math
import os
import shlex
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import evaluation
import train_args
from data_utils import DataError, dataset_metric, get_lm_corpus, loss_to_metric
from hyper_router import moe_gates, param_breakdown, set_top_k, top_k_schedule
from mem_transformer import MemTransformerLM, ThorObjective
from moe import (AUX_LOSSES, describe_engine, learned_temperatures, record_router_stats, record_routing, set_capacity,
                 uses_thor)
from optimization import NonFiniteLoss, learning_rate, make_optimizer
from run_records import (check_data_fits, check_resume, data_signature, record_final_test, record_resume, record_start,
                         resume_hint, write_config)
from run_utils import (Distributed, RunError, RunLock, RunLog, StopRequest, describe_os_error, keep_freed_memory,
                       make_progress, make_run_dir, rng_state, save_atomic, set_rng_state)
from train_args import aux_weights, model_config


def parse_args(argv=None):
    """The command line (train_args.py), with this docstring as --help's description."""
    return train_args.parse_args(argv, __doc__)


def set_matmul_precision(args):
    """TF32 for fp32 matmuls and convolutions on the GPU unless --no_tf32: PyTorch < 1.12 used it by
    default on A100, the original code's runs with it; without it a plain fp32 run is several times slower."""
    if args.cuda:
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.allow_tf32 = not args.no_tf32


def compile_model(module):
    """torch.compile for training. Every k of a dynamic-k schedule (8..16) and the first, memory-less
    segment is a graph of its own, more than dynamo's default limit of 8 recompilations."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    return torch.compile(module)


def current_top_k(step, args):
    if args.dynamic_moe:
        return top_k_schedule(step, args.dynamic_moe_mode, args.moe_top_k_min, args.moe_top_k_max,
                              args.dynamic_overall_steps)
    return args.moe_top_k


class Trainer:
    """The training loop and everything a resumed run needs to continue bit for bit."""

    def __init__(self, args, ddp, corpus, run_dir, ckpt=None):
        self.args, self.ddp, self.corpus, self.run_dir = args, ddp, corpus, run_dir
        self.config = model_config(args, len(corpus.vocab))
        torch.manual_seed(args.seed)
        self.model = MemTransformerLM(**self.config).to(ddp.device)
        set_capacity(self.model, args.capacity_factor, args.eval_capacity_factor, args.capacity_group_size)
        self.aux_weights = {name: weight for name, weight in aux_weights(args).items() if weight > 0}
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, args, ddp.device)
        self.thor = uses_thor(args.moe, args.gate_name)
        self.ddp_model = None           # the DistributedDataParallel module under torchrun
        self.para_model = self._wrap(ThorObjective(self.model) if self.thor else self.model)
        if args.compile:
            self.para_model = compile_model(self.para_model)
        self.tr_iter = corpus.get_iterator('train', args.batch_size, args.tgt_len, ddp.device, args.ext_len)
        self.va_iter = corpus.get_iterator('valid', evaluation.EVAL_BATCH_SIZE, args.eval_tgt_len, ddp.device,
                                           args.ext_len)
        self.metric = dataset_metric(args.dataset)
        self.valid_ks = evaluation.eval_ks(self.config, args.valid_ks) if args.moe and args.valid_ks else []
        self.data_signature = data_signature(corpus) if ddp.is_main else None
        self.step, self.epoch, self.batch = 0, 1, 0
        self.best = {'best': math.inf, 'best_dense': math.inf}
        self.mems = self._fresh_mems()
        self.window = dict(loss=0.0, steps=0, tokens=0, start=time.time())
        self.terms = {}     # the last step's extra loss terms (THOR consistency, auxiliary losses), for the log
        self.dropped = {}   # the last step's fraction of routed slots dropped over capacity, per MoE layer
        self.saved_step = None          # step of checkpoint_last.pt, once there is one
        self.first_bad = torch.zeros((), dtype=torch.long, device=ddp.device)   # first non-finite step, 0: none
        self.stop_signal = 0            # the signal that stopped the run, if one did
        if ckpt is not None:
            self._load_state(ckpt)
        self.log = RunLog(run_dir, ddp.is_main, resume_step=self.step if ckpt is not None else None,
                          log_offset=ckpt['train_state'].get('log_offset') if ckpt is not None else None)

    def _wrap(self, model):
        if self.ddp.world_size > 1:
            # no buffer changes in training (the positional frequencies and Hash's table are constants), so DDP
            # need not broadcast them before every forward
            device_ids = [self.ddp.local_rank] if self.args.cuda else None
            self.ddp_model = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
            return self.ddp_model
        if self.args.multi_gpu and self.args.cuda and torch.cuda.device_count() > 1:
            return torch.nn.DataParallel(model, dim=1)      # the batch is dimension 1 ([T, B])
        return model

    def _fresh_mems(self):
        return [() for _ in range(self.args.batch_chunk)]

    def _local_columns(self, tensor):
        """This rank's share of the global batch [T, B] -> [T, B / world_size]."""
        return tensor.chunk(self.ddp.world_size, 1)[self.ddp.rank]

    # ---------------------------------------------------------------- state
    def _global_mems(self):
        """The training memory of every rank and chunk, as one [M, B, d] tensor per layer (or None)."""
        if not self.mems[0]:
            return None
        per_layer = [torch.cat([chunk[i] for chunk in self.mems], 1) for i in range(len(self.mems[0]))]
        return [self.ddp.gather_columns(m).cpu() for m in per_layer]

    def _set_mems(self, global_mems):
        if global_mems is None:
            self.mems = self._fresh_mems()
            return
        local = [self._local_columns(m.to(self.ddp.device)) for m in global_mems]
        chunks = [m.chunk(self.args.batch_chunk, 1) for m in local]
        self.mems = [tuple(layer[c].contiguous() for layer in chunks) for c in range(self.args.batch_chunk)]

    def _payload(self, kind, val_loss=None):
        return {'format': 'hyperrouter-checkpoint-1', 'kind': kind, 'step': self.step, 'val_loss': val_loss,
                'model_config': self.config, 'args': vars(self.args), 'vocab': self.corpus.vocab.idx2sym,
                'model': self.model.state_dict()}

    def save_last(self):
        """checkpoint_last.pt: model, optimiser, RNG, data position and memory (collective under DDP)."""
        mems, window = self._global_mems(), self._host_window()
        if not self.ddp.is_main:
            return
        payload = self._payload('last')
        payload.update(optimizer=self.optimizer.state_dict(), rng=rng_state(self.args.cuda), train_state={
            'epoch': self.epoch, 'batch': self.batch, 'mems': mems, 'best': self.best, 'window': window,
            'log_offset': self.log.offset(), 'data_signature': self.data_signature})
        save_atomic(payload, os.path.join(self.run_dir, evaluation.LAST_CHECKPOINT))
        self.saved_step = self.step

    def _load_state(self, ckpt):
        self.model.load_state_dict(ckpt['model'])
        self.optimizer.load_state_dict(ckpt['optimizer'])
        state = ckpt['train_state']
        self.step, self.epoch, self.batch = ckpt['step'], state['epoch'], state['batch']
        self.saved_step = self.step
        self.best, self.window = state['best'], dict(state['window'], start=time.time())
        self._set_mems(state['mems'])
        set_rng_state(ckpt['rng'], self.args.cuda)

    # ---------------------------------------------------------------- training
    def train_step(self, data, target):
        """One optimiser update on the global batch; returns this rank's mean NLL as a float64 device tensor.

        The objective adds THOR's consistency term and the auxiliary losses that are on; their batch means
        go to self.terms, and the fractions of routed slots dropped over capacity to self.dropped, for the log.
        Nothing is read back to the host: the values stay on the device until the log line (log_progress)
        reads a whole window of steps back at once, and checks then that they are finite (check_finite).
        Sums in float64, chunk by chunk in order, as the Python floats they replace.
        """
        data, target = self._local_columns(data), self._local_columns(target)
        chunks = list(zip(data.chunk(self.args.batch_chunk, 1), target.chunk(self.args.batch_chunk, 1)))
        self.optimizer.zero_grad(set_to_none=True)
        total, terms, dropped = 0.0, {}, {}
        for i, (data_i, target_i) in enumerate(chunks):
            with self._gradient_sync(i == len(chunks) - 1):
                nll, extra, dropped_i = self._chunk_forward(i, data_i, target_i)
                objective = nll + sum(weight * value for value, weight in extra.values())
                (objective / len(chunks)).backward()
            total = total + nll.detach().double() / len(chunks)
            for name, (value, _) in extra.items():
                terms[name] = terms.get(name, 0.0) + value.detach().double() / len(chunks)
            for layer, value in dropped_i.items():
                dropped[layer] = dropped.get(layer, 0.0) + value.double() / len(chunks)
        self.terms, self.dropped = terms, dropped
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.args.clip)
        self._watch_finite(torch.stack([total, *terms.values(), grad_norm.double()]))
        for group in self.optimizer.param_groups:
            group['lr'] = learning_rate(self.step, self.args)
        self.optimizer.step()
        return total

    def _gradient_sync(self, last_chunk):
        """Under DDP the gradients are all-reduced in the backward of the last batch chunk only: the chunks before
        it accumulate theirs locally (no_sync), one all-reduce per step instead of one per chunk."""
        if self.ddp_model is None or last_chunk:
            return contextlib.nullcontext()
        return self.ddp_model.no_sync()

    def _watch_finite(self, values):
        """Remember, on the device, the first step whose loss, terms or gradient norm (values) is not finite."""
        bad = ~torch.isfinite(values).all()
        step = torch.full((), self.step + 1, device=values.device)
        self.first_bad = torch.where(bad & (self.first_bad == 0), step, self.first_bad)

    def check_finite(self):
        """NonFiniteLoss when a step since the last check was not finite (one host read). Before every log line
        and every checkpoint: a non-finite model is never saved; the run stops at the next check, naming the
        first bad step (the updates after it are lost with the run, which resumes from its last checkpoint)."""
        first_bad = int(self.ddp.max(self.first_bad))          # every rank stops together
        if not first_bad:
            return
        w = self._host_window()
        values = {name: w[name] / max(w['steps'], 1) for name in ('loss', *self.terms)}   # the window's means
        seen = f' (seen at step {self.step}: the loss is read back every --log-interval steps)'
        if all(math.isfinite(value) for value in values.values()):
            what = f'non-finite gradient norm at step {first_bad} (training loss {values["loss"]})'
        else:
            detail = ''.join(f', {name} {value}' for name, value in values.items() if name != 'loss')
            what = f'non-finite training loss ({values["loss"]}{detail}) at step {first_bad}'
        raise NonFiniteLoss(what + (seen if first_bad != self.step else ''))

    def _chunk_forward(self, i, data, target):
        """Forward of batch chunk i, its memory updated: (mean NLL, {extra term: (mean value, weight)},
        {MoE layer: fraction of its routed slots dropped over capacity})."""
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=self.args.amp), self._recording() as record:
            out = self.para_model(data, target, *self.mems[i])
        extra, dropped = {}, {}
        if self.thor:                       # ThorObjective: [nll, consistency, *mems]
            extra['consistency'] = (out.pop(1).float().mean(), 0.5 * self.args.thor_alpha)
        if record is not None:              # one loss per MoE layer and pass, summed; THOR's two passes averaged
            passes = 2 if self.thor else 1
            extra.update({name: (value / passes, self.aux_weights[name]) for name, value in record.loss_sums().items()})
            dropped = record.dropped_means()
        self.mems[i] = tuple(out[1:])
        return out[0].float().mean(), extra, dropped

    def _recording(self):
        """Record the auxiliary losses (and the dropped fractions) when some are on, else nothing at all."""
        if self.aux_weights or self.args.capacity_factor is not None:
            return record_routing(self.model, tuple(self.aux_weights))
        return contextlib.nullcontext()

    def _host_window(self):
        """The window's sums as Python floats: its device tensors read back in one transfer (one all-reduce of
        them all under DDP, each rank's sum then averaged: the mean over ranks of each step's mean before)."""
        w = self.window
        names = [name for name, value in w.items() if isinstance(value, torch.Tensor)]
        if not names:
            return dict(w)
        values = torch.stack([w[name] for name in names])
        values = self.ddp.mean(values)
        return dict(w, **dict(zip(names, values.tolist())))

    def log_progress(self, loss, n_tokens):
        """Add the step to the window; every --log-interval steps, read it back (once), check it and log it."""
        w = self.window
        w['loss'] = w['loss'] + loss
        w['steps'] += 1
        w['tokens'] += n_tokens
        for name, value in self.terms.items():
            w[name] = w.get(name, 0.0) + value
        for layer, value in self.dropped.items():
            w[f'train_dropped/layer{layer}'] = w.get(f'train_dropped/layer{layer}', 0.0) + value
        if self.step % self.args.log_interval:
            return
        self.check_finite()
        w = self._host_window()
        elapsed = time.time() - w['start']
        mean = w['loss'] / w['steps']
        lr = self.optimizer.param_groups[0]['lr']
        k = current_top_k(self.step - 1, self.args) if self.args.moe else None
        terms = {name: w[name] / w['steps'] for name in self.terms}
        aux = {name: terms.pop(name) for name in AUX_LOSSES if name in terms}
        self.log(f'| epoch {self.epoch:3d} step {self.step:>8d} | {self.batch:>6d} batches | lr {lr:.3g} '
                 f'| ms/batch {elapsed * 1000 / w["steps"]:5.2f} | loss {mean:5.2f} '
                 f'| {self.metric} {loss_to_metric(mean, self.args.dataset):9.5f}' + (f' | k {k}' if k else '')
                 + ''.join(f' | {name} {value:.4g}' for name, value in {**terms, **aux}.items()))
        memory = {'peak_mem_gib': torch.cuda.max_memory_allocated(self.ddp.device) / 2 ** 30} if self.args.cuda else {}
        self.log.record(self.step, 'train', loss=mean, lr=lr, top_k=k,
                        tokens_per_s=w['tokens'] / max(elapsed, 1e-9), **memory,
                        **{self.metric: loss_to_metric(mean, self.args.dataset)}, **terms)
        if aux:
            self.log.record(self.step, 'aux', **aux)                   # TensorBoard aux/<name>
        if self.dropped:
            names = [f'train_dropped/layer{layer}' for layer in self.dropped]
            self.log.record(self.step, 'router', **{name: w[name] / w['steps'] for name in names})   # TensorBoard
        temperatures = learned_temperatures(self.model)
        if temperatures:                                                # TensorBoard router/temperature/layer<i>
            self.log.record(self.step, 'router', **{f'temperature/layer{i}': t for i, t in temperatures.items()})
        self.window = dict(loss=0.0, steps=0, tokens=0, start=time.time())

    def validate(self):
        """Validation with all experts, at each k of --valid_ks, and at k = --moe-top-k (main rank); keeps the
        best checkpoint of the first and the last.

        Its time (and the checkpoints') is left out of the speed that the next log line reports.
        """
        start = time.time()
        if self.ddp.is_main:
            losses = {}
            if self.args.moe:
                losses['best_dense'] = self._valid_loss(self.args.moe_num_expert)
                self._validate_at_ks(start)
                set_top_k(self.model, self.args.moe_top_k)
            with record_router_stats(self.model) as stats:
                losses['best'] = self._valid_loss()
            self.log.router_stats(self.step, stats, capacity=self.args.eval_capacity_factor is not None)
            for kind, loss in losses.items():
                self._report_validation(kind, loss, time.time() - start)
                if loss < self.best[kind]:
                    self.best[kind] = loss
                    save_atomic(self._payload(kind, loss), os.path.join(self.run_dir, evaluation.CHECKPOINTS[kind]))
        self.save_last()
        self.ddp.barrier()
        self.window['start'] += time.time() - start

    def _valid_loss(self, k=None):
        """The validation loss, at k experts per token (None: the k the model has)."""
        if k is not None:
            set_top_k(self.model, k)
        return evaluation.evaluate(self.model, self.va_iter, vars(self.args), self.args.max_eval_steps)

    def _validate_at_ks(self, start):
        """--valid_ks: the validation metric at each k, logged as valid/<metric>/k<k>. Evaluation draws nothing from
        the global RNG (THOR's random routing has its own stream, restarted by each evaluation), so the run trains
        and validates as without the flag."""
        if not self.valid_ks:
            return
        began = time.time()
        metric = {k: loss_to_metric(self._valid_loss(k), self.args.dataset) for k in self.valid_ks}
        self.log(f'| valid {self.metric} at k ' + ', '.join(f'{k}: {value:.5f}' for k, value in metric.items())
                 + f' | time: {time.time() - began:5.2f}s of the validation\'s {time.time() - start:5.2f}s')
        self.log.record(self.step, 'valid', **{f'{self.metric}/k{k}': value for k, value in metric.items()})

    def describe_valid_ks(self):
        """The cost of --valid_ks, for the log: its passes over the validation windows besides the standard two."""
        windows = min(len(self.va_iter), self.args.max_eval_steps if self.args.max_eval_steps > 0 else math.inf)
        n = len(self.valid_ks)
        return (f'--valid_ks {",".join(map(str, self.valid_ks))}: {n} more passes over the {windows} validation '
                f'windows at every validation, which takes about {(2 + n) / 2:.1f} times as long')

    def _report_validation(self, kind, loss, elapsed):
        dense = kind == 'best_dense'
        k = self.args.moe_num_expert if dense else (self.args.moe_top_k if self.args.moe else None)
        value = loss_to_metric(loss, self.args.dataset)
        self.log('-' * 100)
        self.log(f'| Eval {self.step // self.args.eval_interval:3d} at step {self.step:>8d} | time: {elapsed:5.2f}s '
                 f'| {"Dense " if dense else ""}valid loss {loss:5.2f} | {self.metric} {value:9.5f}'
                 + (f' | k {k}' if k else ''))
        self.log('-' * 100)
        self.log.record(self.step, 'valid', tensorboard=False, loss=loss, top_k=k,
                        experts='all' if dense else 'top_k', **{self.metric: value})
        group = 'valid/all_experts' if dense else (f'valid/k{k}' if k else 'valid')    # one curve per tag
        self.log.scalars(self.step, group, {'loss': loss, self.metric: value})

    def run(self):
        """Train until max_step ('done') or until stopped by a signal or --stop_step ('stopped')."""
        progress = make_progress(self.args.max_step, self.step, self.ddp.is_main)
        with StopRequest() as stop:
            while self.step < self.args.max_step:
                for data, target, _ in self.tr_iter.iter_from(self.batch):
                    self.batch += 1
                    if self.args.moe:
                        set_top_k(self.model, current_top_k(self.step, self.args))
                        for _, gate in moe_gates(self.model):
                            gate.set_step(self.step)
                    loss = self.train_step(data, target)
                    self.step += 1
                    progress.update(1)
                    self.log_progress(loss, target.numel())
                    if self.step % self.args.eval_interval == 0 or self.step == self.args.max_step:
                        self.check_finite()
                        self.validate()
                    if self._should_stop(stop):
                        self.check_finite()
                        self.save_last()
                        progress.close()
                        return 'stopped'
                    if self.step == self.args.max_step:
                        break
                else:
                    self.epoch, self.batch, self.mems = self.epoch + 1, 0, self._fresh_mems()
        progress.close()
        return 'done'

    def _should_stop(self, stop):
        """After a signal on any rank, or at --stop_step; the signal is kept for the exit status. Under DDP the
        ranks agree on a signal (an all-reduce read back) at log, evaluation and stop steps only, where the host
        waits anyway: a signal stops the run within --log-interval steps, and no other step reads back."""
        args = self.args
        if self.ddp.world_size == 1 or any(self.step % n == 0 for n in (args.log_interval, args.eval_interval)) \
                or self.step in (args.max_step, args.stop_step):
            self.stop_signal = int(self.ddp.max(stop.signum or 0))
        return self.stop_signal > 0 or self.step == args.stop_step

    def checkpoint_note(self):
        """Where a stopped run can resume from, for the log."""
        if self.saved_step is None:
            return (f'no checkpoint was written before it (the first comes with the validation at step '
                    f'{self.args.eval_interval})')
        return (f'the last good checkpoint is {os.path.join(self.run_dir, evaluation.LAST_CHECKPOINT)} '
                f'(step {self.saved_step})')


def load_corpus(args, ddp):
    """Rank 0 first (it may build the cache), then the others."""
    if ddp.is_main:
        corpus = get_lm_corpus(args.data, args.dataset)
    ddp.barrier()
    if not ddp.is_main:
        corpus = get_lm_corpus(args.data, args.dataset)
    return corpus


def train_in(run_dir, args, ddp, corpus, ckpt, command):
    """Train in `run_dir` (None off the main rank); returns the exit status."""
    torch.manual_seed(args.seed)
    trainer = Trainer(args, ddp, corpus, run_dir, ckpt)
    log = trainer.log
    if ddp.is_main:
        if ckpt is None:
            record_start(log, write_config(run_dir, args, trainer, ddp), args, command)
        else:
            record_resume(run_dir, ckpt, args)
            log.text('run/command', f'    {command}', trainer.step)
    log(f'run directory: {run_dir}' + (f' (resumed at step {trainer.step})' if ckpt else ''))
    log('    ' + ' '.join(f'--{k} {v}' for k, v in vars(args).items()))
    log(f'parameters: {param_breakdown(trainer.model)}')
    if args.moe:
        log(describe_engine(trainer.model, ddp.device, torch.bfloat16 if args.amp else torch.float32, args.compile))
    if trainer.valid_ks:
        log(trainer.describe_valid_ks())
    if args.cuda:
        log(f'fp32 matmuls in TF32: {"no (--no_tf32)" if args.no_tf32 else "yes (--no_tf32 turns it off)"}')
    try:
        status = trainer.run()
    except NonFiniteLoss as err:
        log(f'{err}; stopping: {trainer.checkpoint_note()}')
        log.close()
        return 1
    if status == 'stopped':
        log(f'stopped at step {trainer.step}; {resume_hint(command, run_dir)}')
    elif ddp.is_main:
        record_final_test(trainer, args)
    log.close()
    return 128 + trainer.stop_signal if trainer.stop_signal else 0


def start(args, ddp, command):
    """Check the data (and the checkpoint to resume), claim the run directory, train; returns the exit status.
    `command` is the command line, recorded with the run."""
    corpus = load_corpus(args, ddp)
    check_data_fits(corpus, args)
    if not args.restart:
        run_dir = make_run_dir(f'{args.work_dir}-{args.dataset}') if ddp.is_main else None
        with RunLock(run_dir) if ddp.is_main else contextlib.nullcontext():
            return train_in(run_dir, args, ddp, corpus, None, command)
    with RunLock(args.restart_dir) if ddp.is_main else contextlib.nullcontext():
        ckpt = evaluation.load_checkpoint(os.path.join(args.restart_dir, evaluation.LAST_CHECKPOINT))
        check_resume(ckpt, args, corpus)
        return train_in(args.restart_dir, args, ddp, corpus, ckpt, command)


def main(argv=None):
    args = parse_args(argv)
    command = shlex.join(['python', 'train.py', *(sys.argv[1:] if argv is None else argv)])
    keep_freed_memory()
    set_matmul_precision(args)
    ddp = Distributed(args.cuda)
    try:
        status = start(args, ddp, command)
    except (RunError, DataError) as err:
        sys.exit(f'error: {err}')
    except OSError as err:
        sys.exit(f'error: {describe_os_error(err)}')
    finally:
        ddp.close()
    if status:
        sys.exit(status)


if __name__ == '__main__':
    main()
