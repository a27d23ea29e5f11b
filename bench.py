"""Speed benchmark of the engine on the paper's small enwik8 model (4 layers, d 256, 16 experts).

  python bench.py [--device cpu|cuda] [--amp] [--no_tf32] [--repeats 5] [--quick] [--json bench.json]

(a) the MoE FFN block, forward + backward at k = 2, against its floor: the dense FFN of the same FLOPs
    (the model's own, d_inner 1024: Linear(256, 1024) -> ReLU -> Dropout -> Linear(1024, 256) -> Dropout);
(b) evaluation forward of the whole model (batch 10, eval_tgt_len 128, memory 896) at k = 1..16,
    against the analytic FLOPs ratio;
(c) a whole training step (forward, backward, Adam; batch 4 x 512, memory 512) of HyperRouter at
    k = 2 against the dense model of the same active FFN width (d_inner 1024), and the HyperRouter
    step's model FLOPs utilisation: its analytic FLOPs per second over the peak of a large matmul
    (fp32, TF32 on CUDA, bf16 with --amp), measured in the same interleaved loop;
(d) a HyperRouter training step and evaluation forward against SMoE-Dropout's;
(e) HyperMoE's HyperExpert, forward + backward at k = 2: one adapter generated per distinct expert set
    of the batch (ours) against one per token (the original's);
(f) the simulated CUDA trace (sim_device.py, shapes only, so it costs little CPU): a HyperRouter training
    step (forward, backward, clipping, Adam) at k = 2, batch 22 x 512, memory 512, bf16 autocast on an sm90
    device (the grouped engine): host syncs per step (sim_host_syncs_per_step, target 0), operators per step per
    part as a proxy of kernel launches (sim_kernels_per_step), and a projected H100 step time from a stated
    model (H100_MODEL: FLOPs at a fraction of peak, bytes at HBM bandwidth, a cost per launch; a model, not a
    measurement). train.py's own reads per step are tested in tests/test_sim_device.py;
(g) train.py's own loop (Trainer.run: step, log window, stop check) on the simulated sm90 device in bf16, a tiny
    model: host reads and synchronous host-to-device copies per step without a log line, for the plain,
    capacity and DDP cases (loop_host_reads_per_step_<case>, loop_host_copies_per_step_<case>; target 0).
Prints a table and writes the figures as JSON. Timings are medians over interleaved repeats; run it
with nothing else on the machine (two PyTorch processes sharing the cores slow each other 10x).
`--quick` shrinks the model and every size so that the run takes seconds (for tests; its ratios mean little).
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hyper_expert import HyperExpert, HyperExpertGenerator
from hyper_router import set_top_k
from mem_transformer import MemTransformerLM, PositionwiseFF
from model_flops import FLOPS_FORMULA, SMALL, analytic_eval_flops, analytic_forward_flops
from moe import MoEPositionwiseFF
from output_files import STDOUT, write_text
from run_utils import keep_freed_memory
from sim_device import SimTensor, SimulatedCuda

# measured / target: 'max' ratios are times (lower is better), 'min' ratios speeds or utilisation
TARGETS = {'moe_block_vs_floor': ('max', 1.0), 'train_hr_k2_vs_dense': ('min', 0.97), 'train_mfu': ('min', 0.55),
           'eval_k1_vs_k16': ('max', None),   # 1.1 x its FLOPs ratio, set in main
           'hyper_vs_smoe_dropout_train': ('max', 1.05), 'hyper_vs_smoe_dropout_eval': ('max', 1.02),
           'hyper_expert_per_set_vs_per_token': ('max', 0.25)}
SIZES = {   # the figures' sizes, and --quick's
    'full': dict(block_tokens=512 * 22, eval_bsz=10, eval_tgt_len=128, eval_mem_len=896, train_bsz=4,
                 train_tgt_len=512, train_mem_len=512, pair_bsz=22, pair_tgt_len=512, hyper_expert_tokens=2048,
                 peak_n=2048, sim_bsz=22, sim_tgt_len=512, sim_mem_len=512),
    'quick': dict(block_tokens=256, eval_bsz=2, eval_tgt_len=16, eval_mem_len=16, train_bsz=2, train_tgt_len=16,
                  train_mem_len=16, pair_bsz=2, pair_tgt_len=16, hyper_expert_tokens=128, peak_n=256, sim_bsz=2,
                  sim_tgt_len=16, sim_mem_len=16,
                  model=dict(n_layer=2, moe_index='0,1', n_head=2, d_head=16, d_model=32, d_inner=32, hyper_size=16)),
}


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_interleaved(fns, repeats, device, warmup=1):
    """{name: median seconds}, running the functions in turn so drifts hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def autocast(device, amp):
    """bf16 autocast on `device` with --amp, as train.py's (the routers stay in fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def bench_moe_block(cfg, device, amp, n_tokens, repeats):
    torch.manual_seed(0)
    d, h = cfg['d_model'], cfg['d_inner']
    block = MoEPositionwiseFF(d, h, 0.1, num_expert=16, top_k=2, gate_name='smoe_dropout', backend='torch').to(device)
    with torch.no_grad():
        for p in block.parameters():                   # the model's init; the block alone leaves its experts at 0
            p.normal_(0, 0.02)
    dense = PositionwiseFF(d, 2 * h, 0.1).to(device)     # k = 2 experts of width h: the FLOPs of width 2h
    x = torch.randn(n_tokens, d, device=device, requires_grad=True)

    def moe():
        with autocast(device, amp):
            y = block.moe(x)
        y.float().sum().backward()

    def floor():
        with autocast(device, amp):
            y = dense.CoreNet(x)
        y.float().sum().backward()

    t = time_interleaved({'moe': moe, 'floor': floor}, repeats, device)
    return {'moe_block_s': t['moe'], 'floor_s': t['floor'], 'moe_block_vs_floor': t['moe'] / t['floor']}


def eval_setup(cfg, gate_name, device, sizes):
    torch.manual_seed(0)
    model = MemTransformerLM(**dict(cfg, gate_name=gate_name)).to(device).eval()
    model.reset_length(sizes['eval_tgt_len'], 0, sizes['eval_mem_len'])
    data = torch.randint(0, 204, (sizes['eval_tgt_len'], sizes['eval_bsz']), device=device)
    with torch.no_grad():
        mems = model(data, data)[1:]
        while mems[0].size(0) < sizes['eval_mem_len']:
            mems = model(data, data, *mems)[1:]
    return model, data, mems


def bench_eval_over_k(cfg, device, amp, sizes, repeats):
    model, data, mems = eval_setup(cfg, 'hyper_router', device, sizes)
    fns = {}
    for k in (1, 2, 4, 8, 16):
        def run(k=k):
            set_top_k(model, k)
            with torch.no_grad(), autocast(device, amp):
                model(data, data, *mems)
        fns[k] = run
    t = time_interleaved(fns, repeats, device)
    flops = {k: analytic_eval_flops(cfg, k, sizes['eval_bsz'], sizes['eval_tgt_len'], sizes['eval_mem_len'])
             for k in fns}
    rows = {k: {'eval_s': t[k], 'time_vs_k16': t[k] / t[16], 'flops': flops[k], 'flops_vs_k16': flops[k] / flops[16]}
            for k in fns}
    return {'eval_over_k': rows, 'eval_k1_vs_k16': t[1] / t[16], 'eval_k1_vs_k16_flops': flops[1] / flops[16]}


def train_step_fn(cfg, device, amp, bsz, tgt_len, mem_len, k):
    """A closure running one training step (forward, backward, Adam) with the memory carried over."""
    torch.manual_seed(0)
    model = MemTransformerLM(**dict(cfg, tgt_len=tgt_len, mem_len=mem_len)).to(device).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2.5e-4)
    if cfg['moe']:
        set_top_k(model, k)
    data = torch.randint(0, 204, (tgt_len + 1, bsz), device=device)
    state = {'mems': ()}

    def step():
        opt.zero_grad()
        with autocast(device, amp):
            out = model(data[:-1], data[1:], *state['mems'])
        out[0].float().mean().backward()
        opt.step()
        state['mems'] = out[1:]
    return step


def peak_matmul_fn(device, amp, n):
    """A closure multiplying two n x n matrices (fp32; TF32 on CUDA unless --no_tf32; bf16 with --amp)."""
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    if amp:
        a, b = a.bfloat16(), b.bfloat16()
    return lambda: a @ b


def bench_train_vs_dense(cfg, device, amp, sizes, repeats):
    """HyperRouter k = 2 against the dense model of the same active width, and its MFU, in one loop."""
    bsz, tgt_len, mem_len = sizes['train_bsz'], sizes['train_tgt_len'], sizes['train_mem_len']
    hyper = dict(cfg, gate_name='hyper_router')
    dense = dict(cfg, moe=False, d_inner=2 * cfg['d_inner'])
    fns = {'hyper_router': train_step_fn(hyper, device, amp, bsz, tgt_len, mem_len, 2),
           'dense': train_step_fn(dense, device, amp, bsz, tgt_len, mem_len, 2),
           'peak_matmul': peak_matmul_fn(device, amp, sizes['peak_n'])}
    fns['hyper_router']()                          # fills the memory: every timed step attends over M + T
    fns['dense']()
    t = time_interleaved(fns, repeats, device)
    flops = 3 * analytic_forward_flops(hyper, 2, bsz, tgt_len, mem_len)
    peak = 2 * sizes['peak_n'] ** 3 / t['peak_matmul']
    return {'train_hr_k2_s': t['hyper_router'], 'train_dense_s': t['dense'],
            'train_hr_k2_vs_dense': t['dense'] / t['hyper_router'], 'train_hr_k2_flops': flops,
            'peak_flops_per_s': peak, 'train_mfu': flops / t['hyper_router'] / peak}


def bench_hyper_vs_smoe_dropout(cfg, device, amp, sizes, repeats):
    fns_train, fns_eval = {}, {}
    for gate_name in ('hyper_router', 'smoe_dropout'):
        fns_train[gate_name] = train_step_fn(dict(cfg, gate_name=gate_name), device, amp, sizes['pair_bsz'],
                                             sizes['pair_tgt_len'], 0, 8)
        eval_model, eval_data, mems = eval_setup(cfg, gate_name, device, sizes)
        set_top_k(eval_model, 2)

        def evaluate(model=eval_model, data=eval_data, mems=mems):
            with torch.no_grad(), autocast(device, amp):
                model(data, data, *mems)
        fns_eval[gate_name] = evaluate
    t_train = time_interleaved(fns_train, repeats, device)
    t_eval = time_interleaved(fns_eval, repeats * 2, device)
    return {'train_step_s': t_train, 'eval_s': t_eval,
            'hyper_vs_smoe_dropout_train': t_train['hyper_router'] / t_train['smoe_dropout'],
            'hyper_vs_smoe_dropout_eval': t_eval['hyper_router'] / t_eval['smoe_dropout']}


def bench_hyper_expert(cfg, device, amp, n_tokens, repeats):
    torch.manual_seed(0)
    hyper_expert = HyperExpert(16, HyperExpertGenerator(cfg['d_model'], cfg['n_layer']), layer_index=0).to(device)
    x = torch.randn(n_tokens, cfg['d_model'], device=device, requires_grad=True)
    top_idx = torch.rand(n_tokens, 16, device=device).topk(2, dim=-1).indices         # [T, 2], random sets

    def run(per_set):
        with autocast(device, amp):
            y = hyper_expert(x, top_idx, per_set=per_set)
        y.float().sum().backward()
    t = time_interleaved({per_set: lambda per_set=per_set: run(per_set) for per_set in (True, False)}, repeats, device)
    return {'hyper_expert_per_set_s': t[True], 'hyper_expert_per_token_s': t[False],
            'hyper_expert_per_set_vs_per_token': t[True] / t[False]}


# the projection of a step on one H100 SXM (a model, not a measurement): matmul-class FLOPs at a fraction of the
# dense bf16 peak, every operator's inputs and outputs through HBM once, and a fixed cost per kernel launch; the
# host issues launches at one per `host_launch_s`, and the step takes the longer of the GPU's time and the host's
H100_MODEL = dict(peak_flops=989e12, flops_fraction=0.5, hbm_bytes_per_s=3.35e12, launch_s=2e-6, host_launch_s=6e-6)
SIM_PARTS = ('attention', 'moe', 'rest', 'optimizer')


def project_h100(flops, n_bytes, launches, model=H100_MODEL):
    """Seconds per step under H100_MODEL: max(FLOPs / (fraction x peak) + bytes / HBM + launches x launch cost,
    launches x host launch cost)."""
    gpu = (flops / (model['flops_fraction'] * model['peak_flops']) + n_bytes / model['hbm_bytes_per_s']
           + launches * model['launch_s'])
    return max(gpu, launches * model['host_launch_s'])


def bench_simulated_step(cfg, sizes):
    """Host syncs, operators, FLOPs and bytes of a HyperRouter bf16 training step on the simulated sm90 device."""
    from mem_transformer import RelPartialLearnableMultiHeadAttn
    bsz, tgt_len, mem_len = sizes['sim_bsz'], sizes['sim_tgt_len'], sizes['sim_mem_len']
    with SimulatedCuda(capability=(9, 0), compute='meta', measure_cost=True) as sim:
        torch.manual_seed(0)
        model = MemTransformerLM(**dict(cfg, gate_name='hyper_router', tgt_len=tgt_len, mem_len=mem_len))
        model = model.to(sim.device).train()
        set_top_k(model, 2)
        sim.attribute_parts(model, {RelPartialLearnableMultiHeadAttn: 'attention', MoEPositionwiseFF: 'moe'})
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=2.5e-4, fused=True)                     # as train.py on CUDA
        data = torch.randint(0, 204, (tgt_len + 1, bsz)).to(sim.device)
        mems = ()
        for _ in range(2):                         # the second step attends over the memory the first left
            sim.reset_counts()
            with torch.autocast('cuda', dtype=torch.bfloat16):
                out = model(data[:-1], data[1:], *mems)
            out[0].float().mean().backward()
            with sim.in_part('optimizer'):
                torch.nn.utils.clip_grad_norm_(params, 0.25)
                opt.step()
                opt.zero_grad()
            mems = out[1:]
    kernels = {part: sim.op_counts.get(part, 0) for part in SIM_PARTS}
    flops, n_bytes, launches = sum(sim.flops.values()), sum(sim.bytes.values()), sum(kernels.values())
    step_s = project_h100(flops, n_bytes, launches)
    return {'sim_host_syncs_per_step': len(sim.host_reads), 'sim_host_syncs': [list(r) for r in sim.host_reads],
            'sim_kernels_per_step': dict(kernels, total=launches), 'sim_flops_per_step': flops,
            'sim_bytes_per_step': n_bytes, 'sim_h100_step_s_projected': step_s,
            'sim_h100_tokens_per_s_projected': bsz * tgt_len / step_s, 'h100_model': H100_MODEL}


class HostCopies(TorchDispatchMode):
    """Counts the synchronous host-to-device copies on the simulated device (a CPU tensor moved to cuda:0)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get('device')
        if func is torch.ops.aten._to_copy.default and device is not None and torch.device(device).type == 'cuda' \
                and not isinstance(args[0], SimTensor):
            self.copies.append(tuple(args[0].shape))
        elif func is torch.ops.aten.copy_.default and isinstance(args[0], SimTensor) \
                and not isinstance(args[1], SimTensor):
            self.copies.append(tuple(args[1].shape))
        return func(*args, **kwargs)


class _StepsDone(Exception):
    """Ends Trainer.run after the steps counted (before its validation and checkpoint)."""


# the loop's cases: train.py flags, and the ranks whose collectives the loop makes
LOOP_CASES = {'plain': ((), 1), 'capacity': (('--capacity_factor', '1.0'), 1),
              'ddp': ((), 2), 'capacity_ddp': (('--capacity_factor', '1.0'), 2)}


def loop_syncs_per_step(case, data_dir, steps=5):
    """{step: (host reads, host-to-device copies)} of train.py's own loop (Trainer.run: the step, the log
    window, the stop check) on the simulated H100 in bf16 (the grouped engine), a tiny model, a log line every
    3 steps; ranks 2: the loop's collectives as under DDP, each all-reduce a no-op (one rank's work counted).
    The loop's host work is train.py's, so this measure runs its Trainer (imported here, not at the top)."""
    import torch.distributed as dist

    import train
    from data_utils import get_lm_corpus
    from run_utils import Distributed
    flags, ranks = LOOP_CASES[case]
    totals = {}
    all_reduce, dist.all_reduce = dist.all_reduce, lambda tensor, op=None: None
    try:
        with tempfile.TemporaryDirectory() as run_dir, SimulatedCuda() as sim, HostCopies() as copies:
            args = train.parse_args(['--dataset', 'synthetic', '--data', data_dir, '--cuda', '--amp', '--n_layer', '2',
                                     '--d_model', '16', '--n_head', '2', '--d_head', '8', '--d_inner', '16',
                                     '--tgt_len', '16', '--mem_len', '16', '--batch_size', '4', '--moe',
                                     '--moe-num-expert', '4', '--moe-top-k', '2', '--max_step', '100',
                                     '--log-interval', '3', *flags])
            trainer = train.Trainer(args, Distributed(args.cuda), get_lm_corpus(data_dir, 'synthetic'), run_dir)
            trainer.ddp.world_size = ranks
            should_stop = trainer._should_stop

            def counted(stop):
                stopping = should_stop(stop)
                totals[trainer.step] = (len(sim.host_reads), len(copies.copies))
                if trainer.step == steps:
                    raise _StepsDone
                return stopping
            trainer._should_stop = counted
            try:
                trainer.run()
            except _StepsDone:
                pass
    finally:
        dist.all_reduce = all_reduce
    return {step: tuple(now - before for now, before in zip(totals[step], totals[step - 1]))
            for step in range(2, steps + 1)}


def bench_loop_syncs(data_dir):
    """Host reads and synchronous host-to-device copies per step of the loop, at steps that write no log line."""
    res = {}
    for case in LOOP_CASES:
        with contextlib.redirect_stdout(io.StringIO()):        # the corpus's and the run's own lines: not a figure
            per_step = loop_syncs_per_step(case, data_dir)
        quiet = [counts for step, counts in per_step.items() if step % 3]
        res[f'loop_host_reads_per_step_{case}'] = max(reads for reads, _ in quiet)
        res[f'loop_host_copies_per_step_{case}'] = max(copies for _, copies in quiet)
    return res


def verdict(res, name):
    """(measured, target text, 'ok' or 'MISSED') of one ratio."""
    kind, target = TARGETS[name]
    if name == 'eval_k1_vs_k16':
        kind, target = 'max', 1.1 * res['eval_k1_vs_k16_flops']       # within 10% of the FLOPs ratio
    ok = res[name] <= target if kind == 'max' else res[name] >= target
    return res[name], f"{'<=' if kind == 'max' else '>='} {target:.2f}", 'ok' if ok else 'MISSED'


def print_report(res):
    s = res['sizes']
    print(f"device {res['device']}, torch {res['torch']}, {res['threads']} threads, "
          f"{'bf16 autocast' if res['amp'] else 'fp32'}{', TF32 matmuls' if res['tf32'] else ''}"
          f"{', --quick sizes' if res['quick'] else ''}")
    if res['quick']:
        print('model shrunk by --quick: ' + ', '.join(f'{k} {v}' for k, v in SIZES['quick']['model'].items()))
    print(f"(a) MoE block fwd+bwd, k=2, {s['block_tokens']} tokens: {res['moe_block_s'] * 1e3:.1f} ms "
          f"vs floor {res['floor_s'] * 1e3:.1f} ms")
    print(f"(b) eval forward (batch {s['eval_bsz']}, tgt {s['eval_tgt_len']}, mem {s['eval_mem_len']})")
    print(f"    {'k':>3} {'ms':>9} {'time/k16':>9} {'FLOPs/k16':>10} {'GFLOPs':>8}")
    for k, row in res['eval_over_k'].items():
        print(f"    {k:>3} {row['eval_s'] * 1e3:9.1f} {row['time_vs_k16']:9.3f} {row['flops_vs_k16']:10.3f} "
              f"{row['flops'] / 1e9:8.2f}")
    print(f"(c) train step (batch {s['train_bsz']}, tgt {s['train_tgt_len']}, mem {s['train_mem_len']}): HyperRouter "
          f"k=2 {res['train_hr_k2_s'] * 1e3:.1f} ms, dense d_inner 1024 {res['train_dense_s'] * 1e3:.1f} ms; "
          f"HyperRouter {res['train_hr_k2_flops'] / 1e9:.1f} GFLOPs per step, "
          f"{res['train_hr_k2_flops'] / res['train_hr_k2_s'] / 1e9:.1f} GFLOP/s; "
          f"peak {s['peak_n']}^3 matmul {res['peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
    print('    ' + FLOPS_FORMULA.replace('\n', '\n    '))
    print(f"(d) train step (batch {s['pair_bsz']}, tgt {s['pair_tgt_len']}, no memory, k=8): "
          + ', '.join(f'{g} {t * 1e3:.1f} ms' for g, t in res['train_step_s'].items()))
    print('    eval forward (k=2): ' + ', '.join(f'{g} {t * 1e3:.1f} ms' for g, t in res['eval_s'].items()))
    print(f"(e) HyperExpert fwd+bwd, k=2, {s['hyper_expert_tokens']} tokens: one adapter per expert set "
          f"{res['hyper_expert_per_set_s'] * 1e3:.1f} ms, per token {res['hyper_expert_per_token_s'] * 1e3:.1f} ms")
    kernels = res['sim_kernels_per_step']
    print(f"(f) simulated sm90 training step, bf16 (batch {s['sim_bsz']} x {s['sim_tgt_len']}, mem {s['sim_mem_len']}, "
          f"k=2): sim_host_syncs_per_step {res['sim_host_syncs_per_step']} (target 0)"
          + ''.join(f"\n      {what} in {part} at {where}" for what, part, where in res['sim_host_syncs']))
    print('    sim_kernels_per_step (operators, a proxy of launches): '
          + ', '.join(f'{part} {n}' for part, n in kernels.items()))
    print(f"    {res['sim_flops_per_step'] / 1e12:.2f} TFLOPs, {res['sim_bytes_per_step'] / 1e9:.1f} GB through memory; "
          f"projected H100 step (a model: {H100_MODEL['flops_fraction']:.0%} of {H100_MODEL['peak_flops'] / 1e12:.0f} "
          f"TFLOP/s, {H100_MODEL['hbm_bytes_per_s'] / 1e12:.2f} TB/s, {H100_MODEL['launch_s'] * 1e6:.0f} us a launch, "
          f"host {H100_MODEL['host_launch_s'] * 1e6:.0f} us a launch): {res['sim_h100_step_s_projected'] * 1e3:.1f} ms, "
          f"{res['sim_h100_tokens_per_s_projected']:,.0f} tokens/s")
    print('(g) train.py\'s loop on the simulated sm90 device, bf16, steps without a log line: host reads / '
          'synchronous host-to-device copies per step (target 0 / 0): '
          + ', '.join(f"{case} {res[f'loop_host_reads_per_step_{case}']} / {res[f'loop_host_copies_per_step_{case}']}"
                      for case in LOOP_CASES))
    print('\nratio                              measured  target')
    for name in TARGETS:
        measured, target, ok = verdict(res, name)
        print(f'{name:34} {measured:8.3f}  {target:8}  {ok}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--amp', action='store_true', help='bf16 autocast, as train.py --amp')
    parser.add_argument('--no_tf32', action='store_true', help='on CUDA, fp32 matmuls in full fp32 (default TF32)')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--quick', action='store_true', help='tiny sizes and 2 repeats: seconds, for tests')
    parser.add_argument('--json', default='bench.json', help='where the figures go as JSON (-: standard output, the report then on stderr)')
    args = parser.parse_args(argv)
    keep_freed_memory()
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error(f'--device {args.device} given but torch sees no CUDA device; use --device cpu')
    tf32 = device.type == 'cuda' and not args.no_tf32
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    sizes = SIZES['quick' if args.quick else 'full']
    repeats = 2 if args.quick else args.repeats
    res = {'device': str(device), 'torch': torch.__version__, 'threads': torch.get_num_threads(), 'amp': args.amp,
           'tf32': tf32, 'quick': args.quick, 'sizes': {k: v for k, v in sizes.items() if k != 'model'}}
    cfg = dict(SMALL, **sizes.get('model', {}))
    res.update(bench_moe_block(cfg, device, args.amp, sizes['block_tokens'], repeats))
    res.update(bench_eval_over_k(cfg, device, args.amp, sizes, repeats))
    res.update(bench_train_vs_dense(cfg, device, args.amp, sizes, repeats))
    res.update(bench_hyper_vs_smoe_dropout(cfg, device, args.amp, sizes, repeats))
    res.update(bench_hyper_expert(cfg, device, args.amp, sizes['hyper_expert_tokens'], repeats))
    res.update(bench_simulated_step(cfg, sizes))
    with tempfile.TemporaryDirectory() as data_dir:
        res.update(bench_loop_syncs(os.path.join(data_dir, 'synthetic')))
    with contextlib.redirect_stdout(sys.stderr) if args.json == STDOUT else contextlib.nullcontext():
        print_report(res)        # with --json -, the JSON alone goes to stdout
    write_text(args.json, json.dumps(res, indent=2) + '\n')
    if args.json != STDOUT:
        print(f'\nwrote {args.json}')


if __name__ == '__main__':
    main()
