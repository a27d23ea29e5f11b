"""HyperMoE's HyperExpert (Zhao et al. 2024): a bottleneck adapter added to the top-k mixture, generated per token
by a hypernetwork shared by all MoE layers from the embeddings of the experts the token did NOT select.

The adapter depends only on the token's set of experts, so one is generated per distinct set in the batch (at
most C(E, k)) and shared by its tokens, instead of once per token as in the original code: the same output at a
fraction of the cost. Shapes: T tokens, d = d_model, E experts, k top-k, U distinct expert sets in a batch,
b the bottleneck, c the conditioning width.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_engine import (GROUPED_MM_MAX_GROUPS, choose_engine, compute_dtype, group_counts, group_ends, grouped_mm,
                        spare_bin)

GROUPED_MAX_SETS = 256   # HyperExpert: tokens grouped by expert set up to this many sets, else gathered


class HyperExpertGenerator(nn.Module):
    """HyperMoE's hypernetwork (Zhao et al. 2024), one module shared by every MoE layer of the model.

    Input: the condition c [U, cond_dim] of each expert set and the index of the layer asking. The
    layer's embedding (one table for all layers) is appended, Linear(cond_dim + layer_emb_dim, hidden)
    -> ReLU, then four linear heads generate each set's adapter W_down [d, b], b_down [b], W_up [b, d]
    and b_up [d]. Initialisation: the model's own (every Linear and Embedding N(0, 0.02), zero biases), as
    in HyperMoE's published LM path, whose backbone init re-initialises these modules; the adapters then
    start near zero. state_dict keys (at the model, `hyper_expert_generator.`):
    layer_emb.weight, body.0.{weight,bias}, {w_down,b_down,w_up,b_up}.{weight,bias}.
    """

    def __init__(self, d_model, n_layer, cond_dim=128, hidden=128, layer_emb_dim=10, adapter_dim=64):
        super().__init__()
        self.d_model, self.cond_dim, self.adapter_dim = d_model, cond_dim, adapter_dim
        self.layer_emb = nn.Embedding(n_layer, layer_emb_dim)
        self.body = nn.Sequential(nn.Linear(cond_dim + layer_emb_dim, hidden), nn.ReLU())
        self.w_down = nn.Linear(hidden, d_model * adapter_dim)
        self.b_down = nn.Linear(hidden, adapter_dim)
        self.w_up = nn.Linear(hidden, adapter_dim * d_model)
        self.b_up = nn.Linear(hidden, d_model)

    def forward(self, cond, layer_index):
        """cond [U, c] -> (W_down [U, d, b], b_down [U, b], W_up [U, b, d], b_up [U, d])."""
        layer = self.layer_emb.weight[layer_index].expand(cond.size(0), -1)      # [U, layer_emb_dim]
        hid = self.body(torch.cat([cond, layer.to(cond.dtype)], -1))             # [U, hidden]
        n_set, d, b = cond.size(0), self.d_model, self.adapter_dim
        return (self.w_down(hid).view(n_set, d, b), self.b_down(hid),
                self.w_up(hid).view(n_set, b, d), self.b_up(hid))


def unique_sets(top_idx):
    """The distinct expert sets of a batch: (sets [U, k], rows sorted; index of each token's set [T]). A dropped
    slot (-1) sorts first, so {3, -1} and {-1, 3} are one set: expert 3 alone."""
    return torch.unique(top_idx.sort(-1).values, dim=0, return_inverse=True)


def run_adapters(x, token_set, w_down, b_down, w_up, b_up, grouped_max_sets=GROUPED_MAX_SETS, engine='loop'):
    """HyperExpert(x_t) = ReLU(x_t W_down[s_t] + b_down[s_t]) W_up[s_t] + b_up[s_t] -> [T, d].

    The tokens are grouped by set and each adapter runs on its own tokens: two grouped GEMMs with the
    grouped engine (see choose_engine; past grouped_mm's group limit, in blocks of sets: grouped_adapters),
    else 2 matmuls per set in a loop, with no copy of the weights (E = 16, k = 2 has at most 120 sets).
    The loop is used up to `grouped_max_sets` adapters; beyond that (larger k: most sets hold a token or
    two, and a Python loop over them would be slow), every token gathers its adapter and one batched
    matmul runs them all: memory T * 2 d b, as if the adapters had been generated per token, though only
    U were generated.
    """
    n_set = w_down.size(0)
    widths = (w_down.size(1), w_down.size(2))
    grouped = choose_engine(engine, x.device, compute_dtype(x), widths)[0] == 'grouped'
    if n_set > grouped_max_sets and not grouped:
        hidden = torch.bmm(x.unsqueeze(1), w_down.index_select(0, token_set)).squeeze(1)   # [T, b]
        hidden = F.relu(hidden + b_down.index_select(0, token_set))
        out = torch.bmm(hidden.unsqueeze(1), w_up.index_select(0, token_set)).squeeze(1)   # [T, d]
        return out + b_up.index_select(0, token_set)
    sorted_set, order = torch.sort(token_set, stable=True)                                 # tokens grouped by set
    x_sorted = x.index_select(0, order)                                                    # [T, d]
    if grouped:
        y_sorted = grouped_adapters(x_sorted, sorted_set, w_down, b_down, w_up, b_up)
    else:
        counts = group_counts(sorted_set, n_set).tolist()                                 # one host read
        # unbind: the backward stacks the per-set gradients once instead of U full-size scatters
        w_down, b_down, w_up, b_up = (w.unbind(0) for w in (w_down, b_down, w_up, b_up))
        outs = []
        for u, chunk in enumerate(x_sorted.split(counts)):
            if counts[u]:
                hidden = F.relu(torch.addmm(b_down[u], chunk, w_down[u]))                  # [S_u, b]
                outs.append(torch.addmm(b_up[u], hidden, w_up[u]))                         # [S_u, d]
        y_sorted = torch.cat(outs, 0)                                                      # [T, d] by set
    return torch.empty_like(y_sorted).index_copy(0, order, y_sorted)                       # token order


def grouped_adapters(x_sorted, sorted_set, w_down, b_down, w_up, b_up):
    """run_adapters' grouped engine: x_sorted [T, d] (tokens sorted by set), sorted_set [T] -> [T, d] by set.

    One grouped GEMM per projection up to GROUPED_MM_MAX_GROUPS sets. Beyond (CUDA's grouped_mm refuses
    1024 groups; HyperMoE at k = 4 of 16 has about 1,800 sets), one call per block of sets, each over every
    row: a zero weight group before and one after the block's rows give those rows exactly 0, so the blocks'
    outputs add up to the one call's, with the offsets still on the device (no host read). Each block costs
    one adapter pass over all T tokens (k = 8: 8 blocks, a few % of the experts' FLOPs).
    """
    n_set, n_row = w_down.size(0), x_sorted.size(0)
    dtype = compute_dtype(x_sorted)
    x_sorted = x_sorted.to(dtype)
    ends = group_ends(sorted_set, n_set)                                                   # [U], on the device
    # the biases gathered in their own dtype, so that their gradients are summed in it (as the experts')
    bias_down = b_down.index_select(0, sorted_set)                                         # [T, b]
    if n_set <= GROUPED_MM_MAX_GROUPS:
        hidden = grouped_mm(x_sorted, w_down.to(dtype), ends).add_(bias_down)
        y_sorted = grouped_mm(F.relu(hidden), w_up.to(dtype), ends)
    else:
        block = GROUPED_MM_MAX_GROUPS - 2                                                  # sets per call
        y_sorted = 0
        for first in range(0, n_set, block):
            last = min(first + block, n_set)
            start = ends[first - 1:first] if first else ends.new_zeros(1)
            offs = torch.cat([start, ends[first:last], ends.new_full((1,), n_row)])       # [last - first + 2]
            down, up = (F.pad(w[first:last].to(dtype), (0, 0, 0, 0, 1, 1)) for w in (w_down, w_up))   # zero groups
            hidden = grouped_mm(x_sorted, down, offs).add_(bias_down)                      # [T, b]
            y_sorted = y_sorted + grouped_mm(F.relu(hidden), up, offs)                     # [T, d], 0 off the block
    return y_sorted.add_(b_up.index_select(0, sorted_set))


class HyperExpert(nn.Module):
    """The HyperExpert of one MoE layer (HyperMoE, Zhao et al. 2024), added to the top-k mixture.

    Per token, the embeddings of the E - k experts it did NOT select (a per-layer table [E, c]) are
    summed and passed through a per-layer MLP c -> c -> c (ReLU); the shared `HyperExpertGenerator`
    turns that condition and the layer index into a bottleneck adapter applied to the experts' input.
    The condition depends only on the token's set of experts, so by default one adapter is generated
    per distinct set in the batch (at most C(E, k)) and shared by its tokens; `per_set=False` generates
    one per token, the direct reading of the method (same output; for tests and benchmarks).
    The generator belongs to the model (one module, registered there once, so state_dict and
    parameters() hold it once); this module only refers to it. state_dict keys (at the block,
    `hyper_expert.`): expert_emb.weight [E, c], mlp.0.{weight,bias}, mlp.2.{weight,bias}.
    """

    grouped_max_sets = GROUPED_MAX_SETS      # run_adapters: group tokens by set up to this many sets

    def __init__(self, num_expert, generator, layer_index, engine='auto'):
        super().__init__()
        emb_dim = generator.cond_dim
        self.layer_index = layer_index
        self.engine = engine                 # run_adapters' engine (auto|grouped|loop), as the MoE block's
        self.expert_emb = nn.Embedding(num_expert, emb_dim)
        self.mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.ReLU(), nn.Linear(emb_dim, emb_dim))
        self._generator = (generator,)       # in a tuple, so that nn.Module does not register it here too

    @property
    def generator(self):
        return self._generator[0]

    def unselected_sum(self, sets):
        """sets [U, k] -> the sum of the embeddings of the experts outside each set [U, c]. A dropped slot (-1)
        selects nothing: its expert counts as unselected, as if the token had routed to one expert fewer."""
        num_expert = self.expert_emb.num_embeddings
        chosen = spare_bin(sets, num_expert)                                              # [U, k]
        outside = torch.ones(sets.size(0), num_expert + 1, device=sets.device)
        outside = outside.scatter(1, chosen, 0.0)[:, :num_expert].contiguous()            # [U, E], 1 = unselected
        return outside.to(self.expert_emb.weight.dtype) @ self.expert_emb.weight          # [U, c]

    def forward(self, x, top_idx, per_set=True):
        """x [T, d], top_idx [T, k] -> HyperExpert(x) [T, d]."""
        if per_set:
            sets, token_set = unique_sets(top_idx)                                        # [U, k], [T]
        else:
            sets, token_set = top_idx, torch.arange(top_idx.size(0), device=top_idx.device)
        cond = self.mlp(self.unselected_sum(sets))                                        # [U, c]
        adapters = [w.to(x.dtype) for w in self.generator(cond, self.layer_index)]
        return run_adapters(x, token_set, *adapters, self.grouped_max_sets, self.engine)
