"""script/gpu_check.sh's summary: one table row per check with its figures, each failed check's last 20 lines,
and the GPU, driver, torch and CUDA versions; printed and written to OUT/gpu_check.md and OUT/gpu_check.json,
whatever failed (a figure that cannot be read says so in its row).

    python3 script/gpu_check_summary.py WORK OUT DEVICE STEPS 'name|result|seconds|log' ...
"""
import glob
import json
import os
import subprocess
import sys

FULL_STEPS = 400_000                                   # script/table1/hyper_router_enwik8.sh --max_step
TAIL = 20


def load(path):
    with open(path) as f:
        return json.load(f)


def machine_figures(work):
    res = load(os.path.join(work, 'machine.json'))
    return '; '.join(f'{k} {v}' for k, v in res.items() if k not in ('engine_lines', 'ok'))


def timing_figures(work):
    res = load(os.path.join(work, 'timing.json'))
    return ', '.join(f"{name.replace('_', ' ')} {r['tokens_per_s']:,.0f} tokens/s ({r['engine']}, "
                     f"{r['host_syncs_per_step']:g} syncs/step)" for name, r in res.items() if name != 'ok')


def vs_cpu_figures(work):
    res = load(os.path.join(work, 'vs_cpu.json'))
    return ', '.join(f"{p}: loss {r['loss']:.1e}, worst gradient {r['worst_gradient']:.1e}"
                     for p, r in res.items() if p != 'ok')


def resume_figures(work):
    return f"worst validation loss difference {load(os.path.join(work, 'resume.json'))['worst']:.1e} (relative)"


def bench_figures(path):
    res = load(path)
    return (f"block/floor {res['moe_block_vs_floor']:.2f}, HR k2/dense {res['train_hr_k2_vs_dense']:.2f}, "
            f"MFU {res['train_mfu']:.2f}, eval k1/k16 {res['eval_k1_vs_k16']:.2f}")


def train_figures(run_parent):
    run_dir = max(glob.glob(os.path.join(run_parent + '-synthetic', '*')), key=os.path.getmtime)
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        records = [json.loads(line) for line in f]
    args = load(os.path.join(run_dir, 'config.json'))['args']
    train = [r for r in records if r['split'] == 'train']
    timed = train[1:] or train                         # the first window holds the warm-up
    tokens_per_s = sum(r['tokens_per_s'] for r in timed) / len(timed)
    hours = FULL_STEPS * args['batch_size'] * args['tgt_len'] / tokens_per_s / 3600
    bpc = [r['bpc'] for r in records if r['split'] == 'valid' and r.get('experts') == 'top_k'][-1]
    memory = [r['peak_mem_gib'] for r in train if 'peak_mem_gib' in r]
    memory = f'{max(memory):.1f} GiB' if memory else '- (not on a GPU)'
    return (f"{tokens_per_s:,.0f} tokens/s, peak GPU memory {memory}, valid bpc {bpc:.3f}, "
            f"400k steps in {hours:.1f} h")


def last_line(log):
    with open(log) as f:
        return [line.strip() for line in f if line.strip()][-1]


def figures(name, work, log):
    readers = {'machine': lambda: machine_figures(work), 'timing': lambda: timing_figures(work),
               'vs_cpu': lambda: vs_cpu_figures(work), 'resume': lambda: resume_figures(work),
               'bench fp32': lambda: bench_figures(os.path.join(work, 'bench_fp32.json')),
               'bench amp': lambda: bench_figures(os.path.join(work, 'bench_amp.json')),
               'train fp32': lambda: train_figures(os.path.join(work, 'train_fp32')),
               'train amp': lambda: train_figures(os.path.join(work, 'train_amp'))}
    try:
        return readers[name]() if name in readers else (last_line(log) if log else '`import fmoe` fails here')
    except (OSError, ValueError, KeyError, IndexError) as err:
        return f'(no figures: {type(err).__name__}: {err})'


def tail(log):
    try:
        with open(log, errors='replace') as f:
            return f.read().splitlines()[-TAIL:]
    except OSError as err:
        return [f'(no log: {err})']


def versions(work):
    """From the machine check, or asked here when it failed."""
    try:
        res = load(os.path.join(work, 'machine.json'))
        return {k: v for k, v in res.items() if k not in ('engine_lines', 'ok')}
    except (OSError, ValueError):
        code = ('import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and '
                'torch.cuda.get_device_name(0))')
        out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
        return {'torch, CUDA, GPU': (out.stdout or out.stderr).strip()[-300:]}


def main(work, out, device, steps, *rows):
    rows = [dict(zip(('name', 'result', 'seconds', 'log'), row.split('|'))) for row in rows]
    for row in rows:
        row['figures'] = figures(row['name'], work, row['log']) if row['result'] in ('ok', 'skipped') else ''
        row['tail'] = tail(row['log']) if row['result'] not in ('ok', 'skipped') else []
    info = versions(work)
    lines = ['| check | result | s | figures |', '|---|---|---|---|']
    lines += [f"| {r['name']} | {r['result']} | {r['seconds']} | {r['figures']} |" for r in rows]
    lines.append('')
    lines.append('versions: ' + '; '.join(f'{k} {v}' for k, v in info.items()))
    if device != 'cuda':
        lines.append(f'({"the shortened CPU form" if device == "cpu" else "the simulated GPU"}: {steps} steps; '
                     'the figures say nothing about speed)')
    for r in rows:
        if r['tail']:
            lines += ['', f"{r['name']} ({r['result']}), its last {TAIL} lines:", '```', *r['tail'], '```']
    failed = [r['name'] for r in rows if r['result'] not in ('ok', 'skipped')]
    lines.append(f"gpu_check: {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ''))
    text = '\n'.join(lines)
    with open(os.path.join(out, 'gpu_check.md'), 'w') as f:
        f.write(text + '\n')
    with open(os.path.join(out, 'gpu_check.json'), 'w') as f:
        json.dump(dict(device=device, steps=int(steps), versions=info, checks=rows, failed=failed), f, indent=2)
    print(text)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main(*sys.argv[1:]))
