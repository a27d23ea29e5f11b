"""Routers (gates) of the mixture-of-experts feed-forward block.

Every gate keeps fastmoe's contract, so one gate object serves both MoE backends:

    gate(x [T, d_model], token_ids=None) -> (top_k_idx [T, k] int64, top_k_score [T, k])

by default with the scores the softmax over the k selected logits (the full softmax renormalised over
the top k). `BaseGate` owns that shared path; a subclass says how the logits [T, E] are made (`logits`)
and, where its method differs, how the k experts are chosen (`choose`: THOR's random routing) and how
their gate values are computed (`scores`: Switch's full-softmax probability). The logits and scores
are computed in fp32 (or wider; TF32 off) whatever the model dtype, and `forward(x, return_logits=True)` also
returns the full logits so callers can compute entropy, expert load or auxiliary losses.

What a gate may declare (class attributes and hooks, all with neutral defaults here):
- `needs_token_ids`: the MoE block then passes the input token ids [T] and `logits(x, token_ids)` gets them
  (Hash layers); otherwise `logits(x)`.
- a slot routed to no expert has index -1 in top_k_idx (its score is ignored): the engine skips it. A gate may
  return more than k columns where its method routes to more experts (DTS-Gate's dense phase: E, the
  unselected -1).
- `default_aux_losses`: {loss name: weight} the method trains with unless a flag says otherwise.
- `own_aux_losses`: the names of the auxiliary losses that only this gate can give (from `aux_terms()`);
  the engine computes 'balance', 'importance' and 'z' for every gate (moe.py).
- `default_capacity_factor`: (training, evaluation) expert capacity factors the method uses unless a
  flag says otherwise; None is dropless (the engine applies capacity, moe.py).
- `aux_terms()`: the gate's own auxiliary losses of its last forward, {name: scalar tensor}.
- `balance_logits(logits)`: the logits the engine's balance loss reads (here the routing logits; X-MoE's are
  at a fixed temperature).
- `set_step(step)`: called by the trainer before every training step (routers with a schedule).

Each class registers itself (router_registry.py) with its name, paper, reference code and settings, declared
beside it. This file is over 500 lines for that reason: nine routers, each with its registration, are one idea
(the built-in routers); a new router goes in a file of its own (docs/adding_a_router.md).
"""
import contextlib
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from router_registry import register_router, setting

HYPER_ROUTER_CODE = '[giangdip2410/HyperRouter](https://github.com/giangdip2410/HyperRouter)'
FASTMOE = '[laekov/fastmoe](https://github.com/laekov/fastmoe)'
MESH = '[tensorflow/mesh](https://github.com/tensorflow/mesh)'


@contextlib.contextmanager
def full_fp32_matmuls(device):
    """fp32 matmuls on CUDA inside, TF32 off whatever the run's setting (restored after): routing by TF32 logits
    (10 mantissa bits) flips near-tie choices. torch.compile keeps the switch in its graph; the CPU has no TF32."""
    matmul = torch.backends.cuda.matmul
    if device.type != 'cuda' or not matmul.allow_tf32:
        yield
        return
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = True


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
        return F.softmax(top_val, dim=-1)                                    # [T, k], renormalised over the k

    def aux_terms(self):
        """The gate's own auxiliary losses of its last forward, {name: scalar tensor}; none here."""
        return {}

    def set_step(self, step):
        """Told the training step (counted from 0) before each step; a fixed router ignores it."""

    def balance_logits(self, logits):
        """The logits [T, E] of the last forward that the balance loss reads: the routing logits here."""
        return logits

    def forward(self, x, token_ids=None, return_logits=False):
        if self.needs_token_ids and token_ids is None:
            raise ValueError(f'{type(self).__name__} routes by token id: call it with token_ids [T]')
        with torch.autocast(device_type=x.device.type, enabled=False), full_fp32_matmuls(x.device):
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            logits = self.logits(x, token_ids) if self.needs_token_ids else self.logits(x)   # [T, E], >= fp32
            top_val, top_idx = self.choose(logits)                           # [T, k]
            top_score = self.scores(logits, top_val, top_idx)                # [T, k]
        if return_logits:
            return top_idx, top_score, logits
        return top_idx, top_score


@register_router('smoe', 'SMoE', '[Fedus et al. 2022](https://arxiv.org/abs/2101.03961)', HYPER_ROUTER_CODE,
                 aliases=('NaiveGate', 'CustomNaiveGate'))
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


@register_router('smoe_dropout', 'SMoE-Dropout', '[Chen et al. 2023](https://arxiv.org/abs/2303.01610)',
                 '[VITA-Group/Random-MoE-as-Dropout](https://github.com/VITA-Group/Random-MoE-as-Dropout)',
                 dynamic_k=True)
class FrozenNaiveGate(NaiveGate):
    """SMoE-Dropout router: NaiveGate frozen at its random initialisation."""

    def __init__(self, d_model, num_expert, world_size=1, top_k=2):
        super().__init__(d_model, num_expert, world_size, top_k, trainable=False)


THOR_INFERENCE = ('random', 'average')


class SeededEvalDraws(nn.Module):
    """Random routing that also draws at evaluation, reproducibly: in training from the global RNG (which
    checkpoints save, so a resumed run draws the same), in evaluation from the gate's own generator, seeded
    with `eval_seed` each time the model changes mode, so every evaluation draws the same numbers and leaves
    the training RNG untouched. Each layer has its own seed (its index), as the layers draw independently."""

    eval_seed = 0
    _eval_generator = None

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


@dataclasses.dataclass(frozen=True)
class ThorSettings:
    inference: str = setting('random', 'random: k random experts per token at inference too (THOR\'s token-level '
                             'inference); average: every expert with weight 1/E, whatever k (the expectation of the '
                             'random choice; costs k = E)', choices=THOR_INFERENCE)


@register_router('thor', 'THOR', '[Zuo et al. 2022](https://arxiv.org/abs/2110.04260)',
                 '[microsoft/Stochastic-Mixture-of-Experts]'
                 '(https://github.com/microsoft/Stochastic-Mixture-of-Experts)',
                 settings=ThorSettings, aliases=('RandomGate',), context={'eval_seed': 'layer_index'})
class RandomGate(SeededEvalDraws, BaseGate):
    """THOR's routing (Zuo et al. 2022): no router; each token goes to k distinct experts drawn uniformly.

    The logits are all zero (the routing distribution is uniform, entropy log E), so the selected
    experts share the scores 1/k and the gate contract holds. Training draws from the global RNG, which
    checkpoints save, so a resumed run draws the same experts. (THOR's code draws one expert per layer
    for the whole batch in training; here every token draws its own.) At inference (`inference`):
    - 'random', THOR's own (experts "randomly activated for each input during training and inference";
      its code's token-level inference): k random experts per token, drawn reproducibly (`SeededEvalDraws`,
      seeded with `eval_seed`);
    - 'average': every expert with score 1/E whatever k, the expectation of the random choice over
      experts (an expert ensemble costing k = E; the gate then returns E columns).
    """

    def __init__(self, d_model, num_expert, world_size=1, top_k=1, inference='random', eval_seed=0):
        super().__init__(d_model, num_expert, world_size, top_k)
        if inference not in THOR_INFERENCE:
            raise ValueError(f'unknown THOR inference {inference!r}; choose one of {", ".join(THOR_INFERENCE)}')
        self.inference = inference
        self.eval_seed = eval_seed

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

@dataclasses.dataclass(frozen=True)
class SwitchSettings:
    jitter: float = setting(0.01, 'in training the router reads x * U(1 - eps, 1 + eps), eps this value (the paper\'s '
                            '1e-2; 0: off)', valid=('in [0, 1) (the router input is scaled by U(1 - eps, 1 + eps))',
                                                    lambda v: 0 <= v < 1))


@register_router('switch', 'Switch', '[Fedus et al. 2022](https://arxiv.org/abs/2101.03961)', f'{MESH}; {FASTMOE}',
                 settings=SwitchSettings)
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


GSHARD_EVAL_POLICIES = ('random', 'all')


@dataclasses.dataclass(frozen=True)
class GShardSettings:
    eval_policy: str = setting('random', 'random: the second expert is kept with probability 2 g2 in evaluation too '
                               '(Algorithm 1; Mesh TensorFlow\'s second_policy_eval="random"), drawn from a fixed '
                               'per-layer seed so every evaluation draws the same; all: always kept in evaluation '
                               '(deterministic)', choices=GSHARD_EVAL_POLICIES)


@register_router('gshard', 'GShard', '[Lepikhin et al. 2021](https://arxiv.org/abs/2006.16668)', f'{MESH}; {FASTMOE}',
                 settings=GShardSettings, context={'eval_seed': 'layer_index'})
class GShardGate(SeededEvalDraws, BaseGate):
    """GShard's top-2 router (Lepikhin et al. 2021, Algorithm 1): a linear router W_g x, no bias, its two
    best experts with gates g1, g2 normalised over the two (the default scores).

    Random routing: the second expert is kept with probability min(1, 2 g2), g2 the second gate normalised
    over the top two (at most 1/2), else its slot is -1 (routed nowhere; the first keeps its gate g1). In
    training the draw uses the global RNG. Evaluation applies it too by default (`eval_policy` 'random'), as
    Algorithm 1, which has no training condition, and the reference code (mesh_tensorflow moe.py
    `second_policy_eval="random"`, fastmoe gshard_gate.py) do, drawing reproducibly (`SeededEvalDraws`, seeded
    with `eval_seed`); 'all' keeps every second expert in evaluation (deterministic). At k > 2 only the second
    slot is subject to it. Defaults: balance loss weight 1e-2 (the coefficient of the reference Mesh TensorFlow
    code, whose E^2-scaled loss is our `balance`), capacity factor 1.0 in training (the paper's C = 2N/E for
    two experts per token) and 2.0 in evaluation.
    """

    default_aux_losses = {'balance': 0.01}
    default_capacity_factor = (1.0, 2.0)

    def __init__(self, d_model, num_expert, world_size=1, top_k=2, eval_policy='random', eval_seed=0):
        super().__init__(d_model, num_expert, world_size, top_k)
        if eval_policy not in GSHARD_EVAL_POLICIES:
            raise ValueError(f'unknown GShard evaluation policy {eval_policy!r}; choose one of '
                             f'{", ".join(GSHARD_EVAL_POLICIES)}')
        self.eval_policy = eval_policy
        self.eval_seed = eval_seed
        self.gate = nn.Linear(d_model, self.tot_expert, bias=False)

    def logits(self, x):
        return F.linear(x, self.gate.weight.to(x.dtype))                             # [T, E]

    def choose(self, logits):
        top_val, top_idx = torch.topk(logits, self.top_k, dim=-1)                    # [T, k]
        if self.top_k >= 2 and (self.training or self.eval_policy == 'random'):
            g2 = torch.sigmoid(top_val[:, 1] - top_val[:, 0])                        # [T], p2 / (p1 + p2)
            uniform = torch.rand(g2.shape, generator=self._generator(g2.device), device=g2.device, dtype=g2.dtype)
            dropped = uniform >= 2 * g2                                              # kept with prob. 2 g2
            top_idx = top_idx.clone()
            top_idx[:, 1] = top_idx[:, 1].masked_fill(dropped, -1)
        return top_val, top_idx


def cv_squared(values):
    """The squared coefficient of variation var / mean^2 of a vector [E] (population variance, as
    tensor2tensor's `cv_squared` of Shazeer et al.'s reference code; the epsilon keeps an all-zero vector
    at 0). Shazeer et al.'s importance and load losses, and the engine's `importance` (moe.py)."""
    values = values.to(torch.promote_types(values.dtype, torch.float32))     # counts are integers
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


@register_router('noisy_topk', 'Noisy top-k', '[Shazeer et al. 2017](https://arxiv.org/abs/1701.06538)',
                 f'[tensorflow/tensor2tensor](https://github.com/tensorflow/tensor2tensor); {FASTMOE}')
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
# ---- Hash layers, X-MoE, DTS-Gate

def balanced_hash_order(n_token, num_expert, seed, layer_index=0):
    """[V, E] int16: row v is a fixed random ordering of the E experts for token id v, its first column a
    balanced random hash (a random permutation of the vocabulary dealt round-robin to the experts, so every
    expert gets floor or ceil(V / E) ids). Drawn on the CPU from `seed` and the layer, so layers hash apart."""
    if num_expert > torch.iinfo(torch.int16).max:
        raise ValueError(f'hash routing stores expert ids as int16: at most {torch.iinfo(torch.int16).max} experts')
    gen = torch.Generator().manual_seed(seed * 1000 + layer_index)
    first = torch.empty(n_token, dtype=torch.long)
    first[torch.randperm(n_token, generator=gen)] = torch.arange(n_token) % num_expert    # [V], balanced
    rank_noise = torch.rand(n_token, num_expert, generator=gen)                           # [V, E]
    rank_noise.scatter_(1, first.unsqueeze(1), 2.0)                                       # the hash ranks first
    return rank_noise.argsort(dim=1, descending=True).to(torch.int16)                     # [V, E]


@dataclasses.dataclass(frozen=True)
class HashSettings:
    seed: int = setting(0, 'seed of the balanced random hash of the vocabulary (drawn once at model construction and '
                        'saved in the checkpoint, so evaluation and resume use the saved table)')


@register_router('hash', 'Hash', '[Roller et al. 2021](https://arxiv.org/abs/2106.04426)',
                 '[facebookresearch/ParlAI](https://github.com/facebookresearch/ParlAI)', settings=HashSettings,
                 context={'n_token': 'n_token', 'layer_index': 'layer_index'})
class HashGate(BaseGate):
    """Hash layers (Roller et al. 2021): no router; token id v always goes to expert hash(v), with gate value 1.

    The hash is a balanced random assignment of the vocabulary (every expert gets floor / ceil(V / E) ids),
    drawn at construction from `seed` and the layer index, and kept as a persistent buffer `expert_order`
    [V, E], so a checkpoint carries its table whatever seed a later command gives. Roller et al. define
    k = 1 only; for k > 1 (evaluation at k = 1..E) each token id has a fixed random ordering of all E experts
    whose first entry is its hash, and goes to the first k with gate values 1/k each.
    The logits are 0 at the chosen experts and the most negative float elsewhere (exact zeros after a
    softmax, with no NaN from 0 * log 0), so the routing distribution is uniform over the chosen k: entropy
    log k, load the count of the hash table.
    """

    needs_token_ids = True

    def __init__(self, d_model, num_expert, world_size=1, top_k=1, n_token=None, seed=0, layer_index=0):
        super().__init__(d_model, num_expert, world_size, top_k)
        if n_token is None or n_token < 1:
            raise ValueError('hash routing needs the vocabulary size: build the gate with n_token')
        self.register_buffer('expert_order', balanced_hash_order(n_token, self.tot_expert, seed, layer_index))

    def logits(self, x, token_ids):
        chosen = self.expert_order.index_select(0, token_ids)[:, :self.top_k].long()        # [T, k]
        logits = x.new_full((x.size(0), self.tot_expert), torch.finfo(x.dtype).min)        # [T, E]
        return logits.scatter(1, chosen, 0.0)


XMOE_BALANCE_TEMPERATURE = 0.07


@dataclasses.dataclass(frozen=True)
class XMoESettings:
    dim: int = setting(16, 'dimension of the routing space (the paper\'s 16)', valid=('at least 1', lambda v: v >= 1))
    temperature: float = setting(0.07, 'initial value of the learnable temperature',
                                 valid=('positive', lambda v: v > 0))


@register_router('xmoe', 'X-MoE', '[Chi et al. 2022](https://arxiv.org/abs/2204.09179)',
                 '[microsoft/torchscale](https://github.com/microsoft/torchscale)', settings=XMoESettings)
class XMoEGate(BaseGate):
    """X-MoE router (Chi et al. 2022): s_i = cos(W h, e_i) / tau, routing in a low-dimensional hypersphere.

    W [r, d] (no bias) projects the token to r = `dim` dimensions; the expert embeddings e [E, r] start
    orthogonal with gain 0.32 (as the reference code). Both the projected token and the embeddings are
    L2-normalised (the paper's formula), so the scores lie in [-1 / tau, 1 / tau] and do not depend on the
    token's norm; torchscale's routing.py normalises only the embeddings, which it also rescales in place to
    norm 1.5 every forward (lines 495-498, 513-518; the rescaling is then undone by the normalisation), and has
    no learned temperature. tau is a learnable scalar, initialised at `temperature` and floored at 1e-4 (as
    the X-MoE-lineage gates that learn one, `gating_t`). The balance loss reads the cosines at the fixed
    temperature 0.07 (`balance_logits`; routing.py's TEMPERATURE_FOR_L_UAX, "use a fixed temperature to
    compute balance loss"), so it never pushes tau. Gate values: the softmax renormalised over the top k for
    k >= 2 (the reference LM recipe, --moe-normalize-gate-prob-before-dropping), the full-softmax probability at
    k = 1 (its top-1 gating; renormalising one expert would give the router no gradient). Trained with the
    balance loss at 0.01 as the reference recipe (--moe-gate-loss-wt 0.01).
    """

    default_aux_losses = {'balance': 0.01}

    def __init__(self, d_model, num_expert, world_size=1, top_k=2, dim=16, temperature=0.07):
        super().__init__(d_model, num_expert, world_size, top_k)
        self.project = nn.Linear(d_model, dim, bias=False)
        self.expert_emb = nn.Parameter(nn.init.orthogonal_(torch.empty(self.tot_expert, dim), gain=0.32))
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))
        self._cosine = None

    def routing_temperature(self):
        """tau as the scores use it (floored at 1e-4), a 0-d tensor."""
        return self.temperature.clamp(min=1e-4)

    def logits(self, x):
        token = F.normalize(F.linear(x, self.project.weight.to(x.dtype)), dim=-1, eps=1e-4)   # [T, r]
        experts = F.normalize(self.expert_emb.to(x.dtype), dim=-1, eps=1e-4)                  # [E, r]
        self._cosine = token @ experts.t()                                                    # [T, E]
        return self._cosine / self.routing_temperature().to(x.dtype)

    def balance_logits(self, logits):
        """The cosines of the last forward over the fixed 0.07, without tau [T, E]."""
        return self._cosine / XMOE_BALANCE_TEMPERATURE

    def scores(self, logits, top_val, top_idx):
        if self.top_k == 1:
            return F.softmax(logits, dim=-1).gather(1, top_idx)                               # [T, 1]
        return F.softmax(top_val, dim=-1)


def dts_temperature(step, max_temp, min_temp, anneal_steps):
    """DTS-Gate's Gumbel temperature at `step`: exponential decay from max_temp to min_temp over anneal_steps
    (EvoMoE's 'Exp' scheduler), then min_temp."""
    frac = min(step, anneal_steps) / anneal_steps
    return max_temp * (min_temp / max_temp) ** frac


@dataclasses.dataclass(frozen=True)
class DTSSettings:
    max_temp: float = setting(1.0, 'Gumbel temperature at step 0 (EvoMoE\'s --max-temperature default)')
    min_temp: float = setting(0.5, 'Gumbel temperature at the end of the annealing (EvoMoE\'s --min-temperature '
                              'default)')
    anneal_steps: int = setting(200_000, 'steps of the dense-to-sparse phase (exponential decay of the temperature, '
                                'experts kept by --dts_threshold); top-k routing after it (default: half of max_step)',
                                valid=('positive (or -1: half of --max_step)', lambda v: v >= 1), flag_default=-1,
                                from_max_step=lambda max_step: max(1, max_step // 2))
    threshold: float = setting(0.001, 'in the dense-to-sparse phase a token goes to every expert whose Gumbel weight '
                               'exceeds this', valid=('in [0, 1)', lambda v: 0 <= v < 1))

    def problems(self):
        if not 0 < self.min_temp <= self.max_temp:
            yield f'need 0 < --dts_min_temp ({self.min_temp}) <= --dts_max_temp ({self.max_temp})'


@register_router('dts', 'DTS-Gate', '[Nie et al. 2021 (EvoMoE)](https://arxiv.org/abs/2112.14397)',
                 '[codecaution/EvoMoE](https://github.com/codecaution/EvoMoE)', settings=DTSSettings)
class DTSGate(BaseGate):
    """DTS-Gate (Nie et al. 2021, EvoMoE): dense-to-sparse routing by an annealed Gumbel softmax.

    Logits: a linear router without bias (as EvoMoE's). The Gumbel softmax only *selects* the experts: in
    training, up to `anneal_steps`, w = softmax((logits + g) / tau), g Gumbel noise and tau decaying from
    max_temp to min_temp (see dts_temperature), and a token goes to every expert whose w exceeds `threshold`
    (EvoMoE's content-based selection, 0.001): practically every expert at first, fewer as tau falls. The
    gate returns E columns in that phase, best first, the unselected slots -1. From anneal_steps on it is
    sparse: the top k of logits + g. Evaluation routes by the top k of the logits, without noise, whatever
    the checkpoint's step. The gate value of a chosen expert is always softmax(logits) at temperature 1, its
    probability under the router's full softmax, not renormalised over the chosen: EvoMoE's default gate
    (without --use-gumbel-gates, topkgate.py lines 63-68 in training, its top-1 gate at evaluation,
    top1gate.py line 51), so training and evaluation scale an expert's output alike. The step comes from the
    trainer's set_step before every step (also the first after a resume), and the noise from the global RNG,
    which checkpoints save. Defaults: temperatures 1.0 -> 0.5, EvoMoE's flag defaults (--max-temperature,
    --min-temperature, fairseq/dataclass/configs.py).
    """

    def __init__(self, d_model, num_expert, world_size=1, top_k=1, max_temp=1.0, min_temp=0.5,
                 anneal_steps=200_000, threshold=0.001):
        super().__init__(d_model, num_expert, world_size, top_k)
        if not 0 < min_temp <= max_temp:
            raise ValueError(f'DTS-Gate needs 0 < min_temp <= max_temp; got {min_temp}, {max_temp}')
        if anneal_steps < 1:
            raise ValueError(f'DTS-Gate anneal_steps must be at least 1; got {anneal_steps}')
        self.gate = nn.Linear(d_model, self.tot_expert, bias=False)
        self.max_temp, self.min_temp, self.anneal_steps, self.threshold = max_temp, min_temp, anneal_steps, threshold
        self.step = 0
        self.dense = True       # whether a training forward now routes by threshold (the dense-to-sparse phase)
        # the temperature as the forward reads it: a tensor, so that torch.compile makes one graph for every step
        # (a Python number is a constant of its graph); filled in place, not a state of the model
        self.register_buffer('gumbel_temperature', torch.tensor(float(max_temp), dtype=torch.float64),
                             persistent=False)

    def set_step(self, step):
        self.step = step
        self.dense = step < self.anneal_steps
        self.gumbel_temperature.fill_(self.temperature)

    @property
    def temperature(self):
        """The Gumbel temperature of a training forward now."""
        return dts_temperature(self.step, self.max_temp, self.min_temp, self.anneal_steps)

    def logits(self, x):
        return F.linear(x, self.gate.weight.to(x.dtype))

    def choose(self, logits):
        """The chosen experts by the Gumbel weights in training (returned as their values), by the logits in
        evaluation."""
        if not self.training:
            return torch.topk(logits, self.top_k, dim=-1)
        uniform = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)          # (0, 1): no log(0)
        gumbel = -(-uniform.log()).log()                                                     # [T, E], Gumbel(0, 1)
        weights = F.softmax((logits + gumbel) / self.gumbel_temperature, dim=-1)             # [T, E]
        if not self.dense:
            return torch.topk(weights, self.top_k, dim=-1)                                   # [T, k]
        top_w, top_idx = torch.sort(weights, dim=-1, descending=True)                        # [T, E]
        return top_w, top_idx.masked_fill(top_w <= self.threshold, -1)

    def scores(self, logits, top_val, top_idx):
        """softmax(logits) of each chosen expert (0 in a -1 slot), in training and evaluation alike."""
        probs = F.softmax(logits, dim=-1).gather(1, top_idx.clamp(min=0))                    # [T, k]
        return probs * (top_idx >= 0)
