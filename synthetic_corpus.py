"""The built-in synthetic corpus: a source of text with real routing structure and an exact entropy rate.

Several "dialects", each with its own disjoint alphabet of bytes and its own peaked order-1 transition
matrix, take turns: the text stays in a dialect for a Geometric(switch_prob) number of characters,
then moves to another dialect chosen uniformly. Because the alphabets are disjoint the whole source is
one Markov chain over the union alphabet (`chain_matrix`), whose entropy rate (`entropy_rate_bits`)
is the best bits per character any model can reach. data_utils.make_synthetic_corpus writes it out
in the enwik8 format.
"""
import dataclasses
from typing import NamedTuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Settings of the synthetic corpus (recorded in synthetic.json); see make_synthetic_corpus."""
    seed: int = 1111
    n_train: int = 2_000_000
    n_valid: int = 200_000
    n_test: int = 200_000
    n_dialects: int = 4
    alphabet_size: int = 16
    concentration: float = 0.05     # Dirichlet concentration of each transition row: small = peaked
    switch_prob: float = 1 / 64     # per character; mean dialect run of 64 characters

    def __post_init__(self):
        if min(self.n_train, self.n_valid, self.n_test) < 2:
            raise ValueError('n_train, n_valid and n_test must be at least 2')
        if self.n_dialects < 2 or self.alphabet_size < 2 or self.n_dialects * self.alphabet_size > 255:
            raise ValueError('need n_dialects >= 2, alphabet_size >= 2 and at most 255 symbols in all')
        if not (0 < self.switch_prob < 1 and self.concentration > 0):
            raise ValueError('need 0 < switch_prob < 1 and concentration > 0')


class DialectChain(NamedTuple):
    """The synthetic source: dialect d speaks alphabets[d] with order-1 transitions trans[d]."""
    alphabets: np.ndarray       # [D, A] byte values, disjoint, never 10
    trans: np.ndarray           # [D, A, A] within-dialect P(next | current)
    start: np.ndarray           # [D, A] first character after a switch
    switch_prob: float


def dialect_chain(cfg, rng):
    """Draw the dialects' transition and start distributions; alphabets are fixed blocks of bytes."""
    n_dialects, size = cfg.n_dialects, cfg.alphabet_size
    byte_values = list(range(33, 127)) + [b for b in range(256) if not 33 <= b < 127 and b != 10]
    alphabets = np.array(byte_values[:n_dialects * size]).reshape(n_dialects, size)      # [D, A]
    alpha = np.full(size, cfg.concentration)
    trans = rng.dirichlet(alpha, size=(n_dialects, size))                                   # [D, A, A]
    start = rng.dirichlet(alpha, size=n_dialects)                                           # [D, A]
    return DialectChain(alphabets, trans, start, cfg.switch_prob)


def chain_matrix(chain):
    """The whole source as one Markov chain [V, V] over the union alphabet (state d * A + i).

    From a character of dialect d the chain stays in d with probability 1 - p and moves by trans[d];
    otherwise it picks one of the other D - 1 dialects e uniformly and draws from start[e]. The
    alphabets being disjoint, the last character determines the dialect, hence order 1.
    """
    n_dialects, size = chain.start.shape
    p = chain.switch_prob
    matrix = np.empty((n_dialects * size, n_dialects * size))
    for d in range(n_dialects):
        for e in range(n_dialects):
            if e == d:
                block = (1 - p) * chain.trans[d]                                            # [A, A]
            else:
                block = np.tile(p / (n_dialects - 1) * chain.start[e], (size, 1))         # [A, A]
            matrix[d * size:(d + 1) * size, e * size:(e + 1) * size] = block
    return matrix


def entropy_rate_bits(matrix):
    """sum_s pi(s) H(matrix[s]) in bits, pi the stationary distribution (solved exactly, not iterated)."""
    n = len(matrix)
    system = np.vstack([matrix.T - np.eye(n), np.ones((1, n))])        # pi (T - I) = 0, sum(pi) = 1
    rhs = np.zeros(n + 1)
    rhs[-1] = 1.0
    pi = np.linalg.lstsq(system, rhs, rcond=None)[0]
    with np.errstate(divide='ignore'):
        logs = np.where(matrix > 0, np.log2(matrix), 0.0)
    return float(-(pi[:, None] * matrix * logs).sum())


def _segment_lengths(n, p, rng):
    """Lengths of the dialect runs, Geometric(p) on 1, 2, ..., the last one cut so they sum to n."""
    lengths = rng.geometric(p, size=int(n * p) + 1)
    while lengths.sum() < n:
        lengths = np.concatenate([lengths, rng.geometric(p, size=int(n * p) + 1)])
    lengths = lengths[:np.searchsorted(np.cumsum(lengths), n) + 1]
    lengths[-1] -= lengths.sum() - n
    return lengths


def sample_chain(chain, n, rng):
    """n consecutive states (d * A + i) of the chain, vectorised over dialect runs.

    After a switch the next character depends only on the new dialect, so the stream is a sequence of
    independent runs: draw their dialects and lengths first, then step all runs together, one position
    at a time, longest first so that the runs still going are a prefix.
    """
    n_dialects, size = chain.start.shape
    lengths = _segment_lengths(n, chain.switch_prob, rng)
    moves = rng.integers(1, n_dialects, size=len(lengths))         # to one of the other D - 1 dialects
    moves[0] = rng.integers(n_dialects)                              # the first dialect, uniform
    dialects = np.cumsum(moves) % n_dialects
    offsets = np.cumsum(lengths) - lengths                           # where each run starts
    order = np.argsort(-lengths, kind='stable')
    lengths, dialects, offsets = lengths[order], dialects[order], offsets[order]
    cdf_start, cdf_trans = np.cumsum(chain.start, -1), np.cumsum(chain.trans, -1)
    states = np.empty(n, dtype=np.int64)
    char = np.zeros(len(lengths), dtype=np.int64)
    for j in range(lengths[0]):
        m = np.searchsorted(-lengths, -j)                            # runs longer than j
        cdf = cdf_start[dialects[:m]] if j == 0 else cdf_trans[dialects[:m], char[:m]]      # [m, A]
        char[:m] = np.minimum((cdf <= rng.random(m)[:, None]).sum(1), size - 1)
        states[offsets[:m] + j] = dialects[:m] * size + char[:m]
    return states
