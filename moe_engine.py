"""How the MoE block computes its experts: the grouped-GEMM engine, and the choice between it and the loop.

`grouped_mm` runs E experts' matmuls as one call on stacked weights, each expert's rows of the
token-sorted input delimited by cumulative offsets that stay on the device, so the grouped engine reads
nothing back to the host (no GPU sync per layer). `choose_engine` decides, per device and compute
dtype, between that engine and moe.py's per-expert loop (the reference and the fallback).

Shapes: S rows (tokens x k, sorted by group), G groups (experts or expert sets), K in, N out features.
"""
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from torch_version import check_torch

check_torch(torch.__version__)      # one line on a torch older than the APIs below, not a traceback

ENGINES = ('auto', 'grouped', 'loop')
GROUPED_MM_MAX_GROUPS = 1023   # CUDA's grouped_mm refuses more ("Can't process more than 1024 groups")
# compute capability majors where torch's CUDA grouped_mm runs its grouped GEMM kernel (sm90, sm100); the others
# take its per-group fallback (torch's _grouped_mm_cuda: use_fast_path for major 9 or 10 only)
FAST_GROUPED_MM_MAJORS = (9, 10)


def spare_bin(top_idx, num_expert):
    """top_idx with its dropped slots (-1) sent to a spare index E, so that a scatter, a count or a sort over
    E + 1 bins puts them past every expert, where they are cut off (no host sync)."""
    return torch.where(top_idx >= 0, top_idx, num_expert)


def compute_dtype(x):
    """The dtype the matmuls of x run in: autocast's on x's device when it is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_problem(device, dtype, widths, capability=None):
    """Why F.grouped_mm cannot run the experts here (None if it can): its kernels take fp32/bf16 on
    CPU and bf16 on CUDA of compute capability >= 8.0 (`capability`, default: the device's), with every
    row 16-byte aligned."""
    if not hasattr(F, 'grouped_mm'):
        return f'torch {torch.__version__} has no torch.nn.functional.grouped_mm'
    if device.type == 'cuda':
        if dtype != torch.bfloat16:
            return f'grouped_mm on CUDA needs bf16 (--amp), not {dtype}'
        if (capability or torch.cuda.get_device_capability(device)) < (8, 0):
            return 'grouped_mm on CUDA needs compute capability >= 8.0'
    elif device.type != 'cpu':
        return f'grouped_mm does not run on {device.type}'
    elif dtype not in (torch.float32, torch.bfloat16):
        return f'grouped_mm on CPU takes fp32 or bf16, not {dtype}'
    row_bytes = [w * dtype.itemsize for w in widths]
    if any(b % 16 for b in row_bytes):
        return f'grouped_mm needs widths whose rows are multiples of 16 bytes; got {list(widths)} in {dtype}'
    return None


def choose_engine(engine, device, dtype, widths, compiling=None, capability=None):
    """'grouped' or 'loop' for `engine` (auto|grouped|loop) on this device and compute dtype, and why.

    auto takes grouped where torch's grouped GEMM is a kernel of its own: CUDA of compute capability
    (`capability`, default: the device's) 9.x or 10.x (H100/H200, B200/GB200; FAST_GROUPED_MM_MAJORS).
    Elsewhere (8.x: A100, A40, L4; 12.x: RTX 50xx, RTX PRO 6000) torch's grouped_mm is a loop over the
    groups that copies the offsets to the host, so the loop engine, which reads its counts once per layer,
    is taken. `compiling` (default: whether torch.compile is tracing) makes auto take grouped wherever
    grouped_mm runs, on CPU, 8.x and 12.x too: the loop's host-side counts would break the
    graph at every MoE layer, while grouped_mm is one opaque op in it, whatever it does inside.
    """
    if engine not in ENGINES:
        raise ValueError(f'unknown moe_engine {engine!r}; choose one of {", ".join(ENGINES)}')
    if engine == 'loop':
        return 'loop', 'asked for'
    problem = grouped_mm_problem(device, dtype, widths, capability)
    if engine == 'grouped':
        if problem:
            raise ValueError(f'moe_engine grouped cannot run: {problem}; use --moe_engine auto or loop')
        return 'grouped', 'asked for'
    if problem:
        return 'loop', f'auto: {problem}'
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    if compiling:
        return 'grouped', 'auto: grouped_mm runs here, and torch.compile gets one graph'
    if device.type == 'cpu':
        # measured (torch 2.13): the loop's ReLU, dropout and bias work on one expert's rows at a time, which
        # stay in cache; the grouped engine's run over all T * k rows at once, about 15% slower per block
        return 'loop', 'auto: faster than grouped_mm on CPU, where there is no device to sync with'
    capability = capability or torch.cuda.get_device_capability(device)
    if capability[0] not in FAST_GROUPED_MM_MAJORS:
        return 'loop', (f'auto: grouped_mm on compute capability {capability[0]}.{capability[1]} is a per-group loop '
                        'with host copies; its grouped GEMM kernel runs on 9.x (H100) and 10.x (B200) only')
    return 'grouped', f'auto: grouped_mm runs here (compute capability {capability[0]}.{capability[1]})'


@torch.library.custom_op('hyperrouter::grouped_mm', mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """F.grouped_mm(a [S, K], b [G, K, N], offs [G]) -> [S, N]: rows offs[g-1]:offs[g] of a times b[g];
    with a 2-D b [S, N], a [K, S] -> [G, K, N], group g the product of columns and rows offs[g-1]:offs[g].

    A custom op: torch.compile treats it as one opaque call (the compiler's own shape function for
    grouped_mm accepts bf16 only), and its backward makes the incoming gradient contiguous first:
    grouped_mm's kernels refuse an expanded (stride-0) gradient, e.g. the one `.sum().backward()`
    sends ("Invalid strides/sizes"). Both gradients are grouped GEMMs again; an empty group's weight gradient
    is set to zero here (sm100's kernel leaves it non-zero, pytorch#172439).
    """
    return F.grouped_mm(a, b, offs=offs)


@grouped_mm.register_fake
def _grouped_mm_shape(a, b, offs):
    if b.dim() == 3:
        return a.new_empty(a.size(0), b.size(2))
    return a.new_empty(offs.size(0), a.size(0), b.size(1))


def _grouped_mm_save(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()                                                # [S, N]
    grad_a = grouped_mm(grad, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    grad_b = None
    if ctx.needs_input_grad[1]:
        grad_b = grouped_mm(a.t(), grad, offs)                             # [G, K, N]
        empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0           # [G], on the device
        grad_b = torch.where(empty[:, None, None], 0, grad_b)              # 0, not sm100's (pytorch#172439)
    return grad_a, grad_b, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_save)


@register_flop_formula(torch.ops.hyperrouter.grouped_mm)
def _grouped_mm_flops(a_shape, b_shape, offs_shape, out_shape=None, **kwargs):
    """For FlopCounterMode: 2 FLOPs per multiply-add, each row (column) of a meeting one group of b."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


def group_ends(sorted_group, n_group):
    """Sorted group ids [S] -> the end row of each group [G] (int32, cumulative), on the device, no sync."""
    groups = torch.arange(n_group, device=sorted_group.device, dtype=sorted_group.dtype)
    return torch.searchsorted(sorted_group, groups, right=True).to(torch.int32)


def group_counts(sorted_group, n_group):
    """Sorted group ids [S] -> the rows of each group [G], on the device (torch.bincount would read its input's
    maximum back to the host on CUDA)."""
    return torch.diff(group_ends(sorted_group, n_group), prepend=sorted_group.new_zeros(1, dtype=torch.int32))
