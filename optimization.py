"""Optimisation shared by train.py and finetune.py: the optimiser and the learning-rate schedule, and the error a
non-finite loss stops a run with."""
import math

import torch


class NonFiniteLoss(RuntimeError):
    """A training loss (or term, or gradient norm) that is not finite: the run stops, its last checkpoint kept."""


def learning_rate(step, args):
    """Learning rate for the update after `step` completed steps: linear warm-up, then the schedule."""
    if step < args.warmup_step:
        return args.lr * (step + 1) / args.warmup_step
    if args.scheduler == 'cosine':      # CosineAnnealingLR over max_step, evaluated at `step`
        return args.eta_min + (args.lr - args.eta_min) * 0.5 * (1 + math.cos(math.pi * step / args.max_step))
    if args.scheduler == 'inv_sqrt':    # as in "Attention is all you need"
        return args.lr / math.sqrt(step) if step > 0 else args.lr
    return args.lr


def make_optimizer(params, args, device):
    """The --optim optimiser of params on `device`. Adam on CUDA is fused (one kernel for all parameters, its step
    counts on the GPU: no per-parameter launches, no host read); on the CPU it is torch's default."""
    if args.optim == 'sgd':
        return torch.optim.SGD(params, lr=args.lr, momentum=args.mom)
    if args.optim == 'adagrad':
        return torch.optim.Adagrad(params, lr=args.lr)
    if torch.device(device).type != 'cuda':
        return torch.optim.Adam(params, lr=args.lr)
    optimizer = torch.optim.Adam(params, lr=args.lr, fused=True)
    optimizer.register_step_post_hook(mark_params_updated)
    return optimizer


def mark_params_updated(optimizer, args, kwargs):
    """Step post hook of fused Adam: bump every parameter's version counter. torch._fused_adam_ writes the
    parameters in place without bumping them (on every device: an op returning nothing gets no bump from
    autograd's in-place codegen), and HyperRouter's cached router keys on those counters: without this, every
    validation after the first would reuse the router generated at the first."""
    torch.autograd.graph.increment_version([p for group in optimizer.param_groups for p in group['params']])
