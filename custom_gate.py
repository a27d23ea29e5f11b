"""Routers (gates) of the mixture-of-experts feed-forward block.

Every gate keeps fastmoe's contract, so one gate object serves both MoE backends:

    gate(x [T, d_model], token_ids=None) -> (top_k_idx [T, k] int64, top_k_score [T, k])

by default with the scores the softmax over the k selected logits (the full softmax renormalised over
the top k). `BaseGate` owns that shared path; a subclass says how the logits [T, E] are made (`logits`)
and, where its method differs, how the k experts are chosen (`choose`: THOR's random routing) and how
their gate values are computed (`scores`: Switch's full-softmax probability). The logits and scores
are computed in fp32 (or wider) whatever the model dtype, and `forward(x, return_logits=True)` also
returns the full logits so callers can compute entropy, expert load or auxiliary losses.

What a gate may declare (class attributes and hooks, all with neutral defaults here):
- `needs_token_ids`: the MoE block then passes the input token ids [T] and `logits(x, token_ids)` gets them
  (Hash layers); otherwise `logits(x)`.
- a slot routed to no expert has index -1 in top_k_idx (its score is ignored): the engine skips it.
- `default_aux_losses`: {loss name: weight} the method trains with unless a flag says otherwise.
- `own_aux_losses`: the names of the auxiliary losses that only this gate can give (from `aux_terms()`);
  the engine computes 'balance', 'importance' and 'z' for every gate (moe.py).
- `default_capacity_factor`: (training, evaluation) expert capacity factors the method uses unless a
  flag says otherwise; None is dropless (the engine applies capacity, moe.py).
- `aux_terms()`: the gate's own auxiliary losses of its last forward, {name: scalar tensor}.
- `set_step(step)`: called by the trainer before every training step (routers with a schedule).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class BaseGate(nn.Module):
    """Top-k routing over `num_expert` experts; subclasses implement `logits(x) -> [T, E] fp32`."""

    needs_token_ids = False
    default_aux_losses = {}
    own_aux_losses = ()                      # auxiliary losses only this gate can give, from aux_terms()
    default_capacity_factor = (None, None)   # (training, evaluation) capacity factors; None: dropless

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

    def choose(self, logits):
        """(top_val, top_idx) [T, k]: the selected experts' logits and indices (here the k largest, best first)."""
        return torch.topk(logits, self.top_k, dim=-1)

    def scores(self, logits, top_val, top_idx):
        """Gate values [T, k] of the chosen experts: here the softmax over the k chosen logits."""
        return F.softmax(top_val, dim=-1)

    def aux_terms(self):
        """The gate's own auxiliary losses of its last forward, {name: scalar tensor}; none here."""
        return {}

    def set_step(self, step):
        """Told the training step (counted from 0) before each step; a fixed router ignores it."""

    def forward(self, x, token_ids=None, return_logits=False):
        if self.needs_token_ids and token_ids is None:
            raise ValueError(f'{type(self).__name__} routes by token id: call it with token_ids [T]')
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            logits = self.logits(x, token_ids) if self.needs_token_ids else self.logits(x)   # [T, E], >= fp32
            top_val, top_idx = self.choose(logits)                           # [T, k]
            top_score = self.scores(logits, top_val, top_idx)                # [T, k]
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


THOR_INFERENCE = ('random', 'average')


class RandomGate(BaseGate):
    """THOR's routing (Zuo et al. 2022): no router; each token goes to k distinct experts drawn uniformly.

    The logits are all zero (the routing distribution is uniform, entropy log E), so the selected
    experts share the scores 1/k and the gate contract holds. Training draws from the global RNG, which
    checkpoints save, so a resumed run draws the same experts. (THOR's code draws one expert per layer
    for the whole batch in training; here every token draws its own.) At inference (`inference`):
    - 'random', THOR's own (experts "randomly activated for each input during training and inference";
      its code's token-level inference): k random experts per token, drawn from a generator of the
      gate seeded with `eval_seed` each time the model changes mode, so every evaluation draws the same
      experts and the training RNG is left untouched. Each layer has its own seed, as the layers draw
      independently in training;
    - 'average': every expert with score 1/E whatever k, the expectation of the random choice over
      experts (an expert ensemble costing k = E; the gate then returns E columns).
    """

    def __init__(self, d_model, num_expert, world_size=1, top_k=1, inference='random', eval_seed=0):
        super().__init__(d_model, num_expert, world_size, top_k)
        if inference not in THOR_INFERENCE:
            raise ValueError(f'unknown THOR inference {inference!r}; choose one of {", ".join(THOR_INFERENCE)}')
        self.inference = inference
        self.eval_seed = eval_seed
        self._eval_generator = None

    def train(self, mode=True):
        self._eval_generator = None          # the next evaluation restarts its stream
        return super().train(mode)

    def _generator(self, device):
        """None (the global RNG) in training; in evaluation the gate's own stream on `device`."""
        if self.training:
            return None
        if self._eval_generator is None or self._eval_generator.device != device:
            self._eval_generator = torch.Generator(device).manual_seed(self.eval_seed)
        return self._eval_generator

    def logits(self, x):
        return x.new_zeros(x.size(0), self.tot_expert)                       # [T, E], uniform routing

    def choose(self, logits):
        n_tok, num_expert = logits.shape
        if not self.training and self.inference == 'average':
            top_idx = torch.arange(num_expert, device=logits.device).repeat(n_tok, 1)    # [T, E]
        else:
            noise = torch.rand(logits.shape, generator=self._generator(logits.device), device=logits.device)
            top_idx = noise.topk(self.top_k, dim=-1).indices                 # [T, k], k distinct uniform draws
        return logits.gather(1, top_idx), top_idx
