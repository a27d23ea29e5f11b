"""The methods' objectives against hand computations: THOR's training loss and HyperRouter's generated router.

THOR (Zuo et al. 2022): loss = (CE1 + CE2 + alpha CR(p1, p2)) / 2, CR the symmetric KL, i.e. the mean
of the two passes' NLL plus alpha / 2 times CR; checked through train.py's own training step on two
constructed predictive distributions. HyperRouter (Do et al. 2023, Eq. 2): H(e) = W2 relu(W1 e + b1) + b2,
read as E rows of d + 1 numbers: W_r the first d of each row, b_r the last; checked in float64 numpy.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import train
from data_utils import Corpus, Vocab
from hyper_router import HyperRouterGate
from run_utils import Distributed

ALPHA = 3.0
# two tokens, vocabulary of 3: the passes disagree on the first token and agree on the second
PASS_1 = [[1 / 2, 1 / 4, 1 / 4], [0.7, 0.2, 0.1]]
PASS_2 = [[1 / 4, 1 / 2, 1 / 4], [0.7, 0.2, 0.1]]
TARGET = [0, 2]
# by hand: CE1 = ln 2, CE2 = ln 4 on token 1, ln 10 twice on token 2; KL(p1 || p2) = KL(p2 || p1) =
# 1/2 ln 2 + 1/4 ln 1/2 = 1/4 ln 2 on token 1, 0 on token 2
HAND_NLL = ((math.log(2) + math.log(4)) / 2 + math.log(10)) / 2
HAND_CONSISTENCY = (math.log(2) / 4 + 0.0) / 2


def thor_trainer(tmp_path):
    """A THOR Trainer of train.py on a 3-symbol corpus (only its training step is used)."""
    args = train.parse_args(['--dataset', 'synthetic', '--moe', '--gate_name', 'thor', '--moe-num-expert', '2',
                             '--moe-top-k', '1', '--n_layer', '1', '--d_model', '8', '--n_head', '1', '--d_head', '4',
                             '--d_inner', '8', '--tgt_len', '2', '--mem_len', '2', '--eval_tgt_len', '2',
                             '--batch_size', '1', '--thor_alpha', str(ALPHA), '--clip', '1e9'])
    stream = torch.arange(60) % 3
    corpus = Corpus('synthetic', Vocab(['0', '1', '2']), stream, stream, stream)
    return train.Trainer(args, Distributed(False), corpus, str(tmp_path))


def hand_objective(logits):
    """(CE1 + CE2) / 2 + alpha / 2 * (KL(p1 || p2) + KL(p2 || p1)) / 2, token mean, written out in float64."""
    p = logits.double().exp() / logits.double().exp().sum(-1, keepdim=True)      # [2 passes, N, V]
    target = torch.tensor(TARGET)
    ce = [-p[i, torch.arange(len(TARGET)), target].log() for i in range(2)]    # [N] each
    kl_12 = (p[0] * (p[0] / p[1]).log()).sum(-1)
    kl_21 = (p[1] * (p[1] / p[0]).log()).sum(-1)
    return ((ce[0] + ce[1]) / 2 + ALPHA / 2 * (kl_12 + kl_21) / 2).mean()


def test_thor_training_step_minimises_the_mean_nll_plus_half_alpha_times_the_symmetric_kl(tmp_path):
    trainer = thor_trainer(tmp_path)
    logits = nn.Parameter(torch.tensor([PASS_1, PASS_2]).log())                  # [2 passes, N, V]
    passes = []

    def constructed_pass(data, target, mems):
        """Stands in for the model's forward: pass i's hidden state is PASS_i's logits for every token."""
        passes.append(data)
        return logits[(len(passes) - 1) % 2], None                               # [N, V]

    trainer.model._predicting_hidden = constructed_pass
    trainer.model.log_probs = lambda hidden: torch.log_softmax(hidden, -1)      # [N, V]
    target = torch.tensor(TARGET).view(2, 1)                                     # [T, B]
    nll = trainer.train_step(target, target)
    assert len(passes) == 2                                                      # THOR runs the batch twice
    assert nll == pytest.approx(HAND_NLL, rel=1e-6)
    assert trainer.terms['consistency'] == pytest.approx(HAND_CONSISTENCY, rel=1e-5)

    leaf = logits.detach().double().requires_grad_()
    objective = hand_objective(leaf)
    assert objective.item() == pytest.approx(HAND_NLL + ALPHA / 2 * HAND_CONSISTENCY, rel=1e-6)
    [expected] = torch.autograd.grad(objective, [leaf])
    torch.testing.assert_close(logits.grad.double(), expected, rtol=1e-5, atol=1e-7)


def hyper_router(d_model=3, num_expert=4, top_k=2, hyper_size=5, seed=0):
    torch.manual_seed(seed)
    gate = HyperRouterGate(d_model, num_expert, top_k=top_k, hyper_size=hyper_size).double()
    with torch.no_grad():
        for p in gate.hypernet.parameters():
            p.normal_()
    return gate


def hand_router(gate):
    """(W_r [E, d], b_r [E]) from the gate's parameters, in numpy: H(e) cut into E rows of d weights and a bias."""
    w1, b1 = (p.detach().numpy() for p in gate.hypernet[0].parameters())
    w2, b2 = (p.detach().numpy() for p in gate.hypernet[2].parameters())
    e = gate.embedding.detach().numpy()[0]
    out = w2 @ np.maximum(w1 @ e + b1, 0) + b2                                    # [E * (d + 1)]
    d, n_expert = gate.d_model, gate.tot_expert
    weight = np.array([[out[i * (d + 1) + j] for j in range(d)] for i in range(n_expert)])
    bias = np.array([out[i * (d + 1) + d] for i in range(n_expert)])
    return weight, bias


def test_generated_router_is_the_hypernetwork_output_cut_into_rows_of_weights_and_a_bias():
    gate = hyper_router()
    weight, bias = gate.generate_router()
    hand_weight, hand_bias = hand_router(gate)
    np.testing.assert_allclose(weight.detach().numpy(), hand_weight, rtol=1e-12)
    np.testing.assert_allclose(bias.detach().numpy(), hand_bias, rtol=1e-12)


def test_hyper_router_routes_by_the_top_k_of_its_generated_logits_with_softmax_scores():
    gate = hyper_router(top_k=2)
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hand_weight, hand_bias = hand_router(gate)
    logits = x.numpy() @ hand_weight.T + hand_bias                               # [T, E]
    top_idx, top_score = gate(x)
    for t in range(len(x)):
        chosen = np.argsort(-logits[t])[:2]
        scores = np.exp(logits[t, chosen]) / np.exp(logits[t, chosen]).sum()
        assert top_idx[t].tolist() == chosen.tolist()
        np.testing.assert_allclose(top_score[t].detach().numpy(), scores, rtol=1e-12)


def test_gradients_reach_the_embedding_through_the_frozen_hypernetwork():
    gate = hyper_router()
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    probe = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (gate.logits(x) @ probe).sum().backward()
    assert all(p.grad is None for p in gate.hypernet.parameters())

    def hand_loss(embedding):
        with torch.no_grad():
            gate.embedding.copy_(torch.from_numpy(embedding))
        weight, bias = hand_router(gate)
        return ((x.numpy() @ weight.T + bias) @ probe.numpy()).sum()

    e0 = gate.embedding.detach().numpy().copy()
    numeric = np.zeros_like(e0)
    for j in range(e0.shape[1]):                                                 # central differences
        step = np.zeros_like(e0)
        step[0, j] = 1e-6
        numeric[0, j] = (hand_loss(e0 + step) - hand_loss(e0 - step)) / 2e-6
    np.testing.assert_allclose(gate.embedding.grad.numpy(), numeric, rtol=1e-6, atol=1e-8)
