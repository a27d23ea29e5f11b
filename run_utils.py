"""The plumbing of a training run, shared by train.py and finetune.py.

Run directories, atomic checkpoint files, the log (stdout, train.log, metrics.jsonl, TensorBoard),
the distributed context from torchrun's environment, the progress bar, and graceful stopping on
SIGINT / SIGTERM.
"""
import datetime
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm


def git_commit():
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def make_run_dir(parent):
    """<parent>/<YYYYmmdd-HHMMSS>[-n], with a copy of the sources (as the reference does)."""
    base = os.path.join(parent, time.strftime('%Y%m%d-%H%M%S'))
    run_dir, n = base, 1
    while os.path.exists(run_dir):
        run_dir, n = f'{base}-{n}', n + 1
    os.makedirs(os.path.join(run_dir, 'src'))
    for src in glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), '*.py')):
        shutil.copy(src, os.path.join(run_dir, 'src'))
    return run_dir


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state(cuda):
    """The RNG state a resumed run restores: torch's CPU generator, and every CUDA device's when `cuda`."""
    state = {'torch': torch.get_rng_state()}
    if cuda:
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, cuda):
    torch.set_rng_state(state['torch'])
    if cuda and 'cuda' in state:
        torch.cuda.set_rng_state_all(state['cuda'])


class Distributed:
    """Rank, world size and device, from torchrun's environment (one process otherwise)."""

    def __init__(self, cuda):
        self.world_size = int(os.environ.get('WORLD_SIZE', 1))
        self.rank = int(os.environ.get('RANK', 0))
        self.local_rank = int(os.environ.get('LOCAL_RANK', 0))
        if cuda:
            torch.cuda.set_device(self.local_rank)
        self.device = torch.device('cuda', self.local_rank) if cuda else torch.device('cpu')
        if self.world_size > 1:
            dist.init_process_group('nccl' if cuda else 'gloo', timeout=datetime.timedelta(hours=2))

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def mean(self, value):
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size

    def gather_columns(self, tensor):
        """Concatenate every rank's [T, B_rank, ...] along the batch dimension."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, 1)

    def close(self):
        if self.world_size > 1:
            dist.destroy_process_group()


class StopRequest:
    """SIGINT / SIGTERM set a flag that the loop checks after each step; a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class RunLog:
    """Log lines (stdout + train.log), metrics.jsonl and TensorBoard, written by the main rank only."""

    def __init__(self, run_dir, enabled, resume_step=None):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        metrics_path = os.path.join(run_dir, 'metrics.jsonl')
        if resume_step is not None and os.path.exists(metrics_path):   # drop records past the checkpoint
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)['step'] <= resume_step]
            with open(metrics_path, 'w') as f:
                f.writelines(kept)
        self.log_file = open(os.path.join(run_dir, 'train.log'), 'a')
        self.metrics = open(metrics_path, 'a')
        self.tb = SummaryWriter(run_dir, purge_step=resume_step)

    def __call__(self, line):
        if self.enabled:
            tqdm.write(line)                  # above the progress bar, when there is one
            sys.stdout.flush()
            self.log_file.write(line + '\n')
            self.log_file.flush()

    def record(self, step, split, **values):
        """One metrics.jsonl record; numeric values also go to TensorBoard as split/name."""
        if not self.enabled:
            return
        self.metrics.write(json.dumps(dict(step=step, split=split, **values)) + '\n')
        self.metrics.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(f'{split}/{name}', value, step)

    def router_stats(self, step, stats):
        if not self.enabled:
            return
        for layer, s in stats.items():
            self.tb.add_scalar(f'router/entropy/layer{layer}', s.mean_entropy, step)
            counts = s.load.tolist()
            n_expert = len(counts)
            self.tb.add_histogram_raw(
                f'router/load/layer{layer}', min=0, max=n_expert - 1, num=sum(counts),
                sum=sum(e * c for e, c in enumerate(counts)), sum_squares=sum(e * e * c for e, c in enumerate(counts)),
                bucket_limits=[e + 0.5 for e in range(n_expert)], bucket_counts=counts, global_step=step)

    def close(self):
        if self.enabled:
            self.tb.close()
            self.log_file.close()
            self.metrics.close()


def make_progress(total, initial, enabled):
    return tqdm(total=total, initial=initial, disable=not (enabled and sys.stderr.isatty()),
                dynamic_ncols=True, unit='step')
