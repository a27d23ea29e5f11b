"""The GPU-only parts of script/gpu_check.sh, runnable on the CPU in shortened form (as its test does).

    python script/gpu_check.py --device cuda [--json OUT.json]
    python script/gpu_check.py --device cpu --quick          # the same code on a tiny model, seconds

1. the machine: GPU, compute capability, torch and CUDA versions, the attention backends training is pinned
   to, the MoE engine chosen in fp32 and in bf16;
2. the paper's small model (4 layers, d 256, 16 experts, HyperRouter at k = 2) at batch 22 x 512, memory 512:
   training steps (forward, backward, clipping, fused Adam) in TF32 and in bf16 autocast, timed with
   torch.cuda.set_sync_debug_mode('error') on, so that a host sync in a step is an error; tokens/s against the
   targets (bf16 >= 400k, TF32 >= 150k tokens/s on one H100);
3. the device's loss and gradients against the CPU's, same weights, same batch (4 x 128, memory 128, dropout
   off): fp32/TF32 within 1e-3 (loss, relative) and 1e-2 (each gradient, relative to its norm), bf16 within 2e-2
   and 1e-1 (bf16 keeps 8 bits of mantissa; a small gradient's relative error reaches a few 1e-2 on the CPU);
4. a run stopped and resumed on the device (train.py --stop_step, --restart) ends with the straight run's
   validation loss.
Prints one line a check and `gpu_check: N failed` at the end; exit status 1 when one failed.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hyper_router import set_top_k  # noqa: E402
from mem_transformer import BIAS_GRAD_BACKENDS, MemTransformerLM  # noqa: E402
from model_flops import SMALL  # noqa: E402
from moe import describe_engine  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {'bf16': 400_000, 'tf32': 150_000}               # tokens/s of a training step on one H100
TOLERANCES = {'tf32': (1e-3, 1e-2), 'bf16': (2e-2, 1e-1)}  # (loss, gradient) relative errors against the CPU's
SIZES = {'full': dict(bsz=22, tgt_len=512, mem_len=512, steps=10, cmp_bsz=4, cmp_len=128),
         'quick': dict(bsz=2, tgt_len=16, mem_len=16, steps=2, cmp_bsz=2, cmp_len=8,
                       model=dict(n_layer=2, moe_index='0,1', n_head=2, d_head=16, d_model=32, d_inner=32,
                                  hyper_size=16))}


def describe(device):
    torch_line = f'torch {torch.__version__}, CUDA {torch.version.cuda or "none"}'
    if device.type == 'cuda':
        gpu = f'{torch.cuda.get_device_name(device)}, capability {".".join(map(str, torch.cuda.get_device_capability(device)))}'
    else:
        gpu = 'no GPU (the CPU form)'
    model = MemTransformerLM(**SMALL)
    print(f'machine: {gpu}; {torch_line}')
    print(f'attention in training (BD needs a gradient): sdpa pinned to {", ".join(b.name for b in BIAS_GRAD_BACKENDS)}')
    for dtype in (torch.float32, torch.bfloat16):
        print(describe_engine(model, device, dtype))


def autocast(device, bf16):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def make_model(cfg, device, dropout=None):
    torch.manual_seed(0)
    model = MemTransformerLM(**dict(cfg, **({} if dropout is None else {'dropout': dropout}))).to(device).train()
    set_top_k(model, 2)
    return model


def time_steps(cfg, device, bf16, sizes):
    """Tokens/s of training steps (after two untimed ones), sync debug mode 'error' on CUDA in the timed ones."""
    model = make_model(dict(cfg, tgt_len=sizes['tgt_len'], mem_len=sizes['mem_len']), device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2.5e-4, fused=device.type == 'cuda')
    data = torch.randint(0, cfg['n_token'], (sizes['tgt_len'] + 1, sizes['bsz']), device=device)
    mems = ()

    def step(mems):
        with autocast(device, bf16):
            out = model(data[:-1], data[1:], *mems)
        out[0].float().mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 0.25)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out[1:]
    for _ in range(2):                                  # warm-up; the second fills the memory
        mems = step(mems)
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
    start = time.perf_counter()
    try:
        for _ in range(sizes['steps']):
            mems = step(mems)
    finally:
        if device.type == 'cuda':
            torch.cuda.set_sync_debug_mode('default')
            torch.cuda.synchronize()
    return sizes['steps'] * sizes['bsz'] * sizes['tgt_len'] / (time.perf_counter() - start)


def loss_and_grads(cfg, device, bf16, data, mems_len):
    model = make_model(dict(cfg, tgt_len=data.size(0) - 1, mem_len=mems_len), device, dropout=0.0)
    data = data.to(device)
    with autocast(device, bf16):
        mems = model(data[:-1], data[1:])[1:]
        loss = model(data[:-1], data[1:], *mems)[0].float().mean()
    loss.backward()
    return loss.item(), {name: p.grad.float().cpu() for name, p in model.named_parameters() if p.grad is not None}


def compare_with_cpu(cfg, device, bf16, sizes):
    """(loss relative error, worst gradient error relative to its norm) of the device against the CPU's fp32."""
    data = torch.randint(0, cfg['n_token'], (sizes['cmp_len'] + 1, sizes['cmp_bsz']),
                         generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = loss_and_grads(cfg, torch.device('cpu'), False, data, sizes['cmp_len'])
    loss, grads = loss_and_grads(cfg, device, bf16, data, sizes['cmp_len'])
    grad_err = max(((grads[n] - g).norm() / g.norm().clamp(min=1e-30)).item() for n, g in ref_grads.items())
    return abs(loss - ref_loss) / abs(ref_loss), grad_err


def resume_matches(device, work):
    """A 4-step tiny run stopped at step 2 and resumed ends with the straight run's validation losses."""
    flags = [sys.executable, 'train.py', '--dataset', 'synthetic', '--data', os.path.join(work, 'synthetic'),
             '--n_layer', '2', '--d_model', '32', '--n_head', '2', '--d_head', '16', '--d_inner', '32',
             '--tgt_len', '16', '--mem_len', '16', '--eval_tgt_len', '8', '--batch_size', '4', '--max_step', '4',
             '--eval-interval', '2', '--max_eval_steps', '2', '--eval_ks', '2', '--moe', '--moe-num-expert', '4',
             '--gate_name', 'hyper_router', *(['--cuda', '--amp'] if device.type == 'cuda' else [])]

    def run(name, *extra):
        subprocess.run([*flags, '--work_dir', os.path.join(work, name), *extra], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
        [run_dir] = glob.glob(os.path.join(work, name) + '-synthetic/*')
        with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
            return run_dir, [r['loss'] for r in map(json.loads, f) if r['split'] == 'valid']
    straight = run('straight')[1]
    run_dir, _ = run('resumed', '--stop_step', '2')
    resumed = run('resumed', '--restart', '--restart_dir', run_dir)[1]
    return resumed == straight, straight, resumed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--quick', action='store_true', help='a tiny model and 2 timed steps (the CPU form)')
    parser.add_argument('--work', default='runs/gpu_check/helper', help='where the resume check writes its runs')
    parser.add_argument('--json', default=None, help='write the figures here')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit(f'error: --device {args.device} but torch sees no CUDA device; run on a GPU, or give --device cpu')
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    sizes = SIZES['quick' if args.quick else 'full']
    cfg = dict(SMALL, **sizes.get('model', {}))
    describe(device)
    res, failed = {}, []

    def check(name, ok, line):
        print(f'{name:24} {"ok" if ok else "FAILED":7} {line}')
        failed.extend([] if ok else [name])
    for precision in ('tf32', 'bf16'):
        bf16 = precision == 'bf16'
        tokens = res[f'{precision}_tokens_per_s'] = time_steps(cfg, device, bf16, sizes)
        target = TARGETS[precision]
        check(f'step {precision}', tokens >= target or args.quick,
              f'{tokens:,.0f} tokens/s (target {target:,} on one H100{"; not judged in the CPU form" if args.quick else ""})')
        loss_err, grad_err = compare_with_cpu(cfg, device, bf16, sizes)
        tol = TOLERANCES[precision]
        res[f'{precision}_vs_cpu'] = [loss_err, grad_err]
        check(f'{precision} vs the CPU', loss_err <= tol[0] and grad_err <= tol[1],
              f'loss {loss_err:.2e} (<= {tol[0]}), gradients {grad_err:.2e} (<= {tol[1]}), relative')
    same, straight, resumed = resume_matches(device, args.work)
    check('resume', same, f'validation losses {resumed} (straight run {straight})')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(res, f, indent=2)
    print(f'gpu_check: {len(failed)} failed' + (f' ({", ".join(failed)})' if failed else ''))
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
