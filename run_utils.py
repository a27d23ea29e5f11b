"""The plumbing of a training run, shared by train.py and finetune.py.

Run directories and their lock, atomic checkpoint files, the log (stdout, train.log, metrics.jsonl,
TensorBoard), the distributed context from torchrun's environment, the progress bar, graceful stopping
on SIGINT / SIGTERM, the error that entry points print as one `error: ...` line, and the C allocator
setting every entry point starts with.
"""
import ctypes
import datetime
import errno
import fcntl
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import router_registry


class RunError(Exception):
    """A bad input or run state the user can fix; entry points print it as one `error: ...` line and exit 1."""


def keep_freed_memory():
    """Make glibc keep freed memory for reuse instead of handing it back to the OS; True if it applied.

    PyTorch's CPU tensors come from malloc. glibc serves a large block (over 32 MiB at most; one layer's
    attention scores in a training step of the paper's small model are 64 MiB) with a fresh mmap and
    unmaps it on free, so every step page-faults and zero-fills each large activation again: about a
    quarter of that CPU training step (measured). With mmap and trimming off, freed blocks stay in the
    heap and the next step reuses them; the process keeps its peak memory, as CUDA's caching allocator
    does. False, changing nothing, where the C library has no working mallopt (macOS, Windows, musl).
    """
    mallopt = getattr(ctypes.CDLL(None), 'mallopt', None) if sys.platform.startswith('linux') else None
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4                  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def git_commit():
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_tree_modified():
    """Whether the sources differ from git_commit's (tracked files changed, or new files not ignored), so that a
    run's record says when its commit alone does not tell its code; None outside a git checkout."""
    try:
        return bool(subprocess.run(['git', 'status', '--porcelain'], capture_output=True, text=True, check=True,
                                   cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return None


def claim_dir(base):
    """Create `base`, or else base-1, base-2, ...: os.mkdir fails on a name that exists, so two processes
    started in the same second never race for one directory."""
    run_dir, n = base, 1
    while True:
        try:
            os.mkdir(run_dir)
            return run_dir
        except FileExistsError:
            run_dir, n = f'{base}-{n}', n + 1


def source_files():
    """The files a run's src/ holds: the project's own modules (every module beside this one: the clone's root
    or the installed package's folder, never other distributions' files; setup.py and the package's __init__
    are no modules of it) and the router files named in $ROUTER_FILES."""
    here = os.path.dirname(os.path.abspath(__file__))
    modules = [path for path in sorted(glob.glob(os.path.join(here, '*.py')))
               if os.path.basename(path) not in ('setup.py', '__init__.py')]
    return modules + router_registry.router_files()


def make_run_dir(parent):
    """<parent>/<YYYYmmdd-HHMMSS>[-n], with a copy of the sources (as the reference does)."""
    try:
        os.makedirs(parent, exist_ok=True)
        run_dir = claim_dir(os.path.join(parent, time.strftime('%Y%m%d-%H%M%S')))
        os.mkdir(os.path.join(run_dir, 'src'))
        for src in source_files():
            shutil.copy(src, os.path.join(run_dir, 'src'))
    except OSError as err:
        raise RunError(f'cannot create a run directory in {parent} ({err.strerror}); give a --work_dir '
                       'in a writable place with free space') from err
    return run_dir


class RunLock:
    """Exclusive lock of a run directory (its file `lock`), held by the process that trains in it.

    flock is released by the kernel when the process dies, so a crashed run never leaves a stale lock.
    """

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, 'lock')
        self.file = None

    def __enter__(self):
        self.file = open(self.path, 'a+')
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or 'another process'
            self.file.close()
            raise RunError(f'{os.path.dirname(self.path)} is in use by {holder} (lock file {self.path}); '
                           'wait for that run to stop, or stop it, before resuming') from None
        self.file.truncate(0)
        self.file.write(f'process {os.getpid()} on {socket.gethostname()}\n')
        self.file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def save_atomic(obj, path):
    """torch.save to a temporary file, synced, then renamed: a crash or a full disk never leaves a
    half-written checkpoint, and the previous one stays intact. A failed write removes the temporary
    file and raises OSError (errno ENOSPC when the disk is full).

    The file object (not a path) goes to torch.save so that a failed write surfaces as the OSError
    with its errno, not as torch's generic RuntimeError.
    """
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and err.filename is None:      # name the file the message is about
            raise OSError(err.errno, err.strerror or str(err), path) from err
        raise


def describe_os_error(err):
    """One line for an OSError met while writing a run's files; a full disk is named as such."""
    where = f' writing {err.filename}' if err.filename else ''
    if err.errno == errno.ENOSPC:
        return f'no space left on device{where}; free some space (a file being replaced is left intact)'
    return f'{err.strerror or err}{where}'


def rng_state(cuda):
    """The RNG state a resumed run restores: torch's CPU generator, and every CUDA device's when `cuda`."""
    state = {'torch': torch.get_rng_state()}
    if cuda:
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, cuda):
    """Restore rng_state's states (CPU byte tensors, as torch's setters take them): the CPU generator's, and
    with `cuda` those of the CUDA devices this machine has (a run saved on more GPUs restores its first ones)."""
    torch.set_rng_state(state['torch'])
    if cuda and 'cuda' in state:
        for index, device_state in enumerate(state['cuda'][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


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

    def max(self, value):
        """The maximum over ranks of a number, or of a tensor on this rank's device (element-wise, a tensor)."""
        if self.world_size == 1:
            return value
        if isinstance(value, torch.Tensor):
            tensor = value.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            return tensor
        tensor = torch.full((1,), value, dtype=torch.float64, device=self.device)   # a fill, not a host copy
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.item()

    def mean(self, value):
        """The mean over ranks of a number, or of a tensor on this rank's device (element-wise, in one
        all-reduce, a tensor)."""
        if self.world_size == 1:
            return value
        if isinstance(value, torch.Tensor):
            tensor = value.clone()
            dist.all_reduce(tensor)
            return tensor / self.world_size
        tensor = torch.full((1,), value, dtype=torch.float64, device=self.device)   # a fill, not a host copy
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
    """SIGINT / SIGTERM set a flag that the loop checks after each step; a second Ctrl-C aborts.

    `signum` keeps the signal received, so that the run can exit with status 128 + signum after saving
    (130 for Ctrl-C, 143 for SIGTERM), as a process killed by it would, and a job wrapper can tell a
    stopped run from a finished one.
    """

    def __init__(self):
        self.requested = False
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def complete_records(path):
    """The lines of a JSON-lines file that hold whole records. A process killed while writing leaves its
    last line cut short (no newline): that one is dropped. Any other unreadable line is a RunError."""
    with open(path) as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith('\n'):
        lines.pop()
    for number, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except json.JSONDecodeError as err:
            raise RunError(f'{path} line {number} is not a JSON record ({err}); fix or delete that line, '
                           'then resume again') from None
    return lines


def quiet_tensorboard_writer_errors():
    """Keep the OSError of TensorBoard's writer thread (a full disk) from printing a traceback of its own: the
    writer raises the same error in the training thread at its next write, which the entry point turns into its
    one `error: ...` line. Installed once; any other thread's exception goes to the hook that was there."""
    previous = threading.excepthook
    if getattr(previous, 'quiets_tensorboard', False):
        return

    def hook(args):
        if issubclass(args.exc_type, OSError) and type(args.thread).__name__ == '_AsyncWriterThread':
            return
        previous(args)
    hook.quiets_tensorboard = True
    threading.excepthook = hook


class RunLog:
    """Log lines (stdout + train.log), metrics.jsonl and TensorBoard, written by the main rank only.

    A resumed run first drops what was written after its checkpoint (a hard kill leaves steps that are
    redone): metrics.jsonl records past `resume_step`, train.log past `log_offset` (its size when the
    checkpoint was written) and TensorBoard points past `resume_step`.
    """

    def __init__(self, run_dir, enabled, resume_step=None, log_offset=None):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        quiet_tensorboard_writer_errors()
        metrics_path = os.path.join(run_dir, 'metrics.jsonl')
        log_path = os.path.join(run_dir, 'train.log')
        if resume_step is not None and os.path.exists(metrics_path):   # drop records past the checkpoint
            kept = [line for line in complete_records(metrics_path) if json.loads(line)['step'] <= resume_step]
            with open(metrics_path, 'w') as f:
                f.writelines(kept)
        if log_offset is not None and os.path.exists(log_path) and os.path.getsize(log_path) > log_offset:
            os.truncate(log_path, log_offset)
        self.log_file = open(log_path, 'a')
        self.metrics = open(metrics_path, 'a')
        # purge_step P drops the old points at steps >= P: the checkpoint's own step is kept
        self.tb = SummaryWriter(run_dir, purge_step=None if resume_step is None else resume_step + 1)

    def offset(self):
        """The size of train.log so far (None off the main rank), saved with a checkpoint."""
        return self.log_file.tell() if self.enabled else None

    def __call__(self, line):
        if self.enabled:
            tqdm.write(line)                  # above the progress bar, when there is one
            sys.stdout.flush()
            self.log_file.write(line + '\n')
            self.log_file.flush()

    def record(self, step, split, tensorboard=True, **values):
        """One metrics.jsonl record; numeric values also go to TensorBoard as split/name, unless `tensorboard` is
        False (the caller then gives them tags of their own: scalars)."""
        if not self.enabled:
            return
        self.metrics.write(json.dumps(dict(step=step, split=split, **values)) + '\n')
        self.metrics.flush()
        if tensorboard:
            self.scalars(step, split, values)

    def scalars(self, step, group, values):
        """The numbers of `values` {name: value} as TensorBoard scalars group/name, one curve per tag."""
        if not self.enabled:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(f'{group}/{name}', value, step)

    def router_stats(self, step, stats, capacity=False):
        """Per MoE layer: the router entropy, the expert load (a histogram over expert ids) and, when the
        evaluation has a `capacity`, the fraction of routed slots dropped over it (a dropless run has no such chart)."""
        if not self.enabled:
            return
        for layer, s in stats.items():
            self.tb.add_scalar(f'router/entropy/layer{layer}', s.mean_entropy, step)
            if capacity:
                self.tb.add_scalar(f'router/dropped/layer{layer}', s.drop_fraction, step)
            counts = s.load.tolist()
            n_expert = len(counts)
            self.tb.add_histogram_raw(
                f'router/load/layer{layer}', min=0, max=n_expert - 1, num=sum(counts),
                sum=sum(e * c for e, c in enumerate(counts)), sum_squares=sum(e * e * c for e, c in enumerate(counts)),
                bucket_limits=[e + 0.5 for e in range(n_expert)], bucket_counts=counts, global_step=step)

    def hparams(self, hparams, metric_tags, shown=()):
        """Open this run's row of TensorBoard's HParams table (see write_hparams)."""
        if self.enabled:
            write_hparams(self.tb, hparams, metric_tags, shown)

    def end_hparams(self):
        """Mark this run's HParams row finished, once its test results are logged."""
        if self.enabled:
            end_hparams(self.tb)

    def text(self, tag, text, step=0):
        """A text for TensorBoard's Text tab (Markdown)."""
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def close(self):
        if self.enabled:
            self.tb.close()
            self.log_file.close()
            self.metrics.close()


def write_hparams(tb, hparams, metric_tags, shown=()):
    """The HParams plugin's experiment and session-start summaries, written into the run's own event directory
    (`tb`, a SummaryWriter), so that a run is one row of the HParams table: its `hparams` {name: number or text}
    as columns, and a column for each of `metric_tags`, the tags of scalars the run logs (the plugin shows each
    one's last value). TensorBoard takes the column list of one run it reads, so runs meant for one table give
    the same hparams names and metric tags. The HParams tab lists the hparams marked as differing between runs
    first, by name, and shows only the first five until the reader ticks more: `shown` are marked so."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams as hparams_summaries
    experiment, session_start, _ = hparams_summaries(hparams, dict.fromkeys(metric_tags, 0.0))
    plugin_data = experiment.value[0].metadata.plugin_data
    content = metadata.parse_experiment_plugin_data(plugin_data.content)
    for info in content.hparam_infos:
        info.differs = info.name in shown
    plugin_data.content = plugin_data_pb2.HParamsPluginData(
        experiment=content, version=metadata.PLUGIN_DATA_VERSION).SerializeToString()
    tb.file_writer.add_summary(experiment)
    tb.file_writer.add_summary(session_start)
    tb.flush()


def end_hparams(tb):
    """The session-end summary (status: success): the HParams table shows the run as finished."""
    from torch.utils.tensorboard.summary import hparams as hparams_summaries
    _, _, session_end = hparams_summaries({}, {})       # always the end of a successful session
    tb.file_writer.add_summary(session_end)
    tb.flush()


def make_progress(total, initial, enabled):
    return tqdm(total=total, initial=initial, disable=not (enabled and sys.stderr.isatty()),
                dynamic_ncols=True, unit='step')
