"""Expert capacity: which routed (token, slot) pairs an expert takes when it can take at most C of a group of tokens.

A slot of index -1 in top_idx [T, k] is routed nowhere (not computed, not counted); `drop_over_capacity` turns
the slots beyond an expert's capacity into -1, every token's first choice before any second choice, then token
order; `drop_over_group_capacity` does so per group of consecutive positions of one sequence, so that the drops
do not depend on how a batch is split over GPUs or --batch_chunk chunks. No function here reads back to the host
nor copies from it.
"""
import math

import torch
import torch.nn.functional as F

from moe_engine import spare_bin

DEFAULT_GROUP_SIZE = 1024   # tokens a capacity is computed over: Mesh TensorFlow's moe.py default group_size


def expert_capacity(factor, n_tok, k, num_expert):
    """C = ceil(factor * T * k / E): the slots an expert takes from a batch of T tokens routed to k of E experts
    (Switch Transformer, Fedus et al. 2022, Sec. 2.2, with its k = 1; GShard's top-2 the same with k = 2)."""
    return math.ceil(factor * n_tok * k / num_expert)


def drop_over_capacity(top_idx, capacity, num_expert):
    """top_idx [..., T, k] -> the same with every slot beyond its expert's first `capacity` set to -1, each
    [T, k] a group of its own; capacity an int, or a tensor [...] of one per group.

    Priority: every token's first choice before any second choice, then token order; GShard's
    Algorithm 1 (Lepikhin et al. 2021: the position of a second choice in its expert's buffer starts
    after all first choices) and Switch's top-1 in token order (mesh_tensorflow's `_switch_gating`).
    Slots already -1 stay -1 and take no room. No host sync.
    """
    n_tok, k = top_idx.shape[-2:]
    if isinstance(capacity, torch.Tensor):
        capacity = capacity.unsqueeze(-1)                                   # [..., 1]
    by_priority = top_idx.transpose(-1, -2).flatten(-2)                     # [..., k * T]: choice 1 of all, then 2, ...
    one_hot = F.one_hot(spare_bin(by_priority, num_expert), num_expert + 1)   # [..., k * T, E + 1]
    position = (one_hot.cumsum(-2) * one_hot).sum(-1) - 1                   # [..., k * T], rank in the expert's queue
    kept = torch.where((position < capacity) & (by_priority >= 0), by_priority, -1)
    return kept.unflatten(-1, (k, n_tok)).transpose(-1, -2)                 # [..., T, k]


def drop_over_group_capacity(top_idx, factor, num_expert, n_seq=1, group_size=DEFAULT_GROUP_SIZE):
    """Capacity per group of tokens: top_idx [T * B, k] of B sequences, rows time-major (row t * B + b), -> the
    same with the slots past their group's capacity set to -1.

    A group is `group_size` consecutive positions of one sequence (the last of a sequence the remainder, a
    sequence shorter than group_size one group), so how the batch is split over GPUs or --batch_chunk
    chunks never changes a group, nor what it drops. A group of n tokens gives each expert
    C = expert_capacity(factor, n, k, E) slots (Mesh TensorFlow computes capacity per group of `group_size`
    tokens, moe.py `_split_into_groups`; its groups may span sequences), filled in time order.
    """
    n_rows, k = top_idx.shape
    seq_len = n_rows // n_seq
    n_groups = -(-seq_len // group_size)
    by_seq = top_idx.view(seq_len, n_seq, k).transpose(0, 1)                # [B, T, k]
    by_seq = F.pad(by_seq, (0, 0, 0, n_groups * group_size - seq_len), value=-1)   # [B, n_groups * G, k]
    groups = by_seq.reshape(n_seq * n_groups, group_size, k)                 # [B * n_groups, G, k]
    last_size = seq_len - (n_groups - 1) * group_size                       # the last group of a sequence
    full, last = (expert_capacity(factor, n, k, num_expert) for n in (group_size, last_size))
    # made on the device from two numbers: a tensor built on the host would be a synchronous copy per layer and step
    is_last = torch.arange(n_groups, device=top_idx.device) == n_groups - 1
    capacity = torch.where(is_last, last, full).repeat(n_seq)               # [B * n_groups]
    kept = drop_over_capacity(groups, capacity, num_expert)                  # [B * n_groups, G, k]
    kept = kept.reshape(n_seq, n_groups * group_size, k)[:, :seq_len]        # [B, T, k]
    return kept.transpose(0, 1).reshape(n_rows, k)                           # [T * B, k], time-major


def dropped_fraction(top_idx, kept_idx):
    """The fraction of the routed (token, slot) pairs of top_idx [T, k] that kept_idx [T, k] dropped (a tensor)."""
    routed = top_idx >= 0
    return (routed & (kept_idx < 0)).sum() / routed.sum().clamp(min=1)
