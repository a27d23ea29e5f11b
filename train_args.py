"""The command line of train.py: its flags in the original scripts' spellings, their cross-field checks,
and the resolution of router options (auxiliary-loss weights and capacity factors, flag else the router's
default) into the arguments and the model configuration a run uses.

train.py reads as training (load the corpus, build the model, train, test); what a flag means and which
combinations are refused lives here. The flags, their spellings and their defaults are guarded by the
script-settings test (tests/test_scripts.py).
"""
import argparse
import dataclasses
import os

import torch

import evaluation
from capacity import DEFAULT_GROUP_SIZE
import router_registry
from hyper_router import TOP_K_SCHEDULES
from model_config import ModelConfig, RouterConfig
from moe import AUX_LOSSES, BACKENDS, GATES, MOE_VARIANTS, routers_giving
from moe_engine import ENGINES, grouped_mm_problem

DATASETS = ('synthetic', 'enwik8', 'text8', 'wt103', 'wt2')
DEFAULT_DATA = {'synthetic': 'data/synthetic', 'enwik8': 'data/enwik8', 'text8': 'data/text8',
                'wt103': 'data/wikitext-103', 'wt2': 'data/wikitext-2'}
ADAPTIVE_CUTOFFS = {'wt103': [20000, 40000, 200000], 'wt2': [5000, 10000, 20000]}
# Training state that changes the arithmetic of a resumed run; the rest may change on restart.
INFERENCE_SETTINGS = ('thor_inference',)     # router settings that change evaluation only (a resume may change them)
ARCHITECTURE_ARGS = ('n_layer', 'n_head', 'd_head', 'd_embed', 'd_model', 'd_inner', 'div_val', 'pre_lnorm',
                     'moe', 'moe_num_expert', 'gate_name', 'moe_index', 'adaptive', 'not_tied', 'moe_variant',
                     'hypermoe_emb_dim', 'hypermoe_hidden', 'hypermoe_layer_emb_dim', 'hypermoe_adapter_dim') + tuple(
    spec.flag(field.name) for spec in router_registry.specs() for field in spec.fields()
    if spec.flag(field.name) not in INFERENCE_SETTINGS)
# How the data is cut into training windows: a resume with others would read other data than the checkpoint's.
DATA_LAYOUT_ARGS = ('dataset', 'batch_size', 'tgt_len', 'ext_len', 'batch_chunk')
POSITIVE_ARGS = ('max_step', 'tgt_len', 'eval_tgt_len', 'log_interval', 'eval_interval', 'batch_size', 'batch_chunk',
                 'n_layer', 'n_head', 'd_head', 'd_model', 'd_inner', 'moe_num_expert', 'capacity_group_size')


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
        help='F in training: each expert takes at most ceil(F * n * k / E) of each group of n tokens '
             '(--capacity_group_size), first choices first, then in time order; the others skip it (a token '
             'dropped by all its experts passes through the residual); none: dropless')
    add(cap, '--eval_capacity_factor', type=evaluation.parse_capacity_factor, default=None,
        help='F in evaluation (validation, the final test, and eval.py unless told otherwise); none: dropless')
    add(cap, '--capacity_group_size', type=int, default=DEFAULT_GROUP_SIZE,
        help='tokens a capacity is computed over: G consecutive positions of one sequence, each group giving an '
             'expert ceil(F * n * k / E) of its n tokens, so drops do not depend on the number of GPUs or '
             '--batch_chunk (default: Mesh TensorFlow\'s group_size 1024; a shorter sequence is one group)')


def add_method_args(p):
    """Flags of the routing methods beyond the paper's: THOR, HyperMoE, auxiliary losses and capacity."""
    add_routing_args(p)
    thor = p.add_argument_group('THOR (--gate_name thor): random routing, two passes, consistency loss')
    add(thor, '--thor_alpha', type=float, default=5.0,
        help='weight alpha of the consistency term: loss = (CE1 + CE2 + alpha * CR(p1, p2)) / 2, CR the symmetric '
             'KL (KL(p1||p2) + KL(p2||p1)) / 2 between the two passes; 5.0 as THOR\'s released run.sh '
             '(--consistency-alpha 5.0; its config default is 1.0)')
    hmoe = p.add_argument_group('HyperMoE (--moe_variant hypermoe): HyperExpert generated from the unselected experts')
    add(hmoe, '--moe_variant', default='plain', choices=MOE_VARIANTS,
        help='hypermoe: add to every MoE block the HyperExpert of HyperMoE (Zhao et al. 2024); works with any router')
    add(hmoe, '--hypermoe_emb_dim', type=int, default=128, help='expert embedding and its MLP width')
    add(hmoe, '--hypermoe_hidden', type=int, default=128, help='hidden size of the shared hypernetwork')
    add(hmoe, '--hypermoe_layer_emb_dim', type=int, default=10, help='layer embedding size')
    add(hmoe, '--hypermoe_adapter_dim', type=int, default=64, help='bottleneck of the HyperExpert adapter')
    add_router_setting_args(p)


def add_router_setting_args(p):
    """Every registered router's settings as flags, one argument group per router (router_registry.py)."""
    for spec in router_registry.specs():
        if not spec.fields():
            continue
        group = p.add_argument_group(f'{spec.display_name} (--gate_name {spec.name})')
        for field in spec.fields():
            meta = field.metadata
            default = meta.get('flag_default', dataclasses.MISSING)
            default = field.default if default is dataclasses.MISSING else default
            kind = type(field.default)
            add(group, f'--{spec.flag(field.name)}', default=default, help=meta.get('help'),
                choices=meta.get('choices'), type=None if kind in (str, type(None)) else kind)


def router_settings(spec, args):
    """{settings field: value} of a router from the run's flags; a flag left at its flag_default resolved from
    --max_step (router_registry.setting)."""
    values = {}
    for field in spec.fields():
        value, meta = getattr(args, spec.flag(field.name)), field.metadata
        if meta.get('from_max_step') and value == meta['flag_default']:
            value = meta['from_max_step'](args.max_step)
        values[field.name] = value
    return values


def build_parser(description=None):
    """train.py's parser; `description` is what --help prints above the flags (train.py's docstring)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    add(run, '--valid_ks', type=evaluation.parse_ks, default=None,
        help='also validate at each of these k (those <= E; e.g. 1,2,4,8,16) at every validation, logged as '
             'valid/<metric>/k<k>; off by default: each k is one more pass over the validation windows')
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
    check_compiled_engine(args, parser)
    if args.thor_alpha < 0:
        parser.error(f'--thor_alpha must be non-negative; got {args.thor_alpha}')
    check_routing_args(args, parser)
    if not args.moe and args.moe_variant != 'plain':
        parser.error('--moe_variant hypermoe needs --moe')
    recording = any(aux_weights(args).values()) or args.capacity_factor is not None
    if args.multi_gpu and (args.moe_variant == 'hypermoe' or recording):
        parser.error('--moe_variant hypermoe, the auxiliary losses and --capacity_factor do not support --multi_gpu '
                     '(DataParallel); use torchrun')
    check_router_settings(args, parser)
    if args.restart and not os.path.isfile(os.path.join(args.restart_dir, evaluation.LAST_CHECKPOINT)):
        parser.error(f'--restart needs --restart_dir RUN holding {evaluation.LAST_CHECKPOINT}; '
                     f'none in {args.restart_dir!r}')
    if args.data is None:
        args.data = DEFAULT_DATA[args.dataset]
    check_moe_index(args, parser)
    check_k_schedule(args, parser)


def check_k_schedule(args, parser):
    """The k schedule spans the run: --dynamic_overall_steps defaults to --max_step (as the original scripts set
    the two equal), so shortening a run shortens its schedule; an explicit span longer than the run is refused,
    as the run would end before k reaches --moe-top-k-max while the learning rate ends its cosine."""
    if args.dynamic_overall_steps <= 0:
        args.dynamic_overall_steps = args.max_step
    elif args.dynamic_moe and args.dynamic_overall_steps > args.max_step:
        parser.error(f'--dynamic_overall_steps {args.dynamic_overall_steps} is longer than the run (--max_step '
                     f'{args.max_step}): k would stop at {args.dynamic_moe_mode} step {args.max_step - 1} of '
                     f'{args.dynamic_overall_steps}, never reaching the end of its schedule; drop '
                     f'--dynamic_overall_steps (the schedule then spans --max_step) or give at most {args.max_step}')


def check_moe_index(args, parser):
    """--moe_index must name layers of the model, checked here rather than when the model is built (after the
    run directory exists)."""
    if not args.moe or args.moe_index is None:
        return
    try:
        layers = [int(i) for i in args.moe_index.split(',') if i.strip()]
    except ValueError:
        layers = []
    if not layers:
        parser.error(f'--moe_index needs comma-separated layer numbers such as 0,1,2,3; got {args.moe_index!r}')
    outside = [i for i in layers if not 0 <= i < args.n_layer]
    if outside:
        inside = ','.join(str(i) for i in layers if 0 <= i < args.n_layer) or ','.join(map(str, range(args.n_layer)))
        parser.error(f'--moe_index {args.moe_index}: layer(s) {",".join(map(str, outside))} outside the '
                     f'{args.n_layer} layers (0..{args.n_layer - 1}) of --n_layer {args.n_layer}; give --moe_index '
                     f'with layers below {args.n_layer} (e.g. --moe_index {inside}) after --n_layer')


def check_compiled_engine(args, parser):
    """--compile on CUDA must compute the experts with grouped_mm: the loop engine reads the expert counts back to
    the host at every MoE layer, which splits the compiled graph there and syncs the GPU."""
    if not (args.compile and args.cuda and args.moe and args.moe_backend != 'fastmoe'):
        return
    problem = grouped_mm_problem(torch.device('cuda'), torch.bfloat16 if args.amp else torch.float32,
                                 (args.d_model, args.d_inner))
    if problem or args.moe_engine == 'loop':
        parser.error(f'--compile on CUDA needs the grouped MoE engine, which cannot run here: '
                     f'{problem or "--moe_engine loop was asked for"}; add --amp (bf16), or drop --compile')


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
    """--eval_ks is read now, not after the last step: integers, and with --moe at least one k <= E; the same
    for --valid_ks, which also needs --moe."""
    try:
        ks = evaluation.parse_ks(args.eval_ks)
    except argparse.ArgumentTypeError as err:
        parser.error(f'--eval_ks {err}')
    if args.moe and min(ks) > args.moe_num_expert:
        parser.error(f'--eval_ks {args.eval_ks}: no k is at most --moe-num-expert {args.moe_num_expert}, so '
                     f'nothing would be tested; give k from 1 to {args.moe_num_expert}')
    if args.valid_ks and not args.moe:
        parser.error('--valid_ks needs --moe (a dense model has no k)')
    if args.valid_ks and min(args.valid_ks) > args.moe_num_expert:
        parser.error(f'--valid_ks: no k is at most --moe-num-expert {args.moe_num_expert}; give k from 1 to '
                     f'{args.moe_num_expert}')


def check_router_settings(args, parser):
    """Every router's settings in their valid ranges (the router's own are also checked when it is built), and the
    router's name resolved to its canonical one, --freeze_gate folded in: `CustomNaiveGate --freeze_gate` and
    `smoe_dropout` are one configuration, so --table groups them."""
    for spec in router_registry.specs():
        try:
            problems = router_registry.setting_problems(spec.name, spec.settings(**router_settings(spec, args)))
        except (TypeError, ValueError) as err:
            problems = [str(err)]
        if problems:
            parser.error(problems[0])
    args.gate_name = canonical_router(args.gate_name, args.freeze_gate)
    args.freeze_gate = False


def dts_anneal_steps(args):
    """--dts_anneal_steps, -1 resolved to half of max_step (at least 1)."""
    return args.dts_anneal_steps if args.dts_anneal_steps > 0 else max(1, args.max_step // 2)


def parse_args(argv=None, description=None):
    parser = build_parser(description)
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args


def canonical_router(gate_name, freeze_gate=False):
    """The router's canonical name; --freeze_gate freezes the linear router at init: that is SMoE-Dropout's gate."""
    if freeze_gate and GATES[gate_name] is GATES['smoe']:
        return 'smoe_dropout'
    return router_registry.canonical_name(gate_name)


def router_config(args):
    """{name, settings} of the run's router, from its flags."""
    spec = router_registry.spec_of(args.gate_name)
    return RouterConfig(spec.name, router_settings(spec, args))


def model_config(args, n_token):
    """The model configuration of a run, as the dict stored in its checkpoints and config.json (model_config.py)."""
    cutoffs = ADAPTIVE_CUTOFFS[args.dataset] if args.adaptive else []
    return ModelConfig(
        n_token=n_token, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, d_head=args.d_head,
        d_inner=args.d_inner, dropout=args.dropout, dropatt=args.dropatt, tie_weight=not args.not_tied,
        d_embed=args.d_embed, div_val=args.div_val, tie_projs=[False] + [True] * len(cutoffs), pre_lnorm=args.pre_lnorm,
        tgt_len=args.tgt_len, ext_len=args.ext_len, mem_len=args.mem_len, cutoffs=cutoffs,
        same_length=args.same_length, clamp_len=args.clamp_len, moe=args.moe, moe_num_expert=args.moe_num_expert,
        moe_top_k=args.moe_top_k, moe_index=args.moe_index, moe_backend=args.moe_backend, moe_engine=args.moe_engine,
        init=args.init, init_range=args.init_range, init_std=args.init_std, proj_init_std=args.proj_init_std,
        moe_variant=args.moe_variant, hypermoe_emb_dim=args.hypermoe_emb_dim, hypermoe_hidden=args.hypermoe_hidden,
        hypermoe_layer_emb_dim=args.hypermoe_layer_emb_dim, hypermoe_adapter_dim=args.hypermoe_adapter_dim,
        router=router_config(args)).to_dict()
