"""The auxiliary losses (balance, importance, z, a gate's own) by hand, and their weights and logs in training."""
import glob
import json
import math
import os

import pytest
import torch

import train
import train_args
from custom_gate import NaiveGate, cv_squared
from moe import aux_losses, importance_loss, moe_blocks, record_routing, router_z_loss, switch_balance_loss
from tests.conftest import TINY_MOE_ARGS, register_router, tiny_model

E = 4


def test_cv_squared_is_the_population_variance_over_the_squared_mean():
    # [1, 2, 3, 6]: mean 3, variance (4 + 1 + 0 + 9) / 4 = 3.5
    assert cv_squared(torch.tensor([1.0, 2.0, 3.0, 6.0])).item() == pytest.approx(3.5 / 9)
    assert cv_squared(torch.full((E,), 2.5)).item() == 0.0


def test_importance_loss_by_hand_with_a_dropped_slot():
    top_idx = torch.tensor([[0, 1], [0, 2], [1, -1]])
    score = torch.tensor([[0.6, 0.4], [0.7, 0.3], [1.0, 0.9]])       # the -1 slot's 0.9 counts nowhere
    # importance = [1.3, 1.4, 0.3, 0]: mean 0.75, variance (0.55^2 + 0.65^2 + 0.45^2 + 0.75^2) / 4 = 0.3725
    assert importance_loss(top_idx, score, E).item() == pytest.approx(0.3725 / 0.5625)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])        # logsumexp: log 2 and log 4
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_balance_loss_ignores_dropped_slots():
    uniform = torch.zeros(4, E)
    one_each = torch.tensor([[0, -1], [1, -1], [2, -1], [3, -1]])  # 4 routed pairs, one per expert
    assert switch_balance_loss(uniform, one_each).item() == pytest.approx(1.0)
    # two experts, probabilities (0.75, 0.25) for every token, all routed to expert 0: f = (1, 0), 2 * 0.75
    skewed = torch.log(torch.tensor([[0.75, 0.25]])).expand(3, 2)
    assert switch_balance_loss(skewed, torch.tensor([[0, -1], [0, -1], [-1, 0]])).item() == pytest.approx(1.5)


class NoisyLikeGate(NaiveGate):
    """A stand-in for a gate that gives its own 'load' loss (noisy top-k's smooth load)."""
    own_aux_losses = ('load',)

    def aux_terms(self):
        return {'load': torch.tensor(3.0)}


def test_a_loss_the_gate_owns_comes_from_its_aux_terms_and_others_cannot_give_it():
    logits, top_idx, score = torch.zeros(2, E), torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5)
    losses = aux_losses(NoisyLikeGate(8, E), ('load', 'z'), logits, top_idx, score)
    assert losses['load'].item() == 3.0 and losses['z'].item() == pytest.approx(math.log(E) ** 2)
    with pytest.raises(ValueError, match="cannot give the auxiliary loss 'load'"):
        aux_losses(NaiveGate(8, E), ('load',), logits, top_idx, score)


def test_recorded_losses_are_summed_over_the_layers_from_each_routers_logits(tokens):
    model = tiny_model(gate_name='smoe', moe_top_k=2)
    logits = []
    for block in moe_blocks(model).values():
        block.gate.register_forward_hook(lambda gate, args, out: logits.append(out[2].detach()))
    with record_routing(model, ('z', 'importance')) as record:
        model(tokens[:-1], tokens[1:])
    assert len(logits) == 2
    by_hand = sum(torch.logsumexp(lg.double(), -1).square().mean() for lg in logits)
    assert record.loss_sums()['z'].item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert len(record.losses['importance']) == 2 and record.dropped == {}


# ----------------------------------------------------------------------------- flags and training




def test_weights_default_to_the_gate_class_then_zero_and_load_balance_is_balance_loss(monkeypatch):
    args = train.parse_args(['--moe'])
    assert train_args.aux_weights(args) == {'balance': 0.0, 'importance': 0.0, 'load': 0.0, 'z': 0.0}
    assert train.parse_args(['--moe', '--load_balance', '0.01']).balance_loss == 0.01

    class SwitchLikeGate(NaiveGate):
        default_aux_losses = {'balance': 0.01}
    register_router(monkeypatch, 'switch_like', SwitchLikeGate)
    assert train_args.aux_weights(train.parse_args(['--moe', '--gate_name', 'switch_like']))['balance'] == 0.01
    assert train.parse_args(['--moe', '--gate_name', 'switch_like', '--balance_loss', '0']).balance_loss == 0.0


@pytest.mark.parametrize('extra,message', [
    (['--moe', '--load_loss', '0.01'], '--load_loss: the router NaiveGate cannot give the load loss'),
    (['--moe', '--z_loss', '-1'], '--z_loss must be non-negative'),
    (['--importance_loss', '0.01'], '--importance_loss needs --moe'),
])
def test_bad_aux_loss_flags_are_clear_errors(extra, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(extra)
    assert message in capsys.readouterr().err


def test_a_requested_load_loss_names_the_routers_that_can(monkeypatch, capsys):
    register_router(monkeypatch, 'noisy_like', NoisyLikeGate)
    assert train.parse_args(['--moe', '--gate_name', 'noisy_like', '--load_loss', '0.01']).load_loss == 0.01
    with pytest.raises(SystemExit):
        train.parse_args(['--moe', '--load_loss', '0.01'])
    assert 'routers that can: noisy_topk, noisy_like' in capsys.readouterr().err


def read_split(run_dir, split):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['split'] == split]


@pytest.mark.parametrize('flag', ['--importance_loss', '--z_loss'])
def test_each_weight_enters_the_update_and_its_loss_is_logged(flag, tmp_path, synthetic_dir):
    losses = {}
    for weight in ('0', '10'):
        work = str(tmp_path / weight)
        train.main([*TINY_MOE_ARGS, '--data', synthetic_dir, '--work_dir', work, flag, weight, '--max_step', '2',
                    '--eval-interval', '2', '--log-interval', '1'])
        [run_dir] = glob.glob(f'{work}-synthetic/*')
        losses[weight] = [r['loss'] for r in read_split(run_dir, 'train')]
    assert losses['10'][0] == losses['0'][0] and losses['10'][1] != losses['0'][1]   # same first step, other update
    name = flag[2:-len('_loss')]
    assert [set(r) - {'step', 'split'} for r in read_split(run_dir, 'aux')] == [{name}, {name}]
    with open(os.path.join(run_dir, 'train.log')) as f:
        assert f'| {name} ' in f.read()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert f'aux/{name}' in EventAccumulator(run_dir).Reload().Tags()['scalars']
