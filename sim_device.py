"""A simulated CUDA device (tests, bench.py's trace, gpu_check's dry run): tensors that say they are on cuda:0,
their data elsewhere. One file of about 700 lines: the dispatch mode and the patches of torch.* it needs are one
mechanism, read together.

    with SimulatedCuda() as sim:                        # torch.cuda.* and torch.accelerator answer as one H100
        model = tiny_model().to(sim.device)             # parameters become SimTensors on "cuda:0"
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = model(data.to(sim.device), ...)      # the code's CUDA branches: grouped engine, fused attention
        loss.backward()
    sim.host_reads                                      # [(op, part, where)]: every read back to the host
    sim.host_copies                                     # [(op, part, where)]: every synchronous host -> device copy
    sim.host_syncs                                      # both: what torch.cuda.set_sync_debug_mode would flag

Why this and not FakeTensorMode or the meta device (tried first): a fake CUDA tensor cannot take part in autograd
on a CPU-only torch (its AccumulateGrad asks CUDA's device guard), and meta tensors are not 'cuda' to the code's
device checks nor to torch.autocast('cuda'). A SimTensor is a subclass whose TensorImpl sits on the CPU (so
autograd's device guard is the CPU's) and whose Python `.device` says cuda:0 (so the model takes the branches a
CUDA run takes). torch.autocast('cuda') sets CUDA's autocast state, which the code queries, and turns on the
CPU's with the same dtype, which does the casting (C++ sees CPU tensors): the CPU's op lists stand in for
CUDA's (matmuls, linear, attention in the low precision in both; a few reductions' lists differ).
Every operator goes through `SimDispatch`, which runs it on the data (`elem`: a CPU tensor, or a meta tensor
with `compute='meta'`, shapes only, for counting at full size), and counts the operators per part (attention,
moe, rest, optimizer): a proxy of CUDA kernel launches.

What it refuses or records, as a GPU would (the API other code and tests rely on; keep it stable):
- SimDeviceError when an operator mixes a simulated-CUDA tensor with a CPU tensor that is not a 0-d scalar
  (a tensor made on the wrong device; in the backward, a tensor an autograd formula made is taken as the
  device's);
- `host_reads`: every operator that synchronises with the host on CUDA (`.item()`, `.tolist()`, `.cpu()`,
  nonzero, unique, bincount, boolean indexing, ...), with the model part and the repository's line;
- `host_copies`: every synchronous host-to-device copy (`cpu_tensor.to('cuda')`, `.cuda()`, `copy_` into a
  device tensor, `torch.tensor(list, device='cuda')`), as torch's copy waits for its stream; a copy with
  `non_blocking=True` is not one;
- `torch.cuda.set_sync_debug_mode('warn' | 'error')`, as on CUDA: at a host read or synchronous copy, a
  UserWarning or a SimDeviceError 'called a synchronizing CUDA operation: <op> at <line>';
- F.grouped_mm within torch's CUDA limits (`check_grouped_mm`): fewer than 1024 groups ("Can't process more
  than 1024 groups"), int32 offsets, strides and base addresses on 16 bytes; the CPU's kernel has no group limit;
- TF32: with `torch.backends.cuda.matmul.allow_tf32` on, fp32 matmul inputs (mm, bmm, addmm, baddbmm,
  grouped_mm) are rounded to TF32's 10 mantissa bits (`round_to_tf32`), as CUDA's tensor cores read them;
  attention (the CPU's sdpa) is not rounded. The TF32 flags are restored on exit;
- CUDA's RNG: a generator of its own (`torch.cuda.manual_seed`, `get_rng_state`, `set_rng_state`), drawn from
  by every random operator on the device, leaving the CPU's state alone, so a resume that restores the CPU's
  state and forgets the device's gives other draws, as on a GPU;
- `torch.accelerator` (Adam's step asks it whether a CUDA graph is being captured) answered as one idle GPU, on
  a CPU build and on a CUDA build without a driver; everything patched is put back on exit, so a real GPU's
  answers are untouched outside the context.
What it cannot show: CUDA's kernels themselves (their speed, memory; numerics beyond TF32's input rounding and
bf16's output rounding), the sdpa dispatcher's choice (it runs the CPU's; `sdpa_backends` records the choice
CUDA would make from the enabled backends), streams, the nondeterminism of atomics.
"""
import bisect
import collections
import contextlib
import importlib
import os
import traceback
import warnings

import torch
import torch.nn.utils.clip_grad
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

REPO = os.path.dirname(os.path.abspath(__file__))
CUDA = torch.device('cuda', 0)
aten = torch.ops.aten

# operators that make the host wait for the GPU on CUDA: a value read back, or an output size that depends on data
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default, aten.bincount.default,
           aten.repeat_interleave.Tensor, aten.equal.default, aten.is_nonzero.default}
# operators that may take a CPU tensor beside CUDA ones: the copies between devices
COPIES = {aten._to_copy.default, aten.copy_.default, aten.copy.default}
# matrix products that CUDA computes from bf16 inputs with fp32 accumulation, rounding the output once; the sim
# does the same in fp32 (the CPU's bf16 kernels are slow where the CPU lacks bf16 instructions)
PRODUCTS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default, aten._grouped_mm.default}
# with compute='meta', the factories whose small outputs (at most SMALL elements) keep values, on the CPU
FACTORIES = {aten.new_zeros.default, aten.new_ones.default, aten.new_full.default, aten.zeros.default,
             aten.ones.default, aten.full.default, aten.arange.default, aten.arange.start, aten.arange.start_step}
SMALL = 64
MAX_GROUPS = 1023           # torch's CUDA grouped GEMM: TORCH_CHECK(group_count < 1024, "Can't process ...")
TF32_DROPPED_BITS = 13      # fp32 keeps 23 mantissa bits, TF32 10: a TF32 matmul rounds its inputs to 10


class SimDeviceError(RuntimeError):
    """What CUDA would refuse: a CPU tensor beside a device one, grouped_mm outside its limits, a host sync
    under torch.cuda.set_sync_debug_mode('error')."""


def round_to_tf32(x):
    """fp32 values rounded to TF32's 10 mantissa bits (to nearest, ties to even), as a TF32 matmul reads them."""
    bits = x.contiguous().view(torch.int32)
    lowest_kept = (bits >> TF32_DROPPED_BITS) & 1
    bits = (bits + ((1 << (TF32_DROPPED_BITS - 1)) - 1) + lowest_kept) & ~((1 << TF32_DROPPED_BITS) - 1)
    return bits.view(torch.float32).view(x.shape)


class SimTensor(torch.Tensor):
    """A tensor on the simulated cuda:0; its data is `elem` (sharing the storage, so views and in-place work)."""

    @staticmethod
    def __new__(cls, elem):
        tensor = torch.Tensor._make_subclass(cls, elem, elem.requires_grad)
        tensor.elem = elem
        return tensor

    @property
    def device(self):
        return CUDA

    @property
    def is_cuda(self):
        return True

    def get_device(self):
        return 0

    def __repr__(self):
        return f'SimTensor(cuda:0, {tuple(self.shape)}, {self.dtype})'

    def cpu(self, memory_format=torch.preserve_format):
        return self.to('cpu', memory_format=memory_format)

    def to(self, *args, **kwargs):
        """.to('cpu') reads the data back to the host (the C++ `to` would see a CPU TensorImpl and do nothing)."""
        device = kwargs.get('device', next((a for a in args if isinstance(a, (str, torch.device))), None))
        if device is None or torch.device(device).type != 'cpu':
            return super().to(*args, **kwargs)
        _active().host_read('to cpu')
        kwargs.pop('device', None)
        args = [a for a in args if not isinstance(a, (str, torch.device))]
        data = self.elem if self.elem.device.type == 'cpu' else torch.zeros(self.shape, dtype=self.dtype)
        return data.detach().clone().to(*args, **kwargs)

    def tolist(self):
        _active().host_read('Tensor.tolist')
        return self.elem.tolist()

    def numpy(self, *args, **kwargs):
        _active().host_read('Tensor.numpy')
        return self.elem.numpy(*args, **kwargs)

    def __array__(self, *args, **kwargs):
        _active().host_read('Tensor.__array__')
        return self.elem.__array__(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        """torch.save writes the data as a CPU tensor: a checkpoint loads without this class (and to the CPU)."""
        return self.elem.detach().cpu().__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise SimDeviceError(f'{func} on a SimTensor outside SimulatedCuda')


REAL_AUTOCAST = torch.autocast
REAL_GROUP_BY_DEVICE = torch.utils._foreach_utils._group_tensors_by_device_and_dtype


def group_by_device(tensorlistlist, with_indices=False):
    """torch's grouping of tensors by (device, dtype) for the foreach and fused kernels, which reads the TensorImpl's
    device (the CPU for a SimTensor): a group of SimTensors is put on cuda:0, as on CUDA (clip_grad_norm_ would
    otherwise move its clipping factor to the CPU)."""
    groups = REAL_GROUP_BY_DEVICE(tensorlistlist, with_indices)
    return {(CUDA if any(isinstance(t, SimTensor) for t in lists[0]) else device, dtype): value
            for (device, dtype), value in groups.items() for lists in [value[0]]}
REAL_ONE_HOT = torch.nn.functional.one_hot


def one_hot(tensor, num_classes=-1):
    """F.one_hot as CUDA computes it (zeros, then a scatter of ones; no check of the values, which would read them
    back): the C++ function sees a CPU TensorImpl in a SimTensor and would take the CPU's branch."""
    if not isinstance(tensor, SimTensor):
        return REAL_ONE_HOT(tensor, num_classes)
    if num_classes < 0:
        raise SimDeviceError('F.one_hot without num_classes reads the largest class back to the host')
    out = torch.zeros(*tensor.shape, num_classes, dtype=torch.long, device=tensor.device)
    return out.scatter_(-1, tensor.unsqueeze(-1), 1)


def _indexed(device):
    """'cuda' as cuda:0: the C++ would ask the CUDA runtime for the current device."""
    return CUDA if isinstance(device, (str, torch.device)) and _is_cuda(device) else device


REAL_TO = torch.Tensor.to


def tensor_to(self, *args, **kwargs):
    """Tensor.to('cuda') as Tensor.to('cuda:0')."""
    args = [_indexed(a) for a in args]
    if 'device' in kwargs:
        kwargs['device'] = _indexed(kwargs['device'])
    return REAL_TO(self, *args, **kwargs)


def from_host_data(make):
    """torch.tensor / torch.as_tensor with device='cuda': made on the host, then copied to the device, as torch
    does (a synchronous copy, counted); the C++ would ask the CUDA runtime for the device."""
    def made_on_host(data, *args, device=None, **kwargs):
        if not _is_cuda(device):
            return make(data, *args, device=device, **kwargs)
        if isinstance(data, SimTensor):
            return make(data, *args, **kwargs)
        return make(data, *args, **kwargs).to(CUDA)
    return made_on_host


class SimAutocast(REAL_AUTOCAST):
    """torch.autocast: for 'cuda', CUDA's state (queried by the code) and the CPU's (which casts SimTensors)."""

    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
        self.cpu = None
        if device_type == 'cuda':
            self.cpu = REAL_AUTOCAST('cpu', dtype=self.fast_dtype, enabled=enabled, cache_enabled=cache_enabled)

    def __enter__(self):
        if self.cpu is not None:
            self.cpu.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if self.cpu is not None:
            self.cpu.__exit__(*exc)


class SimGenerator(torch.Generator):
    """torch.Generator('cuda'): a CPU generator that says it is on cuda:0 (a CPU-only torch has no CUDA one)."""

    def __new__(cls, device='cpu'):
        generator = super().__new__(cls, 'cpu')
        generator._device = CUDA if _is_cuda(device) else torch.device('cpu')
        return generator

    @property
    def device(self):
        return self._device


class SimStream:
    """The current stream of the simulated device: never capturing a CUDA graph (what Adam's step asks)."""
    device = CUDA
    device_index = 0
    device_type = 'cuda'

    def is_capturing(self):
        return False

    def synchronize(self):
        pass

    def query(self):
        return True


_ACTIVE = []


def _active():
    if not _ACTIVE:
        raise SimDeviceError('a SimTensor was used outside SimulatedCuda')
    return _ACTIVE[-1]


def _is_cuda(device):
    return device is not None and torch.device(device).type == 'cuda'


def _data(x):
    return x.elem if isinstance(x, SimTensor) else x


def _widen(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x


def _to_meta(x):
    return x.to('meta') if isinstance(x, torch.Tensor) and not x.is_meta else x


def _even_group_ends(sorted_ids, groups, kwargs):
    """compute='meta': searchsorted(sorted ids [S], arange(G), right=True) as if the S ids were spread evenly over
    the G groups, with values (a CPU tensor), so that code reading its group sizes (the MoE loop engine's
    .tolist()) runs at full size."""
    n, n_group = sorted_ids.shape[-1], groups.shape[-1]
    dtype = torch.int32 if kwargs.get('out_int32') else torch.long
    return (torch.arange(1, n_group + 1) * n // n_group).to(dtype)


def _tf32_on():
    return torch.backends.cuda.matmul.allow_tf32


def _tf32_input(x):
    """A matmul's fp32 operand as TF32 reads it (offsets and scalars pass)."""
    return round_to_tf32(x) if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x


def check_grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    """torch's CUDA checks of F.grouped_mm that its CPU kernel lacks: fewer than 1024 groups, int32 offsets,
    rows and base addresses on 16 bytes (the CUTLASS kernel's TMA loads); SimDeviceError with torch's words."""
    groups = offs.size(0) if offs is not None else (mat_a if mat_a.dim() == 3 else mat_b).size(0)
    if groups > MAX_GROUPS:
        raise SimDeviceError(f"Can't process more than 1024 groups (got {groups}; torch's CUDA grouped_mm)")
    if offs is not None and offs.dtype != torch.int32:
        raise SimDeviceError(f'Offsets have to be int32 (got {offs.dtype}; CUDA grouped_mm)')
    for name, mat in (('mat_a', mat_a), ('mat_b', mat_b)):
        alignment = 16 // mat.element_size()
        rows, cols = mat.stride()[-2:]
        if cols == 1 and rows % alignment or rows == 1 and cols % alignment:
            raise SimDeviceError(f'Expected {name} stride {mat.stride()} to be a multiple of 16 bytes in its '
                                 f'leading dimension (CUDA grouped_mm)')
        if mat.storage_offset() * mat.element_size() % 16:
            raise SimDeviceError(f'Expected {name} data_ptr to be aligned to 16 bytes (CUDA grouped_mm)')


class SimDispatch(TorchDispatchMode):
    """Runs every operator on the data, with the checks and counts of SimulatedCuda (see the top)."""

    def __init__(self, sim):
        super().__init__()
        self.sim = sim

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        on_sim = any(isinstance(x, SimTensor) for x in flat)
        cpu = [x for x in flat if isinstance(x, torch.Tensor) and not isinstance(x, SimTensor) and x.dim() > 0]
        to_sim = _is_cuda(kwargs.get('device'))
        if to_sim:
            kwargs['device'] = self.sim.data_device
        if func in SYNCING and on_sim:
            self.sim.host_read(str(func))
            if self.sim.compute == 'meta':
                return self._meta_read(func, args)
        if func in COPIES:
            return self._copy(func, args, kwargs, on_sim, to_sim)
        if func is aten.searchsorted.Tensor and on_sim and self.sim.compute == 'meta':
            out = SimTensor(_even_group_ends(args[0], args[1], kwargs))
            self.sim.count(func, args, kwargs, out)
            return out
        if on_sim and cpu and torch._C._current_autograd_node() is not None:
            # an autograd formula made it from a SimTensor's options(), whose device is the TensorImpl's (the CPU;
            # torch 2.11's topk backward: zeros(grad.options()).scatter(...)): on CUDA it is on the device
            args, kwargs = tree_map(lambda x: SimTensor(x) if any(x is c for c in cpu) else x, (args, kwargs))
            cpu = []
        if on_sim and cpu:
            raise SimDeviceError(f'{func} got a CPU tensor of shape {tuple(cpu[0].shape)} beside tensors on cuda:0 '
                                 f'(made on the wrong device?); at {self.sim.where()}')
        if not (on_sim or to_sim):
            return func(*args, **kwargs)
        if func is aten._grouped_mm.default:
            check_grouped_mm(*tree_map(_data, args), **tree_map(_data, kwargs))
        if torch.Tag.nondeterministic_seeded in func.tags and self.sim.compute == 'cpu':
            out = self.sim.with_cuda_rng(lambda: self._run(func, args, kwargs))
        else:
            out = self._run(func, args, kwargs)
        self.sim.count(func, args, kwargs, out)
        return out

    def _run(self, func, args, kwargs, wrap=True):
        elems = {}

        def unwrap(x):
            if isinstance(x, SimTensor):
                elems[id(x.elem)] = x
                return x.elem
            return x

        def wrap_output(x):     # an in-place operator returns its input: give back the same SimTensor
            if not isinstance(x, torch.Tensor):
                return x
            return elems[id(x)] if id(x) in elems else SimTensor(x)
        args, kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        if self.sim.compute == 'meta' and any(x.is_meta for x in tree_flatten((args, kwargs))[0]
                                              if isinstance(x, torch.Tensor)):
            args, kwargs = tree_map(_to_meta, (args, kwargs))      # the values of _even_group_ends join the shapes
        if func in FACTORIES and self.sim.compute == 'meta':
            out = func(*args, **kwargs)
            if out.numel() <= SMALL:                                # with values, for _even_group_ends' users
                out = func(*args, **dict(kwargs, device='cpu'))
        elif func in PRODUCTS and self.sim.compute == 'cpu' and args[0].dtype == torch.bfloat16:
            out = func(*tree_map(_widen, args), **kwargs).to(torch.bfloat16)
        elif func in PRODUCTS and self.sim.compute == 'cpu' and args[0].dtype == torch.float32 and _tf32_on():
            out = func(*tree_map(_tf32_input, args), **kwargs)
        else:
            out = func(*args, **kwargs)
        return tree_map(wrap_output, out) if wrap else out

    def _copy(self, func, args, kwargs, on_sim, to_sim):
        if func is aten._to_copy.default:
            # autograd's formulas copy a gradient to its input's options(), whose device is the TensorImpl's (the
            # CPU): in the backward such a copy stays on the device
            to_cpu = (not to_sim and kwargs.get('device') is not None and torch.device(kwargs['device']).type == 'cpu'
                      and torch._C._current_autograd_node() is None)
            if on_sim and not to_cpu:
                kwargs.pop('device', None)
            if on_sim and to_cpu:                                  # .cpu(), .to('cpu'): device -> host
                self.sim.host_read('to cpu')
                if self.sim.compute == 'meta':
                    return torch.zeros(args[0].shape, dtype=kwargs.get('dtype') or args[0].dtype)
                return self._run(func, args, kwargs, wrap=False).to('cpu')
            if not (on_sim or to_sim):
                return func(*args, **kwargs)
            if to_sim and not on_sim and not kwargs.get('non_blocking', False):    # host -> device, synchronous
                self.sim.host_copy('to cuda', args[0])
            out = self._run(func, args, kwargs)
            self.sim.count(func, args, kwargs, out)
            return out
        dst, src = args[0], args[1]
        if not isinstance(dst, SimTensor) and isinstance(src, SimTensor):     # copy_ into a CPU tensor
            self.sim.host_read('copy to cpu')
            return dst if self.sim.compute == 'meta' else dst.copy_(src.elem)
        if not (on_sim or to_sim):
            return func(*args, **kwargs)
        if isinstance(dst, SimTensor) and not isinstance(src, SimTensor):     # host -> device
            if not (args[2:] and args[2]) and not kwargs.get('non_blocking', False):
                self.sim.host_copy('copy_ to cuda', src)
            src = src.to(self.sim.data_device)
        out = self._run(func, (dst, src, *args[2:]), kwargs)
        self.sim.count(func, args, kwargs, out)
        return out


    def _meta_read(self, func, args):
        """With compute='meta' there is no value to read: a 0 for a scalar read (counted); no data-dependent shape."""
        if func is aten._local_scalar_dense.default:
            return False if args[0].dtype == torch.bool else 0
        raise SimDeviceError(f"{func} has a data-dependent output shape, which compute='meta' cannot give")


class SimulatedCuda:
    """Context: torch answers as on one CUDA GPU of `capability`; see the top of the file.

    compute: 'cpu' (the data is computed; default) or 'meta' (shapes only: the counts at full size, no numbers).
    """

    def __init__(self, capability=(9, 0), compute='cpu', measure_cost=False):
        self.device = CUDA
        self.capability = capability
        self.compute = compute
        self.measure_cost = measure_cost
        self.flops = {}                 # part -> FLOPs of its operators (measure_cost)
        self.bytes = {}                 # part -> bytes its operators read and write (measure_cost)
        self.data_device = torch.device(compute)
        self.host_reads = []            # [(what, part, first line of the repository's code on the stack)]
        self.host_copies = []           # [(what, part, line)]: synchronous host-to-device copies
        self.sync_debug_mode = 0        # torch.cuda.set_sync_debug_mode: 0 default, 1 warn, 2 error
        self.cuda_rng = torch.Generator().manual_seed(0).get_state()    # the device's default generator
        self.op_counts = {}             # part -> operators run on the device
        self.op_names = collections.Counter()   # operator name -> times run on the device
        self.sdpa_backends = []         # the backend CUDA would choose for each scaled_dot_product_attention
        self._parts = ['rest']
        self._backward_parts = []       # sorted [(first autograd sequence number, part)] of the forward's parts
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------------ accounting
    def part(self):
        node = torch._C._current_autograd_node()
        if node is not None and self._backward_parts:          # in the backward: the part that made the node
            i = bisect.bisect_right(self._backward_parts, (node._sequence_nr(), '~')) - 1
            return self._backward_parts[i][1] if i >= 0 else 'rest'
        return self._parts[-1]

    def count(self, func, args=(), kwargs=None, out=None):
        """One operator run on the device; with measure_cost, its FLOPs (torch's formulas) and the bytes of its
        tensor inputs and outputs (a view moves none), as if each were read from and written to memory once."""
        part = self.part()
        self.op_counts[part] = self.op_counts.get(part, 0) + 1
        self.op_names[func.name()] += 1
        if not self.measure_cost or out is None:
            return
        args, kwargs, out = tree_map(_data, (args, kwargs or {}, out))
        if func.overloadpacket in flop_registry:
            self.flops[part] = self.flops.get(part, 0) + flop_registry[func.overloadpacket](*args, **kwargs,
                                                                                             out_val=out)
        if not func.is_view:
            tensors = [x for x in tree_flatten((args, kwargs, out))[0] if isinstance(x, torch.Tensor)]
            self.bytes[part] = self.bytes.get(part, 0) + sum(t.numel() * t.element_size() for t in tensors)

    @staticmethod
    def where():
        """The last line of the repository's code on the stack; in the backward, the autograd node running."""
        node = torch._C._current_autograd_node()
        if node is not None:
            return f'the backward of {node.name()}'
        frames = [f for f in traceback.extract_stack() if f.filename.startswith(REPO)
                  and not f.filename.endswith('sim_device.py')]
        return f'{os.path.relpath(frames[-1].filename, REPO)}:{frames[-1].lineno}' if frames else '?'

    def host_read(self, what):
        self._sync(what, self.host_reads)

    def host_copy(self, what, src):
        """A synchronous copy from the host (torch's copy_ waits for its stream unless non_blocking)."""
        self._sync(f'{what} {tuple(src.shape)}', self.host_copies)

    def _sync(self, what, records):
        """Recorded; and what torch.cuda.set_sync_debug_mode asks of a synchronizing operation."""
        where = self.where()
        records.append((what, self.part(), where))
        message = f'called a synchronizing CUDA operation: {what} at {where}'
        if self.sync_debug_mode == 2:
            raise SimDeviceError(message)
        if self.sync_debug_mode == 1:
            warnings.warn(message, stacklevel=2)

    def set_sync_debug_mode(self, mode):
        self.sync_debug_mode = {'default': 0, 'warn': 1, 'error': 2}.get(mode, mode)

    @property
    def host_syncs(self):
        """Every operation that would synchronise the host with the GPU: the reads and the synchronous copies."""
        return self.host_reads + self.host_copies

    # ------------------------------------------------------------------ CUDA's RNG
    def with_cuda_rng(self, run):
        """run() drawing from the device's generator, not the CPU's (whose state is left as it was)."""
        cpu_state = torch.get_rng_state()
        torch.set_rng_state(self.cuda_rng)
        try:
            return run()
        finally:
            self.cuda_rng = torch.get_rng_state()
            torch.set_rng_state(cpu_state)

    def cuda_manual_seed(self, seed):
        self.cuda_rng = torch.Generator().manual_seed(int(seed)).get_state()

    def set_cuda_rng_state(self, state, device='cuda'):
        self.cuda_rng = state.clone()

    def reset_counts(self):
        self.host_reads.clear()
        self.host_copies.clear()
        self.op_counts.clear()
        self.op_names.clear()
        self.sdpa_backends.clear()
        self.flops.clear()
        self.bytes.clear()

    @contextlib.contextmanager
    def in_part(self, name):
        """Operators run (and autograd nodes made) inside count for part `name`."""
        self._parts.append(name)
        self._mark_backward_part(name)
        try:
            yield
        finally:
            self._parts.pop()
            self._mark_backward_part(self._parts[-1])

    def _mark_backward_part(self, name):
        self._backward_parts.append((torch._C._autograd._get_sequence_nr(), name))

    def attribute_parts(self, model, parts):
        """parts {module class: part name}: the operators of those modules' forwards and backwards count there."""
        for module in model.modules():
            name = next((part for cls, part in parts.items() if isinstance(module, cls)), None)
            if name is not None:
                module.register_forward_pre_hook(lambda m, a, name=name: self._enter(name))
                module.register_forward_hook(lambda m, a, out: self._leave())

    def _enter(self, name):
        self._parts.append(name)
        self._mark_backward_part(name)

    def _leave(self):
        self._parts.pop()
        self._mark_backward_part(self._parts[-1])

    # ------------------------------------------------------------------ sdpa
    def _sdpa(self, original):
        """F.scaled_dot_product_attention recording the backend CUDA would choose (flash, then memory-efficient,
        then math, among the enabled ones), then computed by the CPU's."""
        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            if isinstance(query, SimTensor):
                dtype = query.dtype if not torch.is_autocast_enabled('cuda') else torch.get_autocast_dtype('cuda')
                backends = torch.backends.cuda
                if backends.flash_sdp_enabled() and attn_mask is None and dtype in (torch.float16, torch.bfloat16):
                    choice = 'flash'
                elif backends.mem_efficient_sdp_enabled() and query.size(-1) % 8 == 0:
                    choice = 'efficient'
                elif backends.math_sdp_enabled():
                    choice = 'math'
                else:
                    raise RuntimeError('No available kernel: no enabled sdpa backend runs these inputs on CUDA')
                grad = attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled()
                self.sdpa_backends.append((choice, grad))
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        return sdpa

    # ------------------------------------------------------------------ context
    def __enter__(self):
        cuda = torch.cuda
        patches = {
            (cuda, '_lazy_init'): lambda: None,
            (cuda, 'is_available'): lambda: True,
            (cuda, 'device_count'): lambda: 1,
            (cuda, 'current_device'): lambda: 0,
            (cuda, 'set_device'): lambda device: None,
            (cuda, 'synchronize'): lambda device=None: None,
            (cuda, 'get_device_capability'): lambda device=None: self.capability,
            (cuda, 'get_device_name'): lambda device=None: f'simulated CUDA device (capability {self.capability})',
            (cuda, 'is_bf16_supported'): lambda *a, **k: True,
            (cuda, 'max_memory_allocated'): lambda device=None: 0,
            (cuda, 'reset_peak_memory_stats'): lambda device=None: None,
            (cuda, 'manual_seed'): self.cuda_manual_seed,
            (cuda, 'manual_seed_all'): self.cuda_manual_seed,
            (cuda, 'seed'): lambda: self.cuda_manual_seed(torch.seed()),
            (cuda, 'get_rng_state'): lambda device='cuda': self.cuda_rng.clone(),
            (cuda, 'get_rng_state_all'): lambda: [self.cuda_rng.clone()],
            (cuda, 'set_rng_state'): self.set_cuda_rng_state,
            (cuda, 'set_rng_state_all'): lambda states: self.set_cuda_rng_state(states[0]),
            (cuda, 'set_sync_debug_mode'): self.set_sync_debug_mode,
            (cuda, 'get_sync_debug_mode'): lambda: self.sync_debug_mode,
            (cuda, 'current_stream'): lambda device=None: SimStream(),
            (cuda, 'is_current_stream_capturing'): lambda: False,
            # torch.accelerator (Adam's graph-capture health check asks it for the current stream): answered here,
            # so that neither a CPU build (no accelerator compiled in) nor a CUDA build without a driver is asked
            (torch.accelerator, 'current_accelerator'): lambda check_available=False: torch.device('cuda'),
            (torch.accelerator, 'is_available'): lambda: True,
            (torch.accelerator, 'device_count'): lambda: 1,
            (torch.accelerator, 'current_device_index'): lambda: 0,
            (torch.accelerator, 'set_device_index'): lambda device: None,
            (torch.accelerator, 'current_stream'): lambda device=None: SimStream(),
            (torch.accelerator, 'synchronize'): lambda device=None: None,
            (torch.Tensor, 'to'): tensor_to,
            (torch.Tensor, 'cuda'): lambda self, device=None, non_blocking=False, **kw: self.to(
                CUDA, non_blocking=non_blocking, **kw),
            (torch, 'tensor'): from_host_data(torch.tensor),
            (torch, 'as_tensor'): from_host_data(torch.as_tensor),
            (torch, 'Generator'): SimGenerator,
            (torch, 'autocast'): SimAutocast,
            (torch.nn.functional, 'one_hot'): one_hot,
            (torch.utils._foreach_utils, '_group_tensors_by_device_and_dtype'): group_by_device,
            (torch.nn.utils.clip_grad, '_group_tensors_by_device_and_dtype'): group_by_device,
            (importlib.import_module('torch.optim.optimizer'), '_group_tensors_by_device_and_dtype'): group_by_device,
            (torch.nn.functional, 'scaled_dot_product_attention'):
                self._sdpa(torch.nn.functional.scaled_dot_product_attention),
        }
        for (owner, name), value in patches.items():
            self._stack.enter_context(_patched(owner, name, value))
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32    # set by the code inside
        self._stack.callback(_set_tf32, *tf32)
        swap = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)   # model.to(cuda): each parameter in place
        self._stack.callback(torch.__future__.set_swap_module_params_on_conversion, swap)
        _ACTIVE.append(self)
        self._stack.callback(_ACTIVE.pop)
        self._stack.enter_context(SimDispatch(self))
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


def _set_tf32(matmul, cudnn):
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextlib.contextmanager
def _patched(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)

