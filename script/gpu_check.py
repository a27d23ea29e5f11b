"""The GPU-only checks of script/gpu_check.sh, one per call, so that each runs under its own time limit.

    python3 script/gpu_check.py CHECK --device cuda --work /tmp/gpu_check     # CHECK: machine, timing, vs_cpu, resume
    python3 script/gpu_check.py CHECK --device cpu --quick                    # the same code on a tiny model, seconds
    python3 script/gpu_check.py CHECK --simulate                              # on sim_device.py's H100 (the dry run)

- machine: GPU, capability, driver, torch and CUDA versions, the sdpa backends training is pinned to, and the MoE
  engine the scripts take in fp32 (TF32) and in bf16;
- timing: the paper's small model with HyperRouter (4 layers, d 256, 16 experts) at batch 22 x 512, memory 512:
  training steps (forward, backward, clipping, Adam) at k = 2 and over the scripts' k schedule (8 -> 16, spread
  over the timed steps), in bf16 autocast and in fp32 with TF32, each with the engine the scripts take. Where
  that engine reads nothing back by design (grouped GEMM, or all experts at k = E), the timed steps run under
  torch.cuda.set_sync_debug_mode('error'); the loop engine's documented read (one per MoE layer and step) is
  counted under 'warn' and must not exceed that. Targets at k = 2 on one H100: bf16 >= 400k, TF32 >= 150k
  tokens/s;
- vs_cpu: the device's loss and gradients against the CPU's fp32 on the same weights and batch (4 x 128, memory
  128, dropout off), within TOLERANCES (taken from sim_device.py's emulation, docs/speed.md);
- resume: a tiny run stopped and resumed on the device ends with the straight run's validation losses within
  RESUME_TOLERANCE (CUDA's atomics make the backward nondeterministic).
Each call prints one line a result and writes WORK/CHECK.json; exit status 1 when it failed.
"""
import argparse
import contextlib
import glob
import json
import os
import re
import subprocess
import sys
import time
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from hyper_router import set_top_k  # noqa: E402
from mem_transformer import BIAS_GRAD_BACKENDS, MemTransformerLM  # noqa: E402
from model_flops import SMALL  # noqa: E402
from moe import choose_engine, describe_engine, moe_blocks  # noqa: E402

SCRIPT = os.path.join(REPO, 'script', 'table1', 'hyper_router_enwik8.sh')   # the column whose step is timed
MODEL = dict(SMALL, gate_name='hyper_router')                                # HyperRouter, as the script trains
TARGETS = {'bf16': 400_000, 'tf32': 150_000}               # tokens/s of a training step at k = 2 on one H100
# (loss, worst gradient) errors relative to the CPU's fp32; from the emulation on the CPU (docs/speed.md): TF32
# worst gradient 5.7e-2 (routing near a tie flips), bf16 worst gradient 1.3e-1; each about 2x what was seen
TOLERANCES = {'tf32': (2e-3, 1.5e-1), 'bf16': (2e-2, 3e-1)}
RESUME_TOLERANCE = 1e-2                                    # relative, each validation loss of the tiny bf16 run
SIZES = {'full': dict(bsz=22, tgt_len=512, mem_len=512, steps=10, warmup=2, cmp_bsz=4, cmp_len=128),
         'quick': dict(bsz=2, tgt_len=16, mem_len=16, steps=2, warmup=2, cmp_bsz=2, cmp_len=8,
                       model=dict(n_layer=2, moe_index='0,1', n_head=2, d_head=16, d_model=32, d_inner=32,
                                  hyper_size=16))}


def script_k_schedule(path=SCRIPT):
    """(k_min, k_max) of the script's dynamic top-k schedule, read from its flags."""
    with open(path) as f:
        text = f.read()
    return tuple(int(re.search(rf'--moe-top-k-{end} (\d+)', text).group(1)) for end in ('min', 'max'))


def versions(device):
    """GPU, capability, driver, torch, CUDA: what the summary prints."""
    info = {'torch': torch.__version__, 'cuda': torch.version.cuda or 'none'}
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
        info['capability'] = '.'.join(map(str, torch.cuda.get_device_capability(device)))
        try:
            info['driver'] = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                            capture_output=True, text=True, timeout=20).stdout.split('\n')[0]
        except (OSError, subprocess.SubprocessError):
            info['driver'] = 'unknown (no nvidia-smi)'
    return info


def engine_name(model, device, dtype, k):
    """The engine a step takes: 'grouped', 'loop' or 'all experts' (k = E: one wide FFN, nothing to count)."""
    block = next(iter(moe_blocks(model).values()))
    num_expert, d_inner, d_model = block.experts.htoh4.weight.shape
    if k == num_expert:
        return 'all experts'
    return choose_engine(block.engine, device, dtype, (d_model, d_inner))[0]


# ----------------------------------------------------------------------------- the checks

def check_machine(cfg, device, sizes, args):
    info = versions(device)
    model = MemTransformerLM(**cfg)
    lines = [f'sdpa in training (BD needs a gradient) pinned to {", ".join(b.name for b in BIAS_GRAD_BACKENDS)}',
             *(describe_engine(model, device, dtype) for dtype in (torch.float32, torch.bfloat16)),
             f'router: {type(next(iter(moe_blocks(model).values())).gate).__name__}']
    return True, dict(info, engine_lines=lines), '; '.join(f'{k} {v}' for k, v in info.items()) + '\n' + '\n'.join(lines)


def autocast(device, bf16):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def make_model(cfg, device, dropout=None):
    torch.manual_seed(0)
    model = MemTransformerLM(**dict(cfg, **({} if dropout is None else {'dropout': dropout}))).to(device).train()
    set_top_k(model, 2)
    return model


def time_steps(cfg, device, bf16, ks, sizes):
    """(tokens/s, host syncs per timed step, the most allowed, engine) of training steps, k = ks[i] in step i."""
    model = make_model(dict(cfg, tgt_len=sizes['tgt_len'], mem_len=sizes['mem_len']), device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2.5e-4, fused=device.type == 'cuda')
    data = torch.randint(0, cfg['n_token'], (sizes['tgt_len'] + 1, sizes['bsz']), device=device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    engines = {engine_name(model, device, dtype, k) for k in ks}
    zero_reads = engines <= {'grouped', 'all experts'}                     # the design: nothing read back
    mems = ()

    def step(mems, k):
        set_top_k(model, k)
        with autocast(device, bf16):
            out = model(data[:-1], data[1:], *mems)
        out[0].float().mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 0.25)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out[1:]
    for _ in range(sizes['warmup']):                    # untimed; the second fills the memory
        mems = step(mems, ks[0])
    sync = device.type == 'cuda'
    if sync:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error' if zero_reads else 'warn')
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        start = time.perf_counter()
        try:
            for k in ks:
                mems = step(mems, k)
        finally:
            if sync:
                torch.cuda.set_sync_debug_mode('default')
                torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    syncs = sum('synchronizing CUDA operation' in str(w.message) for w in seen)
    allowed = 0 if zero_reads else len(moe_blocks(model))                 # the loop engine: one per MoE layer
    return len(ks) * sizes['bsz'] * sizes['tgt_len'] / seconds, syncs / len(ks), allowed, '+'.join(sorted(engines))


def check_timing(cfg, device, sizes, args):
    k_min, k_max = script_k_schedule()
    steps = sizes['steps']
    schedule = [round(k_min + (k_max - k_min) * i / max(steps - 1, 1)) for i in range(steps)]
    res, ok, lines = {}, True, []
    for precision in ('bf16', 'tf32'):
        for name, ks in (('k2', [2] * steps), ('schedule', schedule)):
            try:
                with args.compute(precision):
                    tokens, syncs, allowed, engine = time_steps(cfg, device, precision == 'bf16', ks, sizes)
            except RuntimeError as err:          # a host sync under 'error', out of memory: the next one still runs
                ok = False
                lines.append(f'{precision} {name:8} FAILED {type(err).__name__}: {str(err).splitlines()[0]}')
                continue
            good = syncs <= allowed and (tokens >= TARGETS[precision] or name != 'k2' or args.quick or args.simulate)
            ok &= good
            hours = 400_000 * sizes['bsz'] * sizes['tgt_len'] / tokens / 3600
            res[f'{precision}_{name}'] = dict(tokens_per_s=tokens, host_syncs_per_step=syncs, engine=engine,
                                              k=f'{ks[0]}-{ks[-1]}', hours_400k=hours)
            target = f'target {TARGETS[precision]:,}' if name == 'k2' else f'400k steps in {hours:.1f} h'
            lines.append(f'{precision} {name:8} {"ok" if good else "FAILED":6} {tokens:,.0f} tokens/s ({target}), '
                         f'{engine} engine, {syncs:g} host syncs a step (at most {allowed})')
    if args.quick or args.simulate:
        lines.append('(speeds not judged: ' + ('the CPU form)' if args.quick else 'the simulated GPU)'))
    return ok, res, '\n'.join(lines)


def loss_and_grads(cfg, device, bf16, data, mems_len):
    model = make_model(dict(cfg, tgt_len=data.size(0) - 1, mem_len=mems_len), device, dropout=0.0)
    data = data.to(device)
    with autocast(device, bf16):
        mems = model(data[:-1], data[1:])[1:]
        loss = model(data[:-1], data[1:], *mems)[0].float().mean()
    loss.backward()
    return loss.item(), {name: p.grad.float().cpu() for name, p in model.named_parameters() if p.grad is not None}


def check_vs_cpu(cfg, device, sizes, args):
    """(loss relative error, worst gradient error relative to its norm) of the device against the CPU's fp32."""
    data = torch.randint(0, cfg['n_token'], (sizes['cmp_len'] + 1, sizes['cmp_bsz']),
                         generator=torch.Generator().manual_seed(0))
    with args.cpu_reference():
        ref_loss, ref_grads = loss_and_grads(cfg, torch.device('cpu'), False, data, sizes['cmp_len'])
    res, ok, lines = {}, True, []
    for precision in ('tf32', 'bf16'):
        with args.compute('cpu'):
            loss, grads = loss_and_grads(cfg, device, precision == 'bf16', data, sizes['cmp_len'])
        errors = {n: ((grads[n] - g).norm() / g.norm().clamp(min=1e-30)).item() for n, g in ref_grads.items()}
        worst = max(errors, key=errors.get)
        loss_err = abs(loss - ref_loss) / abs(ref_loss)
        tol = TOLERANCES[precision]
        good = loss_err <= tol[0] and errors[worst] <= tol[1]
        ok &= good
        median = sorted(errors.values())[len(errors) // 2]
        res[precision] = dict(loss=loss_err, worst_gradient=errors[worst], worst=worst, median_gradient=median)
        lines.append(f'{precision} {"ok" if good else "FAILED":6} loss {loss_err:.1e} (<= {tol[0]}), worst gradient '
                     f'{errors[worst]:.1e} (<= {tol[1]}; {worst}), median {median:.1e}; relative')
    return ok, res, '\n'.join(lines)


def check_resume(cfg, device, sizes, args):
    """A 4-step tiny bf16 run stopped at step 2 and resumed ends with the straight run's validation losses."""
    flags = ['--dataset', 'synthetic', '--data', os.path.join(args.work, 'synthetic'),
             '--n_layer', '2', '--d_model', '32', '--n_head', '2', '--d_head', '16', '--d_inner', '32',
             '--tgt_len', '16', '--mem_len', '16', '--eval_tgt_len', '8', '--batch_size', '4', '--max_step', '4',
             '--eval-interval', '2', '--max_eval_steps', '2', '--eval_ks', '2', '--moe', '--moe-num-expert', '4',
             '--gate_name', 'hyper_router', *(['--cuda', '--amp'] if device.type == 'cuda' else [])]

    def run(name, *extra):          # train.py's main in this process: three imports of torch saved
        import train
        work = os.path.join(args.work, 'resume', name)
        with args.compute('cpu'), contextlib.redirect_stdout(open(os.devnull, 'w')):
            train.main([*flags, '--work_dir', work, *extra])
        run_dir = max(glob.glob(work + '-synthetic/*'), key=os.path.getmtime)      # this run's, the newest
        with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
            return run_dir, [r['loss'] for r in map(json.loads, f) if r['split'] == 'valid']
    straight = run('straight')[1]
    run_dir, _ = run('resumed', '--stop_step', '2')
    resumed = run('resumed', '--restart', '--restart_dir', run_dir)[1]
    worst = max(abs(a - b) / abs(b) for a, b in zip(resumed, straight)) if len(resumed) == len(straight) else 1.0
    ok = worst <= RESUME_TOLERANCE
    return ok, dict(straight=straight, resumed=resumed, worst=worst), (
        f'{"ok" if ok else "FAILED"} validation losses {resumed} against the straight run\'s {straight}: worst '
        f'{worst:.1e} relative (<= {RESUME_TOLERANCE})')


CHECKS = {'machine': check_machine, 'timing': check_timing, 'vs_cpu': check_vs_cpu, 'resume': check_resume}


def simulation():
    """--simulate: the checks on sim_device.py's H100; the timed steps at full size in shapes only (compute='meta',
    seconds on a CPU), the comparisons with the CPU and the resume with the data."""
    from sim_device import SimulatedCuda
    return dict(compute=lambda kind: SimulatedCuda(compute='cpu' if kind == 'cpu' else 'meta'))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('check', choices=CHECKS)
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--quick', action='store_true', help='a tiny model and 2 timed steps (the CPU form)')
    parser.add_argument('--simulate', action='store_true', help="on sim_device.py's simulated H100 (the dry run)")
    parser.add_argument('--steps', type=int, default=None, help='timed steps (default 10; 2 with --quick)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed steps before them (default 2)')
    parser.add_argument('--work', default='/tmp/gpu_check', help='where the check writes its runs and CHECK.json')
    args = parser.parse_args(argv)
    args.compute, args.cpu_reference = (lambda kind: contextlib.nullcontext()), contextlib.nullcontext
    if args.simulate:
        args.device = 'cuda'
        vars(args).update(simulation())
    device = torch.device(args.device)
    if device.type == 'cuda' and not args.simulate and not torch.cuda.is_available():
        sys.exit(f'error: --device {args.device} but torch {torch.__version__} sees no CUDA device; run on a GPU, '
                 'or give --device cpu (or --simulate)')
    sizes = dict(SIZES['quick' if args.quick else 'full'])
    sizes['steps'] = args.steps or sizes['steps']
    if args.simulate:                 # the comparisons compute on the CPU: a shorter batch keeps the dry run short
        sizes.update(cmp_bsz=2, cmp_len=32)
    sizes['warmup'] = sizes['warmup'] if args.warmup is None else args.warmup
    cfg = dict(MODEL, **sizes.get('model', {}))
    os.makedirs(args.work, exist_ok=True)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = device.type == 'cuda'
    try:
        with (args.compute('cpu') if args.check == 'machine' else contextlib.nullcontext()):
            ok, res, text = CHECKS[args.check](cfg, device, sizes, args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    print(text)
    with open(os.path.join(args.work, f'{args.check}.json'), 'w') as f:
        json.dump(dict(res, ok=ok), f, indent=2)
    print(f'{args.check}: {"ok" if ok else "FAILED"}')
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
