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
import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import evaluation
from data_utils import DataError, dataset_metric, get_lm_corpus, loss_to_metric
from custom_gate import THOR_INFERENCE
from hyper_router import TOP_K_SCHEDULES, moe_gates, param_breakdown, set_top_k, top_k_schedule
from mem_transformer import MemTransformerLM, ThorObjective
from moe import (AUX_LOSSES, BACKENDS, GATES, MOE_VARIANTS, describe_engine, record_router_stats, record_routing,
                 routers_giving, set_capacity, uses_thor)
from moe_engine import ENGINES, grouped_mm_problem
from run_utils import (Distributed, RunError, RunLock, RunLog, StopRequest, describe_os_error, git_commit,
                       keep_freed_memory, make_progress, make_run_dir, rng_state, save_atomic, set_rng_state)

DATASETS = ('synthetic', 'enwik8', 'text8', 'wt103', 'wt2')
DEFAULT_DATA = {'synthetic': 'data/synthetic', 'enwik8': 'data/enwik8', 'text8': 'data/text8',
                'wt103': 'data/wikitext-103', 'wt2': 'data/wikitext-2'}
ADAPTIVE_CUTOFFS = {'wt103': [20000, 40000, 200000], 'wt2': [5000, 10000, 20000]}
# Training state that changes the arithmetic of a resumed run; the rest may change on restart.
ARCHITECTURE_ARGS = ('n_layer', 'n_head', 'd_head', 'd_embed', 'd_model', 'd_inner', 'div_val', 'pre_lnorm',
                     'moe', 'moe_num_expert', 'gate_name', 'moe_index', 'hyper_size', 'adaptive', 'not_tied',
                     'moe_variant', 'hypermoe_emb_dim', 'hypermoe_hidden', 'hypermoe_layer_emb_dim',
                     'hypermoe_adapter_dim', 'hash_seed', 'xmoe_dim', 'xmoe_temperature', 'dts_max_temp',
                     'dts_min_temp', 'dts_anneal_steps', 'dts_threshold')
# How the data is cut into training windows: a resume with others would read other data than the checkpoint's.
DATA_LAYOUT_ARGS = ('dataset', 'batch_size', 'tgt_len', 'ext_len', 'batch_chunk')
POSITIVE_ARGS = ('max_step', 'tgt_len', 'eval_tgt_len', 'log_interval', 'eval_interval', 'batch_size', 'batch_chunk',
                 'n_layer', 'n_head', 'd_head', 'd_model', 'd_inner', 'moe_num_expert', 'hyper_size')


def add(parser, *names, **kwargs):
    """Add a flag under its original spelling plus the underscore/dash twin."""
    spellings = list(names)
    for name in names:
        for twin in ('--' + name[2:].replace('-', '_'), '--' + name[2:].replace('_', '-')):
            if twin not in spellings:
                spellings.append(twin)
    kwargs.setdefault('dest', names[0][2:].replace('-', '_'))
    parser.add_argument(*spellings, **kwargs)


def add_routing_args(p):
    """Auxiliary losses and expert capacity: options of the MoE engine, with any router."""
    aux = p.add_argument_group('auxiliary losses (any router; each summed over MoE layers, default: the router\'s '
                               'own default_aux_losses, else 0)')
    add(aux, '--balance_loss', '--load_balance', type=float, default=None,
        help='weight of the Switch Transformer load-balancing loss E * sum_e f_e P_e (Fedus et al. 2022)')
    add(aux, '--importance_loss', type=float, default=None,
        help='weight of the importance loss cv^2(sum of gate values per expert) (Shazeer et al. 2017)')
    add(aux, '--load_loss', type=float, default=None,
        help='weight of the smooth load loss cv^2(load) of Shazeer et al. 2017 (only routers with noise give it)')
    add(aux, '--z_loss', type=float, default=None,
        help='weight of the router z-loss mean(logsumexp(logits)^2) (Zoph et al. 2022)')
    cap = p.add_argument_group('expert capacity (any router; default: the router\'s default_capacity_factor, '
                               'else dropless)')
    add(cap, '--capacity_factor', type=evaluation.parse_capacity_factor, default=None,
        help='F in training: each expert takes at most ceil(F * T * k / E) of a batch\'s T tokens, first choices '
             'first, then in token order; the others skip it (a token dropped by all its experts passes through '
             'the residual); none: dropless')
    add(cap, '--eval_capacity_factor', type=evaluation.parse_capacity_factor, default=None,
        help='F in evaluation (validation, the final test, and eval.py unless told otherwise); none: dropless')


def add_method_args(p):
    """Flags of the routing methods beyond the paper's: THOR, HyperMoE, auxiliary losses and capacity."""
    add_routing_args(p)
    thor = p.add_argument_group('THOR (--gate_name thor): random routing, two passes, consistency loss')
    add(thor, '--thor_alpha', type=float, default=5.0,
        help='weight alpha of the consistency term: loss = (CE1 + CE2 + alpha * CR(p1, p2)) / 2, CR the symmetric '
             'KL (KL(p1||p2) + KL(p2||p1)) / 2 between the two passes; 5.0 as THOR\'s released run.sh '
             '(--consistency-alpha 5.0; its config default is 1.0)')
    add(thor, '--thor_inference', default='random', choices=THOR_INFERENCE,
        help='random: k random experts per token at inference too (THOR\'s token-level inference); average: every '
             'expert with weight 1/E, whatever k (the expectation of the random choice; costs k = E)')
    switch = p.add_argument_group('Switch Transformer (--gate_name switch)')
    add(switch, '--switch_jitter', type=float, default=0.01,
        help='in training the router reads x * U(1 - eps, 1 + eps), eps this value (the paper\'s 1e-2; 0: off)')
    hmoe = p.add_argument_group('HyperMoE (--moe_variant hypermoe): HyperExpert generated from the unselected experts')
    add(hmoe, '--moe_variant', default='plain', choices=MOE_VARIANTS,
        help='hypermoe: add to every MoE block the HyperExpert of HyperMoE (Zhao et al. 2024); works with any router')
    add(hmoe, '--hypermoe_emb_dim', type=int, default=128, help='expert embedding and its MLP width')
    add(hmoe, '--hypermoe_hidden', type=int, default=128, help='hidden size of the shared hypernetwork')
    add(hmoe, '--hypermoe_layer_emb_dim', type=int, default=10, help='layer embedding size')
    add(hmoe, '--hypermoe_adapter_dim', type=int, default=64, help='bottleneck of the HyperExpert adapter')
    add_hash_xmoe_dts_args(p)


def add_hash_xmoe_dts_args(p):
    """Flags of Hash layers, X-MoE and DTS-Gate (each read only by its own router)."""
    hash_group = p.add_argument_group('Hash layers (--gate_name hash): each token id to a fixed expert')
    add(hash_group, '--hash_seed', type=int, default=0,
        help='seed of the balanced random hash of the vocabulary (drawn once at model construction and saved in '
             'the checkpoint, so evaluation and resume use the saved table)')
    xmoe = p.add_argument_group('X-MoE (--gate_name xmoe): cosine routing in a low-dimensional space')
    add(xmoe, '--xmoe_dim', type=int, default=16, help='dimension of the routing space (the paper\'s 16)')
    add(xmoe, '--xmoe_temperature', type=float, default=0.07, help='initial value of the learnable temperature')
    dts = p.add_argument_group('DTS-Gate (--gate_name dts): Gumbel softmax annealed from dense to top-k routing')
    add(dts, '--dts_max_temp', type=float, default=2.0, help='Gumbel temperature at step 0')
    add(dts, '--dts_min_temp', type=float, default=0.3, help='Gumbel temperature at the end of the annealing')
    add(dts, '--dts_anneal_steps', type=int, default=-1,
        help='steps of the dense-to-sparse phase (exponential decay of the temperature, experts kept by '
             '--dts_threshold); top-k routing after it (default: half of max_step)')
    add(dts, '--dts_threshold', type=float, default=0.001,
        help='in the dense-to-sparse phase a token goes to every expert whose Gumbel weight exceeds this')


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add(p, '--data', default=None, help='data folder (default: data/<dataset>)')
    add(p, '--dataset', default='synthetic', choices=DATASETS, help='corpus; synthetic is built in')
    model = p.add_argument_group('model (defaults: the paper\'s small enwik8 model)')
    add(model, '--n_layer', type=int, default=4, help='number of layers')
    add(model, '--n_head', type=int, default=8, help='number of attention heads')
    add(model, '--d_head', type=int, default=64, help='head dimension')
    add(model, '--d_embed', type=int, default=-1, help='embedding dimension (default: d_model)')
    add(model, '--d_model', type=int, default=256, help='model dimension')
    add(model, '--d_inner', type=int, default=512, help='inner dimension of the FFN (of each expert with --moe)')
    add(model, '--dropout', type=float, default=0.1, help='global dropout rate')
    add(model, '--dropatt', type=float, default=0.0, help='attention probability dropout rate')
    add(model, '--init', default='normal', choices=['normal', 'uniform'], help='weight initialiser')
    add(model, '--init_range', type=float, default=0.1, help='U(-init_range, init_range) for --init uniform')
    add(model, '--init_std', type=float, default=0.02, help='N(0, init_std) for --init normal')
    add(model, '--proj_init_std', type=float, default=0.01, help='N(0, proj_init_std) for softmax projections')
    add(model, '--not_tied', action='store_true', help='do not tie the word embedding and softmax weights')
    add(model, '--adaptive', action='store_true', help='adaptive input and softmax (word-level data)')
    add(model, '--div_val', type=int, default=1, help='divisor of the adaptive embedding width per cluster')
    add(model, '--pre_lnorm', action='store_true', help='LayerNorm before each block instead of after')
    add(model, '--same_length', action='store_true', help='every query attends to the same number of keys')
    add(model, '--attn_type', type=int, default=0, choices=[0], help='0: relative partial-learnable (the only one)')
    add(model, '--clamp_len', type=int, default=-1, help='use the same position embedding beyond clamp_len')
    moe = p.add_argument_group('mixture of experts')
    add(moe, '--moe', action='store_true', help='replace the FFN of the moe_index layers by an MoE block')
    add(moe, '--moe-num-expert', type=int, default=16, help='number of experts E')
    add(moe, '--moe-top-k', type=int, default=2, help='experts per token (and the k of validation)')
    add(moe, '--gate_name', default='NaiveGate', choices=list(GATES), help='router')
    add(moe, '--hyper_size', type=int, default=256, help='hidden size of the HyperRouter hypernetwork')
    add(moe, '--moe_index', default=None, help='comma-separated MoE layers (default: all)')
    add(moe, '--freeze_gate', action='store_true', help='freeze the linear router at init (SMoE-Dropout)')
    add(moe, '--dynamic_moe', action='store_true', help='change k during training by --dynamic_moe_mode')
    add(moe, '--dynamic_moe_mode', default='linear_increase', choices=TOP_K_SCHEDULES)
    add(moe, '--dynamic_overall_steps', type=int, default=-1, help='steps of the k schedule (default: max_step)')
    add(moe, '--moe-top-k-min', type=int, default=2, help='k at the start of linear_increase')
    add(moe, '--moe-top-k-max', type=int, default=16, help='k at the end of linear_increase')
    add(moe, '--moe_backend', default='auto', choices=BACKENDS, help='auto: fastmoe on CUDA when installed')
    add(moe, '--moe_engine', default='auto', choices=ENGINES,
        help='how the torch backend runs the experts: grouped (torch grouped_mm, no host sync; CPU fp32/bf16, CUDA '
             'bf16 on compute capability >= 8.0), loop (a Python loop over experts), auto (grouped where it runs)')
    add_method_args(p)
    opt = p.add_argument_group('optimisation')
    add(opt, '--optim', default='adam', choices=['adam', 'sgd', 'adagrad'])
    add(opt, '--lr', type=float, default=0.00025, help='initial learning rate')
    add(opt, '--mom', type=float, default=0.0, help='SGD momentum')
    add(opt, '--scheduler', default='cosine', choices=['cosine', 'inv_sqrt', 'constant'])
    add(opt, '--warmup_step', type=int, default=0, help='linear warm-up steps')
    add(opt, '--eta_min', type=float, default=0.0, help='final learning rate of the cosine schedule')
    add(opt, '--clip', type=float, default=0.25, help='gradient-norm clipping')
    add(opt, '--max_step', type=int, default=400000, help='training steps')
    add(opt, '--stop_step', type=int, default=-1, help='stop after this step with a resumable checkpoint '
                                                       '(split a long run into jobs; the schedule still uses max_step)')
    add(opt, '--batch_size', type=int, default=22, help='global batch size')
    add(opt, '--batch_chunk', type=int, default=1, help='split each batch into chunks (gradient accumulation)')
    add(opt, '--tgt_len', type=int, default=512, help='tokens predicted per training segment')
    add(opt, '--eval_tgt_len', type=int, default=128, help='tokens predicted per evaluation segment')
    add(opt, '--ext_len', type=int, default=0, help='length of the extended context')
    add(opt, '--mem_len', type=int, default=512, help='length of the memory')
    add(opt, '--seed', type=int, default=1111, help='random seed')
    run = p.add_argument_group('running')
    add(run, '--cuda', action='store_true', help='train on the GPU')
    add(run, '--multi_gpu', action='store_true', help='all visible GPUs (DataParallel; prefer torchrun)')
    add(run, '--amp', action='store_true', help='bf16 autocast on the GPU (the routers stay in fp32)')
    add(run, '--no_tf32', action='store_true', help='with --cuda, keep fp32 matmuls in full fp32 (default: TF32, '
                                                    'as PyTorch did by default on A100 in the original code\'s era)')
    add(run, '--compile', action='store_true', help='torch.compile the model for training (once per k and for the '
                                                    'first, memory-less segment; --moe_engine auto takes grouped)')
    add(run, '--log-interval', type=int, default=200, help='steps between log lines')
    add(run, '--eval-interval', type=int, default=4000, help='steps between validations and checkpoints')
    add(run, '--max_eval_steps', type=int, default=-1, help='evaluate at most this many windows')
    add(run, '--eval_ks', default='1,2,4,8,16', help='k of the final test (those <= E)')
    add(run, '--work_dir', default='LM-TFM', help='runs go to <work_dir>-<dataset>/<time stamp>')
    add(run, '--restart', action='store_true', help='resume the run in --restart_dir')
    add(run, '--restart_dir', default='', help='run directory to resume')
    return p


def check_args(args, parser):
    """Cross-field checks, with errors that say what to change."""
    for name in POSITIVE_ARGS:
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1; got {getattr(args, name)}')
    for name in ('mem_len', 'ext_len'):
        if getattr(args, name) < 0:
            parser.error(f'--{name} must be at least 0; got {getattr(args, name)}')
    check_eval_ks(args, parser)
    if args.moe and not 1 <= args.moe_top_k <= args.moe_num_expert:
        parser.error(f'--moe-top-k {args.moe_top_k} must be between 1 and --moe-num-expert {args.moe_num_expert}')
    if args.dynamic_moe and not 1 <= args.moe_top_k_min <= args.moe_top_k_max <= args.moe_num_expert:
        parser.error(f'need 1 <= --moe-top-k-min ({args.moe_top_k_min}) <= --moe-top-k-max ({args.moe_top_k_max}) '
                     f'<= --moe-num-expert ({args.moe_num_expert})')
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if args.batch_size % (args.batch_chunk * world_size):
        parser.error(f'--batch_size {args.batch_size} must be divisible by --batch_chunk {args.batch_chunk} '
                     f'times the number of processes {world_size}')
    if args.adaptive and args.dataset not in ADAPTIVE_CUTOFFS:
        parser.error(f'--adaptive is for word-level data ({", ".join(ADAPTIVE_CUTOFFS)}), not {args.dataset}')
    if args.same_length and args.mem_len <= 0:
        parser.error('--same_length gives every query the same number of keys from the memory, so it needs '
                     '--mem_len > 0 (without a memory the first query would see no key at all)')
    if args.cuda and not torch.cuda.is_available():
        parser.error('--cuda given but no CUDA device is available; drop --cuda to train on the CPU')
    if args.amp and not args.cuda:
        parser.error('--amp (bf16 autocast) needs --cuda')
    if args.moe and args.moe_engine == 'grouped' and args.moe_backend != 'fastmoe':
        problem = grouped_mm_problem(torch.device('cuda' if args.cuda else 'cpu'),
                                     torch.bfloat16 if args.amp else torch.float32, (args.d_model, args.d_inner))
        if problem:
            parser.error(f'--moe_engine grouped cannot run: {problem}; use --moe_engine auto or loop')
    if not 0 <= args.switch_jitter < 1:
        parser.error(f'--switch_jitter must be in [0, 1) (the router input is scaled by U(1 - eps, 1 + eps)); '
                     f'got {args.switch_jitter}')
    if args.thor_alpha < 0:
        parser.error(f'--thor_alpha must be non-negative; got {args.thor_alpha}')
    check_routing_args(args, parser)
    if not args.moe and args.moe_variant != 'plain':
        parser.error('--moe_variant hypermoe needs --moe')
    recording = any(aux_weights(args).values()) or args.capacity_factor is not None
    if args.multi_gpu and (args.moe_variant == 'hypermoe' or recording):
        parser.error('--moe_variant hypermoe, the auxiliary losses and --capacity_factor do not support --multi_gpu '
                     '(DataParallel); use torchrun')
    check_hash_xmoe_dts_args(args, parser)
    if args.restart and not os.path.isfile(os.path.join(args.restart_dir, evaluation.LAST_CHECKPOINT)):
        parser.error(f'--restart needs --restart_dir RUN holding {evaluation.LAST_CHECKPOINT}; '
                     f'none in {args.restart_dir!r}')
    if args.data is None:
        args.data = DEFAULT_DATA[args.dataset]
    if args.dynamic_overall_steps <= 0:
        args.dynamic_overall_steps = args.max_step


def check_routing_args(args, parser):
    """Resolve the auxiliary-loss weights and capacity factors (flag, else the router's default) and check them."""
    gate_cls = GATES[args.gate_name]
    for name in AUX_LOSSES:
        flag = f'{name}_loss'
        weight = getattr(args, flag)
        if weight is not None and weight < 0:
            parser.error(f'--{flag} must be non-negative; got {weight}')
        if weight is not None and weight > 0 and not args.moe:
            parser.error(f'--{flag} needs --moe (an auxiliary loss of the routers)')
        if weight is None:
            weight = gate_cls.default_aux_losses.get(name, 0.0) if args.moe else 0.0
        if weight > 0 and args.gate_name not in routers_giving(name):
            parser.error(f'--{flag}: the router {args.gate_name} cannot give the {name} loss; routers that can: '
                         f'{", ".join(routers_giving(name)) or "none yet"}')
        setattr(args, flag, float(weight))
    for flag, default in zip(('capacity_factor', 'eval_capacity_factor'), gate_cls.default_capacity_factor):
        value = getattr(args, flag)
        if value is not None and not args.moe:
            parser.error(f'--{flag} needs --moe (a capacity of the experts)')
        if value is None:
            value = default if args.moe else None
        setattr(args, flag, None if value == 'none' else value)


def aux_weights(args):
    """{loss name: weight} of the auxiliary losses, as resolved by check_routing_args."""
    return {name: getattr(args, f'{name}_loss') for name in AUX_LOSSES}


def check_eval_ks(args, parser):
    """--eval_ks is read now, not after the last step: integers, and with --moe at least one k <= E."""
    try:
        ks = evaluation.parse_ks(args.eval_ks)
    except argparse.ArgumentTypeError as err:
        parser.error(f'--eval_ks {err}')
    if args.moe and min(ks) > args.moe_num_expert:
        parser.error(f'--eval_ks {args.eval_ks}: no k is at most --moe-num-expert {args.moe_num_expert}, so '
                     f'nothing would be tested; give k from 1 to {args.moe_num_expert}')


def check_hash_xmoe_dts_args(args, parser):
    if args.xmoe_dim < 1:
        parser.error(f'--xmoe_dim must be at least 1; got {args.xmoe_dim}')
    if args.xmoe_temperature <= 0:
        parser.error(f'--xmoe_temperature must be positive; got {args.xmoe_temperature}')
    if not 0 < args.dts_min_temp <= args.dts_max_temp:
        parser.error(f'need 0 < --dts_min_temp ({args.dts_min_temp}) <= --dts_max_temp ({args.dts_max_temp})')
    if not 0 <= args.dts_threshold < 1:
        parser.error(f'--dts_threshold must be in [0, 1); got {args.dts_threshold}')
    if args.dts_anneal_steps == 0 or args.dts_anneal_steps < -1:
        parser.error(f'--dts_anneal_steps must be positive (or -1: half of --max_step); got {args.dts_anneal_steps}')


def dts_anneal_steps(args):
    """--dts_anneal_steps, -1 resolved to half of max_step (at least 1)."""
    return args.dts_anneal_steps if args.dts_anneal_steps > 0 else max(1, args.max_step // 2)


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args


def resolve_gate_name(args):
    """--freeze_gate freezes the linear router at init: that is the SMoE-Dropout gate."""
    if args.freeze_gate and GATES[args.gate_name] is GATES['smoe']:
        return 'smoe_dropout'
    return args.gate_name


def model_config(args, n_token):
    cutoffs = ADAPTIVE_CUTOFFS[args.dataset] if args.adaptive else []
    return dict(n_token=n_token, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                d_head=args.d_head, d_inner=args.d_inner, dropout=args.dropout, dropatt=args.dropatt,
                tie_weight=not args.not_tied, d_embed=args.d_embed, div_val=args.div_val,
                tie_projs=[False] + [True] * len(cutoffs), pre_lnorm=args.pre_lnorm, tgt_len=args.tgt_len,
                ext_len=args.ext_len, mem_len=args.mem_len, cutoffs=cutoffs, same_length=args.same_length,
                clamp_len=args.clamp_len, moe=args.moe, moe_num_expert=args.moe_num_expert,
                moe_top_k=args.moe_top_k, gate_name=resolve_gate_name(args), moe_index=args.moe_index,
                hyper_size=args.hyper_size, moe_backend=args.moe_backend, moe_engine=args.moe_engine, init=args.init,
                init_range=args.init_range, init_std=args.init_std, proj_init_std=args.proj_init_std,
                thor_inference=args.thor_inference, moe_variant=args.moe_variant,
                hypermoe_emb_dim=args.hypermoe_emb_dim, hypermoe_hidden=args.hypermoe_hidden,
                hypermoe_layer_emb_dim=args.hypermoe_layer_emb_dim, hypermoe_adapter_dim=args.hypermoe_adapter_dim,
                switch_jitter=args.switch_jitter, hash_seed=args.hash_seed, xmoe_dim=args.xmoe_dim,
                xmoe_temperature=args.xmoe_temperature, dts_max_temp=args.dts_max_temp, dts_min_temp=args.dts_min_temp,
                dts_anneal_steps=dts_anneal_steps(args), dts_threshold=args.dts_threshold)


def learning_rate(step, args):
    """Learning rate for the update after `step` completed steps: linear warm-up, then the schedule."""
    if step < args.warmup_step:
        return args.lr * (step + 1) / args.warmup_step
    if args.scheduler == 'cosine':      # CosineAnnealingLR over max_step, evaluated at `step`
        return args.eta_min + (args.lr - args.eta_min) * 0.5 * (1 + math.cos(math.pi * step / args.max_step))
    if args.scheduler == 'inv_sqrt':    # as in "Attention is all you need"
        return args.lr / math.sqrt(step) if step > 0 else args.lr
    return args.lr


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


class NonFiniteLoss(RuntimeError):
    pass


def make_optimizer(params, args):
    if args.optim == 'sgd':
        return torch.optim.SGD(params, lr=args.lr, momentum=args.mom)
    if args.optim == 'adagrad':
        return torch.optim.Adagrad(params, lr=args.lr)
    return torch.optim.Adam(params, lr=args.lr)


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
    defaults = build_parser()      # runs saved before a flag existed used its default
    saved = {name: ckpt['args'].get(name, defaults.get_default(name)) for name in ARCHITECTURE_ARGS + DATA_LAYOUT_ARGS}
    diffs = [f'--{name} {saved[name]!r} (checkpoint) vs {getattr(args, name)!r}'
             for name in saved if saved[name] != getattr(args, name)]
    saved_anneal = ckpt['model_config'].get('dts_anneal_steps')
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


class Trainer:
    """The training loop and everything a resumed run needs to continue bit for bit."""

    def __init__(self, args, ddp, corpus, run_dir, ckpt=None):
        self.args, self.ddp, self.corpus, self.run_dir = args, ddp, corpus, run_dir
        self.config = model_config(args, len(corpus.vocab))
        torch.manual_seed(args.seed)
        self.model = MemTransformerLM(**self.config).to(ddp.device)
        set_capacity(self.model, args.capacity_factor, args.eval_capacity_factor)
        self.aux_weights = {name: weight for name, weight in aux_weights(args).items() if weight > 0}
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, args)
        self.thor = uses_thor(args.moe, args.gate_name)
        self.para_model = self._wrap(ThorObjective(self.model) if self.thor else self.model)
        if args.compile:
            self.para_model = compile_model(self.para_model)
        self.tr_iter = corpus.get_iterator('train', args.batch_size, args.tgt_len, ddp.device, args.ext_len)
        self.va_iter = corpus.get_iterator('valid', evaluation.EVAL_BATCH_SIZE, args.eval_tgt_len, ddp.device,
                                           args.ext_len)
        self.metric = dataset_metric(args.dataset)
        self.data_signature = data_signature(corpus) if ddp.is_main else None
        self.step, self.epoch, self.batch = 0, 1, 0
        self.best = {'best': math.inf, 'best_dense': math.inf}
        self.mems = self._fresh_mems()
        self.window = dict(loss=0.0, steps=0, tokens=0, start=time.time())
        self.terms = {}     # the last step's extra loss terms (THOR consistency, auxiliary losses), for the log
        self.dropped = {}   # the last step's fraction of routed slots dropped over capacity, per MoE layer
        self.saved_step = None          # step of checkpoint_last.pt, once there is one
        self.stop_signal = 0            # the signal that stopped the run, if one did
        if ckpt is not None:
            self._load_state(ckpt)
        self.log = RunLog(run_dir, ddp.is_main, resume_step=self.step if ckpt is not None else None,
                          log_offset=ckpt['train_state'].get('log_offset') if ckpt is not None else None)

    def _wrap(self, model):
        if self.ddp.world_size > 1:
            return DistributedDataParallel(model, device_ids=[self.ddp.local_rank] if self.args.cuda else None)
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
        mems = self._global_mems()
        if not self.ddp.is_main:
            return
        payload = self._payload('last')
        payload.update(optimizer=self.optimizer.state_dict(), rng=rng_state(self.args.cuda), train_state={
            'epoch': self.epoch, 'batch': self.batch, 'mems': mems, 'best': self.best, 'window': self.window,
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
        """One optimiser update on the global batch; returns its mean NLL over all ranks.

        The objective adds THOR's consistency term and the auxiliary losses that are on; their batch means
        go to self.terms, and the fractions of routed slots dropped over capacity to self.dropped, for the log.
        """
        data, target = self._local_columns(data), self._local_columns(target)
        chunks = list(zip(data.chunk(self.args.batch_chunk, 1), target.chunk(self.args.batch_chunk, 1)))
        self.optimizer.zero_grad(set_to_none=True)
        total, terms, dropped = 0.0, {}, {}
        for i, (data_i, target_i) in enumerate(chunks):
            nll, extra, dropped_i = self._chunk_forward(i, data_i, target_i)
            objective = nll + sum(weight * value for value, weight in extra.values())
            (objective / len(chunks)).backward()
            total += nll.item() / len(chunks)
            for name, (value, _) in extra.items():
                terms[name] = terms.get(name, 0.0) + value.item() / len(chunks)
            for layer, value in dropped_i.items():
                dropped[layer] = dropped.get(layer, 0.0) + value.item() / len(chunks)
        total = self.ddp.mean(total)
        self.terms = {name: self.ddp.mean(value) for name, value in terms.items()}
        self.dropped = {layer: self.ddp.mean(value) for layer, value in dropped.items()}
        if not all(math.isfinite(v) for v in (total, *self.terms.values())):
            detail = ''.join(f', {name} {value}' for name, value in self.terms.items())
            raise NonFiniteLoss(f'non-finite training loss ({total}{detail}) at step {self.step + 1}')
        torch.nn.utils.clip_grad_norm_(self.params, self.args.clip)
        for group in self.optimizer.param_groups:
            group['lr'] = learning_rate(self.step, self.args)
        self.optimizer.step()
        return total

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

    def log_progress(self, loss, n_tokens):
        w = self.window
        w['loss'] += loss
        w['steps'] += 1
        w['tokens'] += n_tokens
        for name, value in self.terms.items():
            w[name] = w.get(name, 0.0) + value
        for layer, value in self.dropped.items():
            w[f'train_dropped/layer{layer}'] = w.get(f'train_dropped/layer{layer}', 0.0) + value
        if self.step % self.args.log_interval:
            return
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
        self.window = dict(loss=0.0, steps=0, tokens=0, start=time.time())

    def validate(self):
        """Validation with all experts and with k = --moe-top-k (main rank); keeps the best of each.

        Its time (and the checkpoints') is left out of the speed that the next log line reports.
        """
        start = time.time()
        if self.ddp.is_main:
            losses = {}
            if self.args.moe:
                set_top_k(self.model, self.args.moe_num_expert)
                losses['best_dense'] = evaluation.evaluate(self.model, self.va_iter, vars(self.args),
                                                           self.args.max_eval_steps)
                set_top_k(self.model, self.args.moe_top_k)
            with record_router_stats(self.model) as stats:
                losses['best'] = evaluation.evaluate(self.model, self.va_iter, vars(self.args),
                                                     self.args.max_eval_steps)
            self.log.router_stats(self.step, stats)
            for kind, loss in losses.items():
                self._report_validation(kind, loss, time.time() - start)
                if loss < self.best[kind]:
                    self.best[kind] = loss
                    save_atomic(self._payload(kind, loss), os.path.join(self.run_dir, evaluation.CHECKPOINTS[kind]))
        self.save_last()
        self.ddp.barrier()
        self.window['start'] += time.time() - start

    def _report_validation(self, kind, loss, elapsed):
        dense = kind == 'best_dense'
        k = self.args.moe_num_expert if dense else (self.args.moe_top_k if self.args.moe else None)
        value = loss_to_metric(loss, self.args.dataset)
        self.log('-' * 100)
        self.log(f'| Eval {self.step // self.args.eval_interval:3d} at step {self.step:>8d} | time: {elapsed:5.2f}s '
                 f'| {"Dense " if dense else ""}valid loss {loss:5.2f} | {self.metric} {value:9.5f}'
                 + (f' | k {k}' if k else ''))
        self.log('-' * 100)
        self.log.record(self.step, 'valid', loss=loss, top_k=k, experts='all' if dense else 'top_k',
                        **{self.metric: value})

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
                        self.validate()
                    if self._should_stop(stop):
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
        """After a signal on any rank, or at --stop_step; the signal is kept for the exit status."""
        self.stop_signal = int(self.ddp.max(stop.signum or 0))
        return self.stop_signal > 0 or self.step == self.args.stop_step

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


def write_config(run_dir, args, trainer, ddp):
    config = {'args': vars(args), 'model_config': trainer.config, 'git_commit': git_commit(),
              'torch': torch.__version__, 'world_size': ddp.world_size, 'params': param_breakdown(trainer.model),
              'start_step': trainer.step}
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)


def record_resume(run_dir, ckpt, args):
    """One line of resumes.jsonl per resume; config.json keeps the arguments the run started with."""
    ignored = ('restart', 'restart_dir', 'work_dir')        # a resume stays in its own directory
    changed = {name: [ckpt['args'].get(name), value] for name, value in vars(args).items()
               if name not in ignored and ckpt['args'].get(name) != value}
    record = {'step': ckpt['step'], 'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'git_commit': git_commit(),
              'changed': changed}
    with open(os.path.join(run_dir, 'resumes.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')


def final_test(trainer, args):
    """Test every kept checkpoint at k in --eval_ks, print the Table-1-shaped result, write results.json."""
    log = trainer.log
    log('=' * 100)
    entries = evaluation.test_checkpoints(trainer.run_dir, trainer.corpus, 'test', evaluation.parse_ks(args.eval_ks),
                                          args.max_eval_steps, trainer.ddp.device, log=log)
    evaluation.write_json(os.path.join(trainer.run_dir, 'results.json'), entries)
    log('=' * 100)
    log(f'results: {os.path.join(trainer.run_dir, "results.json")}')


def train_in(run_dir, args, ddp, corpus, ckpt):
    """Train in `run_dir` (None off the main rank); returns the exit status."""
    torch.manual_seed(args.seed)
    trainer = Trainer(args, ddp, corpus, run_dir, ckpt)
    if ddp.is_main:
        if ckpt is None:
            write_config(run_dir, args, trainer, ddp)
        else:
            record_resume(run_dir, ckpt, args)
    log = trainer.log
    log(f'run directory: {run_dir}' + (f' (resumed at step {trainer.step})' if ckpt else ''))
    log('    ' + ' '.join(f'--{k} {v}' for k, v in vars(args).items()))
    log(f'parameters: {param_breakdown(trainer.model)}')
    if args.moe:
        log(describe_engine(trainer.model, ddp.device, torch.bfloat16 if args.amp else torch.float32, args.compile))
    if args.cuda:
        log(f'fp32 matmuls in TF32: {"no (--no_tf32)" if args.no_tf32 else "yes (--no_tf32 turns it off)"}')
    try:
        status = trainer.run()
    except NonFiniteLoss as err:
        log(f'{err}; stopping: {trainer.checkpoint_note()}')
        log.close()
        return 1
    if status == 'stopped':
        log(f'stopped at step {trainer.step}; resume with: python train.py <same flags> --restart '
            f'--restart_dir {run_dir}')
    elif ddp.is_main:
        final_test(trainer, args)
    log.close()
    return 128 + trainer.stop_signal if trainer.stop_signal else 0


def start(args, ddp):
    """Check the data (and the checkpoint to resume), claim the run directory, train; returns the exit status."""
    corpus = load_corpus(args, ddp)
    check_data_fits(corpus, args)
    if not args.restart:
        run_dir = make_run_dir(f'{args.work_dir}-{args.dataset}') if ddp.is_main else None
        with RunLock(run_dir) if ddp.is_main else contextlib.nullcontext():
            return train_in(run_dir, args, ddp, corpus, None)
    with RunLock(args.restart_dir) if ddp.is_main else contextlib.nullcontext():
        ckpt = evaluation.load_checkpoint(os.path.join(args.restart_dir, evaluation.LAST_CHECKPOINT), ddp.device)
        check_resume(ckpt, args, corpus)
        return train_in(args.restart_dir, args, ddp, corpus, ckpt)


def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory()
    set_matmul_precision(args)
    ddp = Distributed(args.cuda)
    try:
        status = start(args, ddp)
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
