"""Adaptive input embedding and projected adaptive log-softmax (Baevski & Auli 2019; Grave et al. 2017).

The vocabulary is cut into clusters at `cutoffs`; cluster i has embedding width d_embed // div_val**i
and is projected to d_proj. With no cutoffs and d_proj == d_embed both reduce to a plain tied softmax,
which is what the character-level models use. Parameter names match the reference Transformer-XL
(`emb_layers.i`, `emb_projs.i`, `out_layers.i`, `out_projs.i`, `cluster_weight`, `cluster_bias`), so
its checkpoints load unchanged.

A plain softmax over a large vocabulary (WikiText-103's 267,735 words) is computed in chunks of rows
(at most `chunk_elements` logits each, log-softmax being row-wise): at batch 22 x 512 the whole [N, V] logits would
be 3.0e9 elements, 12 GB per fp32 copy, about 36 GB at the peak of its backward. Each chunk's logits are
recomputed in the backward (torch.utils.checkpoint), so neither pass holds more than one chunk's.

Shapes: N tokens, d_proj model width, V vocabulary.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# logits per chunk of rows of the plain softmax (256 MiB in fp32); below it the loss is one piece, so a
# character-level model (V = 204) never chunks
CHUNK_ELEMENTS = 2 ** 26


def _cluster_bounds(cutoffs, n_token):
    """[(start, end)] of each vocabulary cluster: the shortlist first, then one per cutoff."""
    ends = list(cutoffs) + [n_token]
    starts = [0] + list(cutoffs)
    return list(zip(starts, ends))


def _check_cutoffs(cutoffs, n_token):
    cutoffs = list(cutoffs)
    if cutoffs and (cutoffs != sorted(set(cutoffs)) or cutoffs[0] <= 0 or cutoffs[-1] >= n_token):
        raise ValueError(f'cutoffs must be increasing and inside (0, n_token={n_token}); got {list(cutoffs)}')


class AdaptiveEmbedding(nn.Module):
    """Token embedding scaled by sqrt(d_proj); one table per vocabulary cluster when div_val > 1."""

    def __init__(self, n_token, d_embed, d_proj, cutoffs, div_val=1):
        super().__init__()
        _check_cutoffs(cutoffs, n_token)
        self.n_token, self.d_embed, self.d_proj, self.div_val = n_token, d_embed, d_proj, div_val
        self.bounds = _cluster_bounds(cutoffs, n_token)
        self.emb_scale = d_proj ** 0.5
        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterList()
        if div_val == 1:
            self.emb_layers.append(nn.Embedding(n_token, d_embed))
            if d_proj != d_embed:
                self.emb_projs.append(nn.Parameter(torch.empty(d_proj, d_embed)))
        else:
            for i, (start, end) in enumerate(self.bounds):
                d_emb_i = d_embed // (div_val ** i)
                self.emb_layers.append(nn.Embedding(end - start, d_emb_i))
                self.emb_projs.append(nn.Parameter(torch.empty(d_proj, d_emb_i)))

    def forward(self, tokens):
        if self.div_val == 1:
            embed = self.emb_layers[0](tokens)                                # [*, d_embed]
            if len(self.emb_projs):
                embed = F.linear(embed, self.emb_projs[0])                    # [*, d_proj]
        else:
            flat = tokens.reshape(-1)
            embed = self.emb_projs[0].new_zeros(flat.size(0), self.d_proj)   # [N, d_proj]
            for i, (start, end) in enumerate(self.bounds):
                rows = ((flat >= start) & (flat < end)).nonzero().squeeze(1)
                if rows.numel():
                    emb_i = self.emb_layers[i](flat.index_select(0, rows) - start)
                    embed = embed.index_copy(0, rows, F.linear(emb_i, self.emb_projs[i]))
            embed = embed.view(*tokens.shape, self.d_proj)
        return embed * self.emb_scale


class ProjectedAdaptiveLogSoftmax(nn.Module):
    """Per-token negative log-likelihood under a (projected, adaptive) softmax.

    Unlike the reference, the returned NLL is always in token order, so `loss.view(T, B)` is a real
    per-token map (the reference reorders tokens by cluster unless keep_order is set).
    """

    def __init__(self, n_token, d_embed, d_proj, cutoffs, div_val=1, chunk_elements=CHUNK_ELEMENTS):
        super().__init__()
        _check_cutoffs(cutoffs, n_token)
        self.n_token, self.d_embed, self.d_proj, self.div_val = n_token, d_embed, d_proj, div_val
        self.chunk_elements = chunk_elements     # the plain softmax's logits per chunk of rows (see the top)
        self.bounds = _cluster_bounds(cutoffs, n_token)
        self.n_clusters = len(cutoffs)
        if self.n_clusters:
            self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, d_embed))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
        # A ParameterDict keyed "0", "1", ... keeps the reference's `out_projs.i` names while
        # allowing clusters without a projection (the reference stores None there).
        self.out_layers = nn.ModuleList()
        self.out_projs = nn.ParameterDict()
        if div_val == 1:
            self.out_layers.append(nn.Linear(d_embed, n_token))
            if d_proj != d_embed:
                for i in range(len(self.bounds)):
                    self.out_projs[str(i)] = nn.Parameter(torch.empty(d_proj, d_embed))
        else:
            for i, (start, end) in enumerate(self.bounds):
                d_emb_i = d_embed // (div_val ** i)
                self.out_projs[str(i)] = nn.Parameter(torch.empty(d_proj, d_emb_i))
                self.out_layers.append(nn.Linear(d_emb_i, end - start))

    def _proj(self, i):
        return self.out_projs[str(i)] if str(i) in self.out_projs else None

    @staticmethod
    def _logit(hidden, weight, bias, proj):
        if proj is not None:
            hidden = F.linear(hidden, proj.t())                              # [N, d_emb_i]
        return F.linear(hidden, weight, bias)

    def _cluster_params(self, i):
        """Output weight and bias of cluster i; the head (i = 0) also scores the tail clusters."""
        if self.div_val == 1:
            start, end = self.bounds[i]
            weight = self.out_layers[0].weight[start:end]
            bias = self.out_layers[0].bias[start:end]
        else:
            weight, bias = self.out_layers[i].weight, self.out_layers[i].bias
        if i == 0 and self.n_clusters:
            weight = torch.cat([weight, self.cluster_weight], 0)
            bias = torch.cat([bias, self.cluster_bias], 0)
        return weight, bias

    def _plain_logit(self, hidden):
        """The plain softmax's logits of rows hidden [n, d_proj] -> [n, V], fp32 under autocast.

        Under autocast the weights are cast here, once per call (a chunk), and the bias is added in fp32:
        autocast would cast each weight once for all chunks, and the gradient of that shared low-precision copy
        would be summed over the chunks in its dtype (bias 2e-2 off at WikiText-103's 45 chunks in bf16)."""
        weight, bias, proj = self.out_layers[0].weight, self.out_layers[0].bias, self._proj(0)
        if not torch.is_autocast_enabled(hidden.device.type):
            return self._logit(hidden, weight, bias, proj)
        dtype = torch.get_autocast_dtype(hidden.device.type)
        proj = None if proj is None else proj.to(dtype)
        return self._logit(hidden, weight.to(dtype), None, proj).float() + bias.float()     # [n, V]

    def _plain_nll(self, hidden, target):
        """The plain softmax's NLL of rows hidden [n, d_proj], target [n] -> [n], through their [n, V] logits."""
        logit = self._plain_logit(hidden)
        return -F.log_softmax(logit.float(), -1).gather(1, target.unsqueeze(1)).squeeze(1)

    def _chunked_plain_nll(self, hidden, target):
        """_plain_nll in chunks of rows, each chunk's logits recomputed in the backward.

        Row by row the loss and the gradient of `hidden` are the same computation as in one piece (bit for bit
        where the BLAS runs a chunk's rows with the whole's kernel: chunks of equal size, no small remainder,
        keep them large); the weights' gradients are summed chunk by chunk (fp32 rounding of the order).
        """
        n_chunks = -(-hidden.size(0) * self.n_token // self.chunk_elements)
        if n_chunks <= 1:
            return self._plain_nll(hidden, target)
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in (hidden, *self.parameters()))
        # no RNG runs in the loss: preserving its state would read the CUDA generator back per chunk
        return torch.cat([checkpoint(self._plain_nll, h, t, use_reentrant=False, preserve_rng_state=False)
                          if grad else self._plain_nll(h, t)
                          for h, t in zip(hidden.tensor_split(n_chunks), target.tensor_split(n_chunks))])  # [N]

    def forward(self, hidden, target):
        """hidden [N, d_proj], target [N] -> nll [N]."""
        if self.n_clusters == 0:
            return self._chunked_plain_nll(hidden, target)
        head_logprob = F.log_softmax(self._logit(hidden, *self._cluster_params(0), self._proj(0)).float(), -1)
        nll = head_logprob.new_zeros(target.shape)
        for i, (start, end) in enumerate(self.bounds):
            rows = ((target >= start) & (target < end)).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            target_i = (target.index_select(0, rows) - start).unsqueeze(1)
            head_i = head_logprob.index_select(0, rows)
            if i == 0:
                logprob = head_i.gather(1, target_i).squeeze(1)
            else:
                # The reference stores tail cluster i's log-probability in head column -i.
                tail = self._logit(hidden.index_select(0, rows), *self._cluster_params(i), self._proj(i))
                logprob = head_i[:, -i] + F.log_softmax(tail.float(), -1).gather(1, target_i).squeeze(1)
            nll = nll.index_copy(0, rows, -logprob)
        return nll
