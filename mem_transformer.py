"""Transformer-XL (Dai et al. 2019) with mixture-of-experts feed-forward layers.

Relative "partial learnable" attention (the reference attn_type 0), segment-level memory, same_length
and clamp_len, pre/post LayerNorm, adaptive or plain tied softmax. Parameter names and shapes match
the reference PyTorch Transformer-XL (dense FFN) and fastmoe's layout (MoE FFN), so the original
checkpoints' state_dicts load with strict=True. The model initialises its own weights.
`ThorObjective` is THOR's two-pass training objective on top of the model.

Shapes: T = qlen (tokens predicted this segment), M = mlen (memory length), K = klen = M + T,
B batch, H heads, D d_head, d d_model, V vocabulary. Sequences are time-major: [T, B, d].
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from adaptive_softmax import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax
from hyper_expert import HyperExpert, HyperExpertGenerator
from model_config import ModelConfig
from moe import MOE_VARIANTS, MoEPositionwiseFF, StackedLinear


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of relative distances (the reference keeps inv_freq as a buffer)."""

    def __init__(self, d_model):
        super().__init__()
        self.register_buffer('inv_freq', 1 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model)))

    def forward(self, pos_seq):
        sinusoid = torch.outer(pos_seq, self.inv_freq)                       # [K, d/2]
        return torch.cat([sinusoid.sin(), sinusoid.cos()], -1)               # [K, d]


class PositionwiseFF(nn.Module):
    """The dense feed-forward block: Linear -> ReLU -> Dropout -> Linear -> Dropout, residual, LN."""

    def __init__(self, d_model, d_inner, dropout, pre_lnorm=False):
        super().__init__()
        self.pre_lnorm = pre_lnorm
        self.CoreNet = nn.Sequential(
            nn.Linear(d_model, d_inner), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(d_inner, d_model), nn.Dropout(dropout),
        )
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, inp):
        if self.pre_lnorm:
            return inp + self.CoreNet(self.layer_norm(inp))
        return self.layer_norm(inp + self.CoreNet(inp))


def shifted_position_scores(q, r_k):
    """Position scores BD[h, b, i, j] = q[h, b, i] . r_k[h, :, T - 1 - i + j], i.e. of distance M + i - j.

    q [H, B, T, D], r_k [H, D, K] (column t embeds distance K - 1 - t) -> [H, B, T, K], a view.
    The reference _rel_shift pads one zero column, rereads the buffer as [K + 1, T] and drops its
    first row. Here the zero column comes from padding r_k before the matmul, and the reread is a view:
    per (h, b), the [T, K + 1] product read flat from its T-th entry on, T rows of K, so no [T, K]-sized
    copy is made (unshift_position_grad is its adjoint). Entries with j > i + M (the future, always
    masked) read the next row and must be masked by the caller.
    """
    n_head, bsz, qlen, d_head = q.shape
    klen = r_k.size(-1)
    padded = q.reshape(n_head, bsz * qlen, d_head) @ F.pad(r_k, (1, 0))     # [H, B*T, K+1]
    return padded.view(n_head, bsz, qlen * (klen + 1))[..., qlen:].view(n_head, bsz, qlen, klen)


def unshift_position_grad(grad):
    """The gradient w.r.t. shifted_position_scores' padded product, from the gradient of its view.

    grad [H, B, T, K] -> [H, B*T, K+1]: per (h, b), T zeros then grad read flat (the entries the view skips).
    """
    n_head, bsz, qlen, klen = grad.shape
    flat = grad.new_empty(n_head, bsz, qlen * (klen + 1))   # torch.cat of the two takes twice the time on CPU
    flat[..., :qlen] = 0
    flat[..., qlen:] = grad.view(n_head, bsz, qlen * klen)
    return flat.view(n_head, bsz * qlen, klen + 1)


class RelativeAttentionProbs(torch.autograd.Function):
    """softmax(AC + BD + mask) over the keys, with its backward written out: the CPU training path.

    q_content, q_position [H, B, T, D] (biases and 1/sqrt(D) applied), k [H, B, K, D], r_k [H, D, K],
    mask_bias [T, K] (0, or -inf where hidden) -> prob [H, B, T, K], in the inputs' dtype.
    Autograd through the same forward spends two [H, B, T, K]-sized passes more in its backward: the
    shifted view's (a zero-filled padded buffer, then a scatter) and the mask's (the softmax already
    gives hidden entries zero gradient). Same numbers as autograd, bit for bit in fp32 (tested).
    """

    @staticmethod
    def forward(ctx, q_content, q_position, k, r_k, mask_bias):
        score = q_content @ k.transpose(-1, -2)                              # AC: [H, B, T, K]
        score += shifted_position_scores(q_position, r_k)                    # + BD
        score += mask_bias
        prob = torch.softmax(score, -1)
        ctx.save_for_backward(q_content, q_position, k, r_k, prob)
        return prob

    @staticmethod
    def backward(ctx, grad_prob):
        q_content, q_position, k, r_k, prob = ctx.saved_tensors
        n_head, bsz, qlen, d_head = q_position.shape
        grad_score = torch.ops.aten._softmax_backward_data(grad_prob, prob, -1, prob.dtype)  # [H, B, T, K]
        grad_padded = unshift_position_grad(grad_score)                      # [H, B*T, K+1]
        grad_q_position = grad_padded @ F.pad(r_k, (1, 0)).transpose(1, 2)   # [H, B*T, D]
        grad_r_k = q_position.reshape(n_head, bsz * qlen, d_head).transpose(1, 2) @ grad_padded  # [H, D, K+1]
        return (grad_score @ k, grad_q_position.view_as(q_position), grad_score.transpose(-1, -2) @ q_content,
                grad_r_k[..., 1:], None)


# SDPA's backends that compute the gradient of an additive bias (BD in training): the memory-efficient kernel
# (CUDA) and the math path where it cannot run. Flash takes no bias; the choice is not left to the dispatcher,
# which may pick a backend (cuDNN's) that does not give the bias its gradient.
BIAS_GRAD_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_backends(bias_needs_grad):
    """The context SDPA runs in: pinned to BIAS_GRAD_BACKENDS when its bias needs a gradient, else free."""
    return sdpa_kernel(BIAS_GRAD_BACKENDS) if bias_needs_grad else contextlib.nullcontext()


class RelPartialLearnableMultiHeadAttn(nn.Module):
    """Multi-head attention with relative positions and the global biases u (r_w_bias), v (r_r_bias)."""

    def __init__(self, n_head, d_model, d_head, dropout, dropatt=0.0, pre_lnorm=False):
        super().__init__()
        self.n_head, self.d_head, self.pre_lnorm = n_head, d_head, pre_lnorm
        self.scale = d_head ** -0.5
        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.drop = nn.Dropout(dropout)
        self.dropatt = nn.Dropout(dropatt)
        self.layer_norm = nn.LayerNorm(d_model)
        self.fused_in_training = None   # None: per device (see _fused); True / False force it

    def _fused(self, q, r_k):
        """Whether F.scaled_dot_product_attention computes the attention, with BD as an additive bias.

        Always without gradient. With gradient only where the kernel is faster: on CUDA the
        memory-efficient kernel (pinned, see BIAS_GRAD_BACKENDS) computes the bias gradient without
        materialising the scores; on CPU
        SDPA falls back to its math path for a bias that needs a gradient, slower than
        RelativeAttentionProbs (measured, torch 2.13), which trains on the CPU, except under autocast:
        it computes in its inputs' own dtype, so bf16 autocast (--amp) goes to SDPA.
        """
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or r_k.requires_grad)
        if not needs_grad or torch.is_autocast_enabled(q.device.type):
            return True
        if self.fused_in_training is None:
            return q.device.type == 'cuda'
        return self.fused_in_training

    def forward(self, w, r, r_w_bias, r_r_bias, attn_mask, mems=None):
        """w [T, B, d], r [K, d] position embeddings, attn_mask [T, K] bool (True = hidden)."""
        qlen, bsz = w.shape[:2]
        cat = w if mems is None or mems.numel() == 0 else torch.cat([mems, w], 0)   # [K, B, d]
        if self.pre_lnorm:
            cat = self.layer_norm(cat)
        klen = cat.size(0)
        q, k, v = self.qkv_net(cat).chunk(3, -1)                             # 3 x [K, B, H*D]
        # q, k and v laid out head-major once: each matmul with the permuted views would copy them again
        q = q[-qlen:].view(qlen, bsz, self.n_head, self.d_head).permute(2, 1, 0, 3).contiguous()  # [H, B, T, D]
        k = k.view(klen, bsz, self.n_head, self.d_head).permute(2, 1, 0, 3).contiguous()  # [H, B, K, D]
        v = v.view(klen, bsz, self.n_head, self.d_head).permute(2, 1, 0, 3).contiguous()  # [H, B, K, D]
        r_k = self.r_net(r).view(klen, self.n_head, self.d_head).permute(1, 2, 0)  # [H, D, K]

        # the 1/sqrt(D) scale goes on the queries, which are T x K times smaller than the scores
        q_content = (q + r_w_bias[:, None, None]) * self.scale               # [H, B, T, D]
        q_position = (q + r_r_bias[:, None, None]) * self.scale              # [H, B, T, D]
        # the mask as an additive bias: one add over [H, B, T, K] instead of a masked_fill and a copy
        mask_bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
            attn_mask, float('-inf'))                                        # [T, K]
        if self._fused(q, r_k):  # a fused kernel, BD entering as an additive mask
            bias = (shifted_position_scores(q_position, r_k) + mask_bias).to(q.dtype)
            with sdpa_backends(bias.requires_grad):
                attn = F.scaled_dot_product_attention(q_content, k, v, attn_mask=bias, scale=1.0,
                                                      dropout_p=self.dropatt.p if self.training else 0.0)
        else:
            prob = RelativeAttentionProbs.apply(q_content, q_position, k, r_k, mask_bias)
            attn = self.dropatt(prob) @ v                                    # [H, B, T, D]
        attn = attn.permute(2, 1, 0, 3).reshape(qlen, bsz, -1)               # [T, B, H*D]
        out = self.drop(self.o_net(attn))
        return w + out if self.pre_lnorm else self.layer_norm(w + out)


class RelPartialLearnableDecoderLayer(nn.Module):
    def __init__(self, n_head, d_model, d_head, d_inner, dropout, dropatt, pre_lnorm, moe_kwargs=None):
        super().__init__()
        self.dec_attn = RelPartialLearnableMultiHeadAttn(n_head, d_model, d_head, dropout, dropatt, pre_lnorm)
        if moe_kwargs is None:
            self.pos_ff = PositionwiseFF(d_model, d_inner, dropout, pre_lnorm)
        else:
            self.pos_ff = MoEPositionwiseFF(d_model, d_inner, dropout, pre_lnorm, **moe_kwargs)

    def forward(self, w, r, r_w_bias, r_r_bias, attn_mask, mems=None, token_ids=None):
        """token_ids [T, B]: the segment's input tokens, for routers that route by token id (Hash)."""
        out = self.dec_attn(w, r, r_w_bias, r_r_bias, attn_mask, mems)
        if isinstance(self.pos_ff, MoEPositionwiseFF):
            return self.pos_ff(out, token_ids)
        return self.pos_ff(out)


def parse_moe_index(moe_index, n_layer):
    """None -> every layer; '0,1,3' or [0, 1, 3] -> that list, checked to lie in [0, n_layer)."""
    if moe_index is None:
        return list(range(n_layer))
    if isinstance(moe_index, str):
        moe_index = [int(i) for i in moe_index.split(',') if i.strip()]
    bad = [i for i in moe_index if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f'moe_index {bad} outside the layers 0..{n_layer - 1} of this {n_layer}-layer model')
    return sorted(set(moe_index))


class MemTransformerLM(nn.Module):
    """Transformer-XL language model; `forward(data, target, *mems) -> [nll [T, B], *new_mems]`."""

    def __init__(self, config=None, **fields):
        """config: a ModelConfig, or its dict (model_config.py; also the flat form of older checkpoints); fields:
        the same as keywords, e.g. MemTransformerLM(**ckpt['model_config'])."""
        super().__init__()
        c = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(dict(config or {}, **fields))
        n_token, n_layer, d_model, n_head, d_head, moe = c.n_token, c.n_layer, c.d_model, c.n_head, c.d_head, c.moe
        d_embed = d_model if c.d_embed is None or c.d_embed < 0 else c.d_embed
        cutoffs = list(c.cutoffs)
        if moe and c.moe_variant not in MOE_VARIANTS:
            raise ValueError(f'unknown moe_variant {c.moe_variant!r}; choose one of {", ".join(MOE_VARIANTS)}')
        if moe and not 1 <= c.moe_top_k <= c.moe_num_expert:
            raise ValueError(f'moe_top_k must be between 1 and moe_num_expert ({c.moe_num_expert}); got {c.moe_top_k}')
        self.n_token, self.n_layer, self.d_model, self.d_embed = n_token, n_layer, d_model, d_embed
        self.n_head, self.d_head = n_head, d_head
        self.same_length, self.clamp_len = c.same_length, c.clamp_len
        self.reset_length(c.tgt_len, c.ext_len, c.mem_len)

        self.word_emb = AdaptiveEmbedding(n_token, d_embed, d_model, cutoffs, c.div_val)
        self.drop = nn.Dropout(c.dropout)
        self.pos_emb = PositionalEmbedding(d_model)
        self.r_w_bias = nn.Parameter(torch.empty(n_head, d_head))
        self.r_r_bias = nn.Parameter(torch.empty(n_head, d_head))
        self.moe_index = parse_moe_index(c.moe_index, n_layer) if moe else []
        # HyperMoE: one hypernetwork for every MoE layer, registered here only (see HyperExpert)
        self.hyper_expert_generator = HyperExpertGenerator(
            d_model, n_layer, c.hypermoe_emb_dim, c.hypermoe_hidden, c.hypermoe_layer_emb_dim, c.hypermoe_adapter_dim,
        ) if moe and c.moe_variant == 'hypermoe' else None
        moe_kwargs = dict(num_expert=c.moe_num_expert, top_k=c.moe_top_k, gate_name=c.router.name,
                          backend=c.moe_backend, engine=c.moe_engine, router_settings=c.router.settings,
                          hyper_expert_generator=self.hyper_expert_generator, n_token=n_token)
        self.layers = nn.ModuleList(
            RelPartialLearnableDecoderLayer(n_head, d_model, d_head, c.d_inner, c.dropout, c.dropatt, c.pre_lnorm,
                                            dict(moe_kwargs, layer_index=i) if i in self.moe_index else None)
            for i in range(n_layer))
        self.crit = ProjectedAdaptiveLogSoftmax(n_token, d_embed, d_model, cutoffs, c.div_val)
        self._tie(c.tie_weight, c.tie_projs, c.div_val, d_embed)
        self._init_weights(c.init, c.init_range, c.init_std, c.proj_init_std)

    def _tie(self, tie_weight, tie_projs, div_val, d_embed):
        if tie_weight:
            for i, out_layer in enumerate(self.crit.out_layers):
                out_layer.weight = self.word_emb.emb_layers[i].weight
        for i, tie_proj in enumerate(tie_projs or []):
            if tie_proj and str(i) in self.crit.out_projs:
                self.crit.out_projs[str(i)] = self.word_emb.emb_projs[0 if div_val == 1 else i]

    @torch.no_grad()
    def _init_weights(self, init, init_range, init_std, proj_init_std):
        """The reference initialisation (REFERENCE.md); HyperRouter embeddings keep their N(0, 1). HyperMoE's
        modules get it too, embeddings included, as in its published LM path (README, HyperMoE)."""
        def init_weight(w):
            if init == 'uniform':
                w.uniform_(-init_range, init_range)
            elif init == 'normal':
                w.normal_(0.0, init_std)
            else:
                raise ValueError(f"init must be 'normal' or 'uniform'; got {init!r}")

        for m in self.modules():
            if isinstance(m, (nn.Linear, StackedLinear)):
                init_weight(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, init_std)
                m.bias.zero_()
        for emb in self.word_emb.emb_layers:             # after the tied output layers, as in the reference
            init_weight(emb.weight)
        for proj in [*self.word_emb.emb_projs, *self.crit.out_projs.values()]:
            proj.normal_(0.0, proj_init_std)
        if self.crit.n_clusters:
            init_weight(self.crit.cluster_weight)
            self.crit.cluster_bias.zero_()
        init_weight(self.r_w_bias)
        init_weight(self.r_r_bias)
        for m in self.modules():
            if isinstance(m, HyperExpert):
                init_weight(m.expert_emb.weight)
            elif isinstance(m, HyperExpertGenerator):
                init_weight(m.layer_emb.weight)

    def reset_length(self, tgt_len, ext_len, mem_len):
        if self.same_length and mem_len <= 0:
            raise ValueError('same_length needs mem_len > 0: without a memory the first query sees no key '
                             '(its attention would be all-masked, NaN)')
        self.tgt_len, self.ext_len, self.mem_len = tgt_len, ext_len, mem_len

    def init_mems(self):
        if self.mem_len <= 0:
            return None
        param = next(self.parameters())
        return [param.new_empty(0) for _ in range(self.n_layer + 1)]

    def _attn_mask(self, qlen, mlen, device):
        """[T, K] bool, True where query i may not attend key j (the future; with same_length also
        keys too far in the past, so every query sees the same number of keys)."""
        klen = mlen + qlen
        ones = torch.ones(qlen, klen, dtype=torch.bool, device=device)
        mask = torch.triu(ones, diagonal=1 + mlen)
        if self.same_length:
            mask_len = klen - self.mem_len
            mask_shift_len = qlen - mask_len if mask_len > 0 else qlen
            mask = mask | torch.tril(ones, diagonal=-mask_shift_len)
        return mask

    def _update_mems(self, hids, mems, qlen, mlen):
        """Keep the last mem_len states of [old memory, this segment] per layer, without gradient.

        The ext_len newest states are context for the next segment's extended input, not memory.
        """
        if mems is None:
            return None
        end = mlen + max(0, qlen - self.ext_len)
        beg = max(0, end - self.mem_len)
        with torch.no_grad():
            return [torch.cat([m, h], 0)[beg:end].detach() for m, h in zip(mems, hids)]

    def forward_hidden(self, data, mems=None):
        """data [T, B] token ids -> (hidden [T, B, d] after the last layer and dropout, new mems)."""
        qlen = data.size(0)
        mlen = mems[0].size(0) if mems else 0
        word_emb = self.word_emb(data)                                       # [T, B, d]
        attn_mask = self._attn_mask(qlen, mlen, data.device)
        pos_seq = torch.arange(mlen + qlen - 1, -1, -1.0, device=data.device)  # distances K-1 .. 0
        if self.clamp_len > 0:
            pos_seq = pos_seq.clamp(max=self.clamp_len)
        pos_emb = self.drop(self.pos_emb(pos_seq).to(word_emb.dtype))         # [K, d]
        core_out = self.drop(word_emb)
        hids = [core_out]
        for i, layer in enumerate(self.layers):
            core_out = layer(core_out, pos_emb, self.r_w_bias, self.r_r_bias, attn_mask,
                             mems[i] if mems else None, data)
            hids.append(core_out)
        return self.drop(core_out), self._update_mems(hids, mems, qlen, mlen)

    def _predicting_hidden(self, data, target, mems):
        """(hidden [T * B, d] of the positions that predict `target` [T, B], new mems or None)."""
        hidden, new_mems = self.forward_hidden(data, mems or self.init_mems())
        pred_hid = hidden[-target.size(0):]                                   # [T, B, d]
        return pred_hid.reshape(-1, pred_hid.size(-1)), new_mems              # [T * B, d]

    def forward(self, data, target, *mems):
        pred_hid, new_mems = self._predicting_hidden(data, target, mems)
        loss = self.crit(pred_hid, target.reshape(-1)).view_as(target)       # [T, B]
        return [loss] if new_mems is None else [loss, *new_mems]

    def log_probs(self, hidden):
        """hidden [N, d] -> log p(w | context) [N, V] in fp32, over the whole vocabulary (also adaptive)."""
        crit = self.crit
        head = F.log_softmax(crit._logit(hidden, *crit._cluster_params(0), crit._proj(0)).float(), -1)
        if crit.n_clusters == 0:
            return head
        parts = [head[:, :crit.bounds[0][1]]]
        for i in range(1, len(crit.bounds)):
            # as in the criterion: tail cluster i's log-probability sits in head column -i
            tail = crit._logit(hidden, *crit._cluster_params(i), crit._proj(i)).float()
            parts.append(head[:, -i, None] + F.log_softmax(tail, -1))
        return torch.cat(parts, -1)

    def forward_log_probs(self, data, target, *mems):
        """Like forward, with the predictive distribution: (nll [T, B], log-probs [T * B, V], new mems or None)."""
        pred_hid, new_mems = self._predicting_hidden(data, target, mems)
        logp = self.log_probs(pred_hid)                                       # [T * B, V]
        nll = -logp.gather(1, target.reshape(-1, 1)).view_as(target)          # [T, B]
        return nll, logp, new_mems

    @property
    def moe_layers(self):
        return [layer.pos_ff for layer in self.layers if isinstance(layer.pos_ff, MoEPositionwiseFF)]


def symmetric_kl(logp, logq):
    """CR(p, q) = (KL(p || q) + KL(q || p)) / 2 = sum_v (p - q)(log p - log q) / 2 per token: [..., V] -> [...]."""
    return 0.5 * ((logp.exp() - logq.exp()) * (logp - logq)).sum(-1)


class ThorObjective(nn.Module):
    """THOR's training objective (Zuo et al. 2022) as one forward, so DDP sees one forward per backward.

    The batch goes through the model twice; with the random THOR gate each pass draws its own experts
    and its own dropout masks (two independent training-mode passes, as THOR's released code).
    forward(data, target, *mems) -> [nll [T, B], consistency [T, B], *new_mems]: nll is the mean of the
    two passes' NLL, consistency CR(p1, p2) between their predictive distributions. The training loss
    is nll + alpha / 2 * consistency: THOR's released objective CE1 + CE2 + alpha * CR, halved so that
    its NLL part reads like the other methods' loss. Both passes read the same memory; the first
    pass's new memory is returned (the second pass only serves the consistency term).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, data, target, *mems):
        model, flat_target = self.model, target.reshape(-1)                  # [T * B]
        n_chunks = -(-flat_target.numel() * model.crit.n_token // model.crit.chunk_elements)
        hid_1, new_mems = model._predicting_hidden(data, target, mems)       # [T * B, d]
        if n_chunks <= 1:       # pass 1's log-probabilities before pass 2, as ever: the gradients summed alike
            logp_1 = model.log_probs(hid_1)                                  # [T * B, V]
            hid_2, _ = model._predicting_hidden(data, target, mems)
            terms = thor_terms(logp_1, model.log_probs(hid_2), flat_target)
        else:
            hid_2, _ = model._predicting_hidden(data, target, mems)
            terms = chunked_thor_terms(model, hid_1, hid_2, flat_target, n_chunks)
        nll_1, nll_2, consistency = (term.view_as(target) for term in terms)
        out = [0.5 * (nll_1 + nll_2), consistency]                           # [T, B] each
        return out if new_mems is None else [*out, *new_mems]


def thor_terms(logp_1, logp_2, target):
    """THOR's per-token terms from its two passes' log-probabilities [N, V]: (nll_1, nll_2, CR(p1, p2)) [N] each."""
    pick = target.unsqueeze(1)                                               # [N, 1]
    return -logp_1.gather(1, pick).squeeze(1), -logp_2.gather(1, pick).squeeze(1), symmetric_kl(logp_1, logp_2)


def chunked_thor_terms(model, hid_1, hid_2, target, n_chunks):
    """thor_terms from the two passes' hidden states [N, d], in chunks of rows as the plain loss
    (adaptive_softmax.py): the [n, V] log-probabilities of one chunk at a time, recomputed in the backward
    (WikiText-103's whole [N, V] pairs took about 53 GiB at --batch_chunk 2)."""
    def terms(h_1, h_2, tgt):
        return thor_terms(model.log_probs(h_1), model.log_probs(h_2), tgt)   # [n] each

    chunks = zip(*(x.tensor_split(n_chunks) for x in (hid_1, hid_2, target)))
    if torch.is_grad_enabled():    # no RNG runs here: preserving its state would read the CUDA generator back
        parts = [checkpoint(terms, *chunk, use_reentrant=False, preserve_rng_state=False) for chunk in chunks]
    else:
        parts = [terms(*chunk) for chunk in chunks]
    return tuple(torch.cat(term) for term in zip(*parts))                   # [N] each
