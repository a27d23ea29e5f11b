"""Routers (gates) of the mixture-of-experts feed-forward block.

Every gate keeps fastmoe's contract, so one gate object serves both MoE backends:

    gate(x [T, d_model]) -> (top_k_idx [T, k] int64, top_k_score [T, k])

with the scores the softmax over the k selected logits (the full softmax renormalised over the top k).
`BaseGate` owns that shared path; a subclass only says how the logits [T, E] are made. The logits
and the softmax are computed in fp32 (or wider) whatever the model dtype, and `forward(x, return_logits=True)`
also returns the full logits so callers can compute entropy, expert load or auxiliary losses.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class BaseGate(nn.Module):
    """Top-k routing over `num_expert` experts; subclasses implement `logits(x) -> [T, E] fp32`."""

    def __init__(self, d_model, num_expert, world_size=1, top_k=2):
        super().__init__()
        if world_size != 1:
            raise ValueError('expert parallelism (world_size > 1) is not supported; experts live on every rank')
        self.d_model = d_model
        self.num_expert = num_expert
        self.world_size = world_size
        self.tot_expert = num_expert * world_size
        self.top_k = top_k

    @property
    def top_k(self):
        return self._top_k

    @top_k.setter
    def top_k(self, k):
        if not 1 <= int(k) <= self.tot_expert:
            raise ValueError(f'top-k must be between 1 and the number of experts ({self.tot_expert}); got {k}')
        self._top_k = int(k)

    def logits(self, x):
        raise NotImplementedError

    def forward(self, x, return_logits=False):
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            logits = self.logits(x)                                          # [T, E], >= fp32
            top_val, top_idx = torch.topk(logits, self.top_k, dim=-1)        # [T, k], sorted
            top_score = F.softmax(top_val, dim=-1)                           # [T, k]
        if return_logits:
            return top_idx, top_score, logits
        return top_idx, top_score


class NaiveGate(BaseGate):
    """SMoE router (Fedus et al. 2022): a linear map d_model -> E.

    With trainable=False it is the SMoE-Dropout router (Chen et al. 2023): random at initialisation
    and frozen for the whole of training.
    """

    def __init__(self, d_model, num_expert, world_size=1, top_k=2, trainable=True):
        super().__init__(d_model, num_expert, world_size, top_k)
        self.gate = nn.Linear(d_model, self.tot_expert)
        self.gate.requires_grad_(trainable)

    def logits(self, x):
        return F.linear(x, self.gate.weight.to(x.dtype), self.gate.bias.to(x.dtype))


class FrozenNaiveGate(NaiveGate):
    """SMoE-Dropout router: NaiveGate frozen at its random initialisation."""

    def __init__(self, d_model, num_expert, world_size=1, top_k=2):
        super().__init__(d_model, num_expert, world_size, top_k, trainable=False)
