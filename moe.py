"""The sparse mixture-of-experts feed-forward block and its dispatch backends.

E experts, each Linear(d_model, d_inner) -> ReLU -> Dropout -> Linear(d_inner, d_model), stored
stacked in fastmoe's layout (`experts.htoh4.weight` [E, d_inner, d_model], ...), so a checkpoint is
the same whichever backend computed it. The block output is y = sum_{j in top-k} score_j E_j(h),
then dropout, residual and LayerNorm exactly as the dense block of Transformer-XL.

Backends:
- `torch` (ours, default, CPU and GPU): tokens are grouped by expert and each expert runs only on
  its own tokens, so the cost grows with k, not E. With k = E it is one wide dense FFN.
- `fastmoe`: fastmoe's CUDA kernels on the same parameters and gate; used by `auto` when
  `import fmoe` works and the input is on CUDA.

Shapes: T tokens (time x batch flattened), d = d_model, h = d_inner, E experts, k top-k.
"""
import contextlib
import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

from custom_gate import FrozenNaiveGate, NaiveGate
from hyper_router import HyperRouterGate

GATES = {
    'smoe': NaiveGate,
    'NaiveGate': NaiveGate,
    'CustomNaiveGate': NaiveGate,
    'smoe_dropout': FrozenNaiveGate,
    'hyper_router': HyperRouterGate,
    'HyperRouterGate': HyperRouterGate,
}
BACKENDS = ('auto', 'torch', 'fastmoe')


def build_gate(gate_name, d_model, num_expert, top_k, hyper_size=256):
    if gate_name not in GATES:
        raise ValueError(f'unknown gate_name {gate_name!r}; choose one of {", ".join(GATES)}')
    gate_cls = GATES[gate_name]
    extra = {'hyper_size': hyper_size} if issubclass(gate_cls, HyperRouterGate) else {}
    return gate_cls(d_model, num_expert, 1, top_k, **extra)


def fastmoe_available():
    return importlib.util.find_spec('fmoe') is not None


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f'unknown moe_backend {backend!r}; choose one of {", ".join(BACKENDS)}')
    if backend == 'fastmoe' and not fastmoe_available():
        raise ValueError('moe_backend fastmoe was asked for but `import fmoe` fails: install fastmoe '
                         '(CUDA only, https://github.com/laekov/fastmoe) or use --moe_backend torch')


class StackedLinear(nn.Module):
    """E independent Linear(in_features, out_features) layers stored as one [E, out, in] tensor."""

    def __init__(self, num_expert, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_expert, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_expert, out_features))

    def extra_repr(self):
        e, out_f, in_f = self.weight.shape
        return f'num_expert={e}, in_features={in_f}, out_features={out_f}'


class Experts(nn.Module):
    """The E expert MLPs, named as fastmoe's `_Expert` (htoh4: d -> h, h4toh: h -> d)."""

    def __init__(self, num_expert, d_model, d_inner, dropout):
        super().__init__()
        self.htoh4 = StackedLinear(num_expert, d_model, d_inner)
        self.h4toh = StackedLinear(num_expert, d_inner, d_model)
        self.drop = nn.Dropout(dropout)

    def run_grouped(self, x_sorted, counts):
        """x_sorted [S, d] grouped by expert, counts[e] rows each -> [S, d], each row through its expert."""
        # unbind: the backward stacks the per-expert gradients once instead of E full-size scatters
        w1, b1 = self.htoh4.weight.unbind(0), self.htoh4.bias.unbind(0)
        w2, b2 = self.h4toh.weight.unbind(0), self.h4toh.bias.unbind(0)
        outs = []
        for e, chunk in enumerate(x_sorted.split(counts)):
            if counts[e]:
                hidden = self.drop(F.relu(F.linear(chunk, w1[e], b1[e])))   # [S_e, h]
                outs.append(F.linear(hidden, w2[e], b2[e]))                 # [S_e, d]
        return torch.cat(outs, 0)

    def run_all(self, x, weights):
        """Every expert on every token, mixed by weights [T, E]: one wide FFN of width E * h."""
        num_expert, d_inner, d_model = self.htoh4.weight.shape
        hidden = F.linear(x, self.htoh4.weight.reshape(-1, d_model), self.htoh4.bias.reshape(-1))
        hidden = self.drop(F.relu(hidden)).view(-1, num_expert, d_inner)    # [T, E, h]
        hidden = (hidden * weights.unsqueeze(-1)).reshape(-1, num_expert * d_inner)
        w2 = self.h4toh.weight.transpose(0, 1).reshape(d_model, -1)          # [d, E * h]
        return F.linear(hidden, w2) + weights @ self.h4toh.bias              # [T, d]


def torch_moe(x, top_idx, top_score, experts):
    """y [T, d] = sum_j top_score[:, j] * E_{top_idx[:, j]}(x), each token through its k experts only."""
    n_tok, k = top_idx.shape
    num_expert = experts.htoh4.weight.size(0)
    score = top_score.to(x.dtype)
    if k == num_expert:
        weights = score.new_zeros(n_tok, num_expert).scatter(1, top_idx, score)   # [T, E]
        return experts.run_all(x, weights)
    flat_expert = top_idx.reshape(-1)                                         # [T * k]
    order = torch.argsort(flat_expert, stable=True)                           # slots grouped by expert
    counts = torch.bincount(flat_expert, minlength=num_expert).tolist()
    x_sorted = x.index_select(0, order // k)                                  # [T * k, d]
    y_sorted = experts.run_grouped(x_sorted, counts)                          # [T * k, d]
    y_slots = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)       # back to [T * k] order
    # a deterministic weighted sum over each token's k slots (no atomic scatter-add on GPU)
    return torch.bmm(score.unsqueeze(1), y_slots.view(n_tok, k, -1)).squeeze(1)  # [T, d]


def fastmoe_moe(x, top_idx, top_score, experts):
    """The same computation through fastmoe's CUDA scatter / grouped GEMM / gather kernels."""
    from fmoe.layers import _fmoe_general_global_forward
    from fmoe.linear import MOELinear

    if not x.is_cuda:
        raise RuntimeError('moe_backend fastmoe needs the model on CUDA; use --moe_backend torch on CPU')

    def expert_fn(inp, fwd_expert_count):
        hidden = MOELinear.apply(inp, fwd_expert_count, experts.htoh4.weight, experts.htoh4.bias)
        hidden = experts.drop(F.relu(hidden))
        return MOELinear.apply(hidden, fwd_expert_count, experts.h4toh.weight, experts.h4toh.bias)

    num_expert = experts.htoh4.weight.size(0)
    n_tok, k = top_idx.shape
    y_slots = _fmoe_general_global_forward(x, top_idx, expert_fn, num_expert, 1)   # [T * k, d]
    return torch.bmm(top_score.to(x.dtype).unsqueeze(1), y_slots.view(n_tok, k, -1)).squeeze(1)


class RouterStats:
    """Running statistics of one router: entropy of its full softmax per token, and expert load."""

    def __init__(self, num_expert):
        self.tokens = 0
        self.entropy_sum = 0.0
        self.entropy_sq_sum = 0.0
        self.load = torch.zeros(num_expert, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits, top_idx):
        logp = F.log_softmax(logits.float(), -1)                              # [T, E]
        entropy = -(logp.exp() * logp).sum(-1).double()                        # [T]
        self.tokens += entropy.numel()
        self.entropy_sum += entropy.sum().item()
        self.entropy_sq_sum += entropy.square().sum().item()
        self.load += torch.bincount(top_idx.reshape(-1), minlength=self.load.numel()).double().cpu()

    @property
    def mean_entropy(self):
        return self.entropy_sum / max(self.tokens, 1)

    @property
    def std_entropy(self):
        var = self.entropy_sq_sum / max(self.tokens, 1) - self.mean_entropy ** 2
        return max(var, 0.0) ** 0.5

    @property
    def load_fraction(self):
        """Fraction of the routed (token, slot) pairs that went to each expert [E]."""
        return (self.load / self.load.sum().clamp(min=1)).tolist()


class MoEPositionwiseFF(nn.Module):
    """Transformer-XL feed-forward block with the FFN split into E top-k routed experts."""

    def __init__(self, d_model, d_inner, dropout, pre_lnorm=False, num_expert=16, top_k=2,
                 gate_name='smoe', hyper_size=256, backend='auto'):
        super().__init__()
        check_backend(backend)
        self.pre_lnorm = pre_lnorm
        self.backend = backend
        self.gate = build_gate(gate_name, d_model, num_expert, top_k, hyper_size)
        self.experts = Experts(num_expert, d_model, d_inner, dropout)
        self.layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.stats = None  # a RouterStats while statistics are being recorded

    def _use_fastmoe(self, x):
        return self.backend == 'fastmoe' or (self.backend == 'auto' and x.is_cuda and fastmoe_available())

    def moe(self, x):
        """x [T, d] -> [T, d]: route, then mix the outputs of each token's top-k experts."""
        top_idx, top_score, logits = self.gate(x, return_logits=True)         # [T, k], [T, k], [T, E]
        if self.stats is not None:
            self.stats.update(logits, top_idx)
        mix = fastmoe_moe if self._use_fastmoe(x) else torch_moe
        return mix(x, top_idx, top_score, self.experts)

    def forward(self, inp):
        """inp [T, B, d] -> [T, B, d]."""
        x = self.layer_norm(inp) if self.pre_lnorm else inp
        core_out = self.dropout(self.moe(x.reshape(-1, x.size(-1))).view_as(x))
        return inp + core_out if self.pre_lnorm else self.layer_norm(inp + core_out)


@contextlib.contextmanager
def record_router_stats(model):
    """Within the block, every MoE layer accumulates a RouterStats; yields {layer index: RouterStats}."""
    blocks = {i: layer.pos_ff for i, layer in enumerate(model.layers) if isinstance(layer.pos_ff, MoEPositionwiseFF)}
    stats = {i: RouterStats(block.gate.tot_expert) for i, block in blocks.items()}
    for i, block in blocks.items():
        block.stats = stats[i]
    try:
        yield stats
    finally:
        for block in blocks.values():
            block.stats = None
