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


# ---- Switch, GShard, noisy top-k

class SwitchGate(BaseGate):
    """Switch Transformer's router (Fedus et al. 2022): top-1 of a linear router W_r x, no bias.

    The gate value of a chosen expert is its probability under the softmax over all E experts, not
    renormalised over the chosen (the softmax over one chosen logit is 1 and gives the router no
    gradient). In training the router reads x * U(1 - jitter, 1 + jitter), elementwise multiplicative
    noise drawn from the global RNG (which checkpoints save, so a resumed run draws the same); the
    experts still read x. Defaults from the paper and its Mesh TensorFlow code: jitter 1e-2, the
    balance loss with weight 1e-2, capacity factor 1.25 in training and 2.0 in evaluation.
    """

    default_aux_losses = {'balance': 0.01}
    default_capacity_factor = (1.25, 2.0)

    def __init__(self, d_model, num_expert, world_size=1, top_k=1, jitter=0.01):
        super().__init__(d_model, num_expert, world_size, top_k)
        if not 0 <= jitter < 1:
            raise ValueError(f'the Switch jitter must be in [0, 1) (the router input is scaled by U(1 - jitter, '
                             f'1 + jitter)); got {jitter}')
        self.jitter = jitter
        self.gate = nn.Linear(d_model, self.tot_expert, bias=False)

    def logits(self, x):
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)   # [T, d]
        return F.linear(x, self.gate.weight.to(x.dtype))                             # [T, E]

    def scores(self, logits, top_val, top_idx):
        return F.softmax(logits, dim=-1).gather(1, top_idx)                          # [T, k]


class GShardGate(BaseGate):
    """GShard's top-2 router (Lepikhin et al. 2021, Algorithm 1): a linear router W_g x, no bias, its two
    best experts with gates g1, g2 normalised over the two (the default scores).

    Random routing, in training only: the second expert is kept with probability min(1, 2 g2), g2 the
    second gate normalised over the top two (at most 1/2), else its slot is -1 (routed nowhere; the first
    keeps its gate g1). The draw uses the global RNG. At k > 2 only the second slot is subject to it.
    Defaults: balance loss weight 1e-2 (the coefficient of the reference Mesh TensorFlow code, whose
    E^2-scaled loss is our `balance`), capacity factor 1.0 in training (the paper's C = 2N/E for two
    experts per token) and 2.0 in evaluation.
    """

    default_aux_losses = {'balance': 0.01}
    default_capacity_factor = (1.0, 2.0)

    def __init__(self, d_model, num_expert, world_size=1, top_k=2):
        super().__init__(d_model, num_expert, world_size, top_k)
        self.gate = nn.Linear(d_model, self.tot_expert, bias=False)

    def logits(self, x):
        return F.linear(x, self.gate.weight.to(x.dtype))                             # [T, E]

    def choose(self, logits):
        top_val, top_idx = torch.topk(logits, self.top_k, dim=-1)                    # [T, k]
        if self.training and self.top_k >= 2:
            g2 = torch.sigmoid(top_val[:, 1] - top_val[:, 0])                        # [T], p2 / (p1 + p2)
            dropped = torch.rand_like(g2) >= 2 * g2                                  # kept with prob. 2 g2
            top_idx = top_idx.clone()
            top_idx[:, 1] = top_idx[:, 1].masked_fill(dropped, -1)
        return top_val, top_idx


def cv_squared(values):
    """Squared coefficient of variation var / mean^2 of a vector (population variance, as the paper's code;
    the epsilon keeps an all-zero vector at 0)."""
    return values.var(unbiased=False) / (values.mean().square() + 1e-10)


def prob_in_top_k(clean, noisy, noise_std, k):
    """P(x, i) [T, E] of the smooth load estimator (Shazeer et al. 2017, Appendix A): the probability that
    expert i is among the k largest of the noisy logits `noisy` [T, E] under a new draw of its own noise
    alone, Phi((clean_i - kth_excluding(noisy, k, i)) / noise_std_i). With k = E every expert is chosen: 1."""
    if k >= noisy.size(1):
        return torch.ones_like(noisy)
    top_val, top_idx = torch.topk(noisy, k + 1, dim=-1)                              # [T, k + 1]
    chosen = torch.zeros_like(noisy, dtype=torch.bool).scatter(1, top_idx[:, :k], True)     # [T, E]
    # the k-th largest without i: the (k + 1)-th if i is among the k, else the k-th
    threshold = torch.where(chosen, top_val[:, k:], top_val[:, k - 1:k])              # [T, E]
    return torch.special.ndtr((clean - threshold) / noise_std)


class NoisyTopKGate(BaseGate):
    """Noisily gated top-k (Shazeer et al. 2017, Eqs. 3-5): H(x) = x W_g + N(0, 1) * softplus(x W_noise) in
    training, x W_g in evaluation; the k largest of H, gates the softmax over those k (the default scores).

    W_g and W_noise [d, E] start at zero, as the paper (Appendix A: no signal and some noise) and its
    code; they are plain parameters, so the model's N(0, 0.02) initialisation of Linear layers leaves them
    so. The noise scale is softplus(x W_noise) + 1e-2: the epsilon is the paper's code's (tensor2tensor's
    noise_epsilon), keeping the load estimator's division away from zero. `logits` returns H, so the
    routing statistics see what routed.

    Own auxiliary loss `load`, computed in each training forward: cv^2 of Load_i = sum over the batch of
    P(x, i) (`prob_in_top_k`), the paper's smooth load estimator, differentiable in W_g and W_noise.
    Defaults: w_importance = w_load = 0.1, the paper's.
    """

    own_aux_losses = ('load',)
    default_aux_losses = {'importance': 0.1, 'load': 0.1}
    noise_epsilon = 1e-2

    def __init__(self, d_model, num_expert, world_size=1, top_k=2):
        super().__init__(d_model, num_expert, world_size, top_k)
        self.w_gate = nn.Parameter(torch.zeros(d_model, self.tot_expert))
        self.w_noise = nn.Parameter(torch.zeros(d_model, self.tot_expert))
        self._aux = {}

    def noise_std(self, x):
        """The per-token, per-expert noise scale [T, E] of the training logits."""
        return F.softplus(x @ self.w_noise.to(x.dtype)) + self.noise_epsilon

    def logits(self, x):
        clean = x @ self.w_gate.to(x.dtype)                                          # [T, E]
        if not self.training:
            self._aux = {}
            return clean
        noise_std = self.noise_std(x)                                                # [T, E]
        noisy = clean + torch.randn_like(clean) * noise_std                          # [T, E], H(x)
        self._aux = {'load': cv_squared(prob_in_top_k(clean, noisy, noise_std, self.top_k).sum(0))}
        return noisy

    def aux_terms(self):
        return dict(self._aux)
