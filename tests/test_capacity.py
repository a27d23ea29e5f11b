"""Dropped slots (-1) in the engine, expert capacity and token dropping, against hand counts and naive loops."""
import glob
import json
import os

import pytest
import torch
import torch.nn.functional as F

import eval as eval_script
import train
import train_args
from capacity import drop_over_capacity, drop_over_group_capacity, expert_capacity
from hyper_expert import HyperExpert, HyperExpertGenerator, unique_sets
from moe import Experts, MoEPositionwiseFF, RouterStats, set_capacity, torch_moe
from tests.conftest import TINY_MOE_ARGS, register_router, tiny_model

E, D, H = 4, 16, 16


def random_experts(seed=0):
    torch.manual_seed(seed)
    experts = Experts(E, D, H, dropout=0.0)
    for p in experts.parameters():
        p.data.normal_(0, 0.3)
    return experts


def naive_moe(x, top_idx, top_score, experts):
    """Token by token, slot by slot: sum of score * expert(x) over the slots whose index is not -1 (float64)."""
    w1, b1 = experts.htoh4.weight.double(), experts.htoh4.bias.double()
    w2, b2 = experts.h4toh.weight.double(), experts.h4toh.bias.double()
    rows = []
    for t in range(x.size(0)):
        row = torch.zeros(x.size(1), dtype=torch.float64)
        for j in range(top_idx.size(1)):
            e = int(top_idx[t, j])
            if e >= 0:
                hidden = torch.relu(w1[e] @ x[t].double() + b1[e])
                row = row + float(top_score[t, j]) * (w2[e] @ hidden + b2[e])
        rows.append(row)
    return torch.stack(rows)


def naive_drop(top_idx, capacity):
    """GShard's order by hand: all first choices in token order, then all second choices; -1 takes no room."""
    kept, used = top_idx.clone(), {}
    for j in range(top_idx.size(1)):
        for t in range(top_idx.size(0)):
            e = int(top_idx[t, j])
            if e < 0:
                continue
            used[e] = used.get(e, 0) + 1
            if used[e] > capacity:
                kept[t, j] = -1
    return kept


DROPPED = torch.tensor([[0, 1], [-1, 2], [-1, -1], [3, -1], [2, 0], [1, 3], [-1, 0]])   # [T, k], one token all -1


@pytest.mark.parametrize('engine', ['loop', 'grouped'])
def test_a_dropped_slot_adds_nothing_and_gets_no_gradient(engine):
    experts = random_experts()
    x = torch.randn(7, D)
    score = torch.rand(7, 2)
    score[DROPPED < 0] = float('nan')              # a dropped slot's score is ignored, whatever it holds
    y = torch_moe(x, DROPPED, score, experts, engine)
    torch.testing.assert_close(y.double(), naive_moe(x, DROPPED, score, experts), atol=1e-5, rtol=1e-5)
    assert torch.equal(y[2], torch.zeros(D))       # the token dropped from both slots
    x.requires_grad_(True)
    torch_moe(x, DROPPED, score.nan_to_num(), experts, engine).square().sum().backward()
    assert torch.equal(x.grad[2], torch.zeros(D)) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize('engine', ['loop', 'grouped'])
def test_the_gradients_with_dropped_slots_are_the_naive_ones(engine):
    experts = random_experts(2)
    x = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    score = torch.rand(7, 2)
    reference = random_experts(2).double()
    naive_moe(x, DROPPED, score, reference).square().sum().backward()
    xf = x.detach().float().requires_grad_(True)
    torch_moe(xf, DROPPED, score, experts, engine).square().sum().backward()
    torch.testing.assert_close(xf.grad.double(), x.grad, atol=1e-4, rtol=1e-4)
    for name, p in experts.named_parameters():         # the grouped engine's spare rows leave no trace here
        torch.testing.assert_close(p.grad.double(), dict(reference.named_parameters())[name].grad, atol=1e-4,
                                   rtol=1e-4)


def test_with_k_equal_to_e_a_dropped_slot_weighs_zero():
    experts = random_experts(1)
    x = torch.randn(5, D)
    top_idx = torch.tensor([[0, 1, 2, 3], [3, -1, 1, 0], [-1, -1, -1, -1], [2, 3, -1, 1], [1, 0, 3, 2]])
    score = torch.rand(5, 4)
    y = torch_moe(x, top_idx, score, experts)
    torch.testing.assert_close(y.double(), naive_moe(x, top_idx, score, experts), atol=1e-5, rtol=1e-5)


def test_the_grouped_engine_with_capacity_reads_nothing_back_to_the_host(no_host_sync):
    torch.manual_seed(0)
    block = MoEPositionwiseFF(D, H, 0.1, num_expert=E, top_k=2, gate_name='smoe', engine='grouped')
    block.capacity_factor = (0.5, 0.5)
    x = torch.randn(7, 3, D, requires_grad=True)
    block(x).sum().backward()
    assert x.grad is not None and block.experts.htoh4.weight.grad is not None


@pytest.mark.parametrize('factor,n_tok,k,expected', [(1.0, 8, 1, 2), (1.25, 10, 2, 7), (2.0, 3, 1, 2), (0.1, 5, 2, 1)])
def test_capacity_is_ceil_of_factor_tokens_k_over_experts(factor, n_tok, k, expected):
    assert expert_capacity(factor, n_tok, k, E) == expected        # ceil(F T k / E) by hand


def test_first_choices_come_before_second_choices_then_token_order():
    top_idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    # capacity 2: expert 0 takes the first choices of tokens 0, 1 and refuses token 2's and token 3's second
    assert drop_over_capacity(top_idx, 2, E).tolist() == [[0, 1], [0, 2], [-1, -1], [1, -1]]
    # capacity 1: token 3's first choice (expert 1) beats token 0's second, though token 0 comes first
    assert drop_over_capacity(top_idx, 1, E).tolist() == [[0, -1], [-1, 2], [-1, -1], [1, -1]]
    # a slot already dropped by its gate takes no room
    assert drop_over_capacity(torch.tensor([[-1, 1], [0, 1]]), 1, E).tolist() == [[-1, 1], [0, -1]]


def test_capacity_is_per_group_of_consecutive_positions_of_one_sequence():
    """Two sequences, rows time-major (t * B + b), groups of 2 positions: each group gives an expert
    ceil(1.0 * 2 * 1 / 2) = 1 slot; the 5-position sequences end with a group of one token (C = 1)."""
    experts_by_seq = [[0, 0, 1, 1, 1], [1, 0, 0, 0, 0]]                    # [B, T] each token's expert
    top_idx = torch.tensor(experts_by_seq).t().reshape(-1, 1)               # [T * B, 1], time-major
    kept = drop_over_group_capacity(top_idx, 1.0, 2, n_seq=2, group_size=2)
    by_seq = kept.view(5, 2).t().tolist()
    assert by_seq == [[0, -1, 1, -1, 1], [1, 0, 0, -1, 0]]                  # by hand, group by group
    # one group per sequence (group_size >= T): C = ceil(5 / 2) = 3; the second sequence's fourth 0 is dropped
    whole = drop_over_group_capacity(top_idx, 1.0, 2, n_seq=2, group_size=1024)
    assert whole.view(5, 2).t().tolist() == [[0, 0, 1, 1, 1], [1, 0, 0, 0, -1]]
    # the default group: Mesh TensorFlow's group_size 1024 (moe.py), where the papers are silent
    assert train_args.parse_args(['--moe']).capacity_group_size == 1024
    assert MoEPositionwiseFF(D, H, 0.0, num_expert=E).capacity_group_size == 1024


@pytest.mark.parametrize('gate_name,k', [('switch', 1), ('smoe', 2)])
def test_capacity_drops_do_not_depend_on_how_the_batch_is_split(gate_name, k):
    """The same sequences as one batch or as two halves (two GPUs, or --batch_chunk 2): the same drops, the
    same outputs, with some slots dropped (not trivially dropless)."""
    torch.manual_seed(0)
    block = MoEPositionwiseFF(D, H, 0.0, num_expert=E, top_k=k, gate_name=gate_name).eval()
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    block.capacity_factor, block.capacity_group_size = (1.0, 1.0), 8
    inp = torch.randn(16, 6, D)                                             # [T, B, d]
    stats = RouterStats(E)
    block.stats = stats
    whole = block(inp)
    assert stats.drop_fraction > 0
    halves = torch.cat([block(inp[:, :3]), block(inp[:, 3:])], dim=1)
    torch.testing.assert_close(halves, whole)


@pytest.mark.parametrize('seed', range(5))
def test_capacity_dropping_matches_the_hand_order_on_random_routing(seed):
    gen = torch.Generator().manual_seed(seed)
    top_idx = torch.rand(40, 3, generator=gen).argsort(-1)[:, :3] % E          # some repeats, never mind
    top_idx[torch.rand(40, 3, generator=gen) < 0.1] = -1
    for capacity in (1, 5, 12, 40):
        assert torch.equal(drop_over_capacity(top_idx, capacity, E), naive_drop(top_idx, capacity))


def all_to_expert_zero(block):
    """The block's linear router sends every token to expert 0 (then 1, 2, 3); the rest random."""
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        block.gate.gate.weight.zero_()
        block.gate.gate.bias.copy_(torch.tensor([30.0, 20.0, 10.0, 0.0]))


@pytest.mark.parametrize('pre_lnorm', [False, True])
def test_a_token_over_capacity_leaves_the_block_unchanged(pre_lnorm):
    torch.manual_seed(0)
    block = MoEPositionwiseFF(D, H, dropout=0.0, pre_lnorm=pre_lnorm, num_expert=E, top_k=1, gate_name='smoe')
    all_to_expert_zero(block)
    inp = torch.randn(4, 3, D)                          # T = 12 tokens, C = ceil(1.0 * 12 / 4) = 3
    block.capacity_factor = (None, 1.0)
    block.eval()
    with torch.no_grad():
        out = block(inp)
        flat_inp, flat_out = inp.reshape(12, D), out.reshape(12, D)
        # tokens 3.. (in [T * B] order) are over expert 0's capacity: the residual alone
        passed = F.layer_norm(flat_inp[3:], (D,), block.layer_norm.weight, block.layer_norm.bias) \
            if not pre_lnorm else flat_inp[3:]
        assert torch.equal(flat_out[3:], passed)
        x = block.layer_norm(flat_inp[:3]) if pre_lnorm else flat_inp[:3]
        expert = naive_moe(x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), block.experts).float()
        kept = flat_inp[:3] + expert if pre_lnorm else block.layer_norm(flat_inp[:3] + expert)
        torch.testing.assert_close(flat_out[:3], kept, atol=1e-5, rtol=1e-5)
        block.train()                                   # training: the training factor, here dropless
        assert not torch.equal(block(inp).reshape(12, D)[3:], flat_out[3:])


def test_capacity_off_gives_the_dropless_numbers_bit_for_bit(tokens):
    model = tiny_model(moe_top_k=2)
    model.train()
    torch.manual_seed(1)
    dropless = model(tokens[:-1], tokens[1:])[0]
    set_capacity(model, E / 2, E / 2)                   # C = ceil((E / k) T k / E) = T: nothing can be dropped
    torch.manual_seed(1)
    assert torch.equal(model(tokens[:-1], tokens[1:])[0], dropless)
    set_capacity(model, 0.25, 0.25)
    torch.manual_seed(1)
    assert not torch.equal(model(tokens[:-1], tokens[1:])[0], dropless)


def test_router_stats_count_the_router_choice_and_the_dropped_pairs():
    stats = RouterStats(E)
    routed = torch.tensor([[0, 1], [0, -1], [0, 2], [1, 0]])
    kept = torch.tensor([[0, 1], [0, -1], [-1, 2], [1, -1]])
    stats.update(torch.zeros(4, E), routed, kept)
    assert stats.load.tolist() == [4, 2, 1, 0]                   # the -1 slot counts nowhere
    assert stats.dropped.tolist() == [2, 0, 0, 0]
    assert stats.drop_fraction == pytest.approx(2 / 7)
    assert stats.load_fraction == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0])


def test_a_dropped_expert_counts_as_unselected_in_the_hyper_expert():
    torch.manual_seed(0)
    generator = HyperExpertGenerator(D, 1, cond_dim=8, hidden=12, layer_emb_dim=3, adapter_dim=8)
    module = HyperExpert(E, generator, layer_index=0)
    emb = module.expert_emb.weight
    sets = torch.tensor([[-1, 1], [0, 2]])
    by_hand = torch.stack([emb[[0, 2, 3]].sum(0), emb[[1, 3]].sum(0)])
    torch.testing.assert_close(module.unselected_sum(sets), by_hand)
    sets, token_set = unique_sets(torch.tensor([[3, -1], [-1, 3], [1, 2]]))
    assert token_set[0] == token_set[1] != token_set[2]          # {3, -1} and {-1, 3}: one set
    x = torch.randn(2, D)
    one_dropped = module(x, torch.tensor([[1, -1], [1, -1]]))
    torch.testing.assert_close(one_dropped, module(x, torch.tensor([[1], [1]])))   # as if routed to expert 1 alone


# ----------------------------------------------------------------------------- through train.py and eval.py




def test_the_dropped_fraction_is_logged_per_layer_and_the_run_evaluates_as_trained(tmp_path, synthetic_dir, capsys):
    work = str(tmp_path / 'cap')
    train.main([*TINY_MOE_ARGS, '--data', synthetic_dir, '--work_dir', work, '--capacity_factor', '0.5',
                '--eval_capacity_factor', '0.75', '--max_step', '2', '--eval-interval', '2', '--log-interval', '1'])
    [run_dir] = glob.glob(f'{work}-synthetic/*')
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        router = [r for r in map(json.loads, f) if r['split'] == 'router']
    assert len(router) == 2 and all(0 < r['train_dropped/layer0'] < 1 for r in router)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    scalars = set(EventAccumulator(run_dir).Reload().Tags()['scalars'])
    assert {'router/train_dropped/layer0', 'router/train_dropped/layer1', 'router/dropped/layer0'} <= scalars
    results = {}
    for name, extra in (('default', []), ('same', ['--eval_capacity_factor', '0.75']),
                        ('dropless', ['--eval_capacity_factor', 'none'])):
        out = str(tmp_path / f'{name}.json')
        eval_script.main(['--run', run_dir, '--ks', '2', '--max_eval_steps', '2', '--json', out, *extra])
        with open(out) as f:
            results[name] = [e['results'] for e in json.load(f)]
    with open(os.path.join(run_dir, 'results.json')) as f:
        assert [{'2': e['results']['2']} for e in json.load(f)] == results['default'] == results['same']
    assert results['dropless'] != results['default']
    capsys.readouterr()
    eval_script.main(['--load', run_dir, '--max_eval_steps', '2', '--checkpoint', 'last'])
    table = capsys.readouterr().out
    assert 'dropped %' in table
    dropped = [float(line.split()[-1]) for line in table.splitlines() if line.strip()[:1].isdigit()]
    assert len(dropped) == 2 and all(0 < d < 100 for d in dropped)


@pytest.mark.parametrize('extra,message', [
    (['--moe', '--capacity_factor', '0'], 'needs a positive number'),
    (['--moe', '--eval_capacity_factor', 'lots'], 'needs a positive number'),
    (['--capacity_factor', '1.25'], '--capacity_factor needs --moe'),
    (['--moe', '--capacity_factor', '1.0', '--multi_gpu'], 'do not support --multi_gpu'),
    (['--moe', '--capacity_group_size', '0'], '--capacity_group_size must be at least 1'),
])
def test_bad_capacity_flags_are_clear_errors(extra, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(extra)
    assert message in capsys.readouterr().err


def test_capacity_defaults_come_from_the_gate_class_and_none_turns_them_off(monkeypatch):
    class CappedGate(train_args.GATES['smoe']):
        default_capacity_factor = (1.25, 2.0)
    register_router(monkeypatch, 'capped', CappedGate)
    args = train.parse_args(['--moe', '--gate_name', 'capped'])
    assert (args.capacity_factor, args.eval_capacity_factor) == (1.25, 2.0)
    args = train.parse_args(['--moe', '--gate_name', 'capped', '--capacity_factor', 'none', '--eval_capacity_factor',
                             '1.5'])
    assert (args.capacity_factor, args.eval_capacity_factor) == (None, 1.5)
    args = train.parse_args(['--moe', '--gate_name', 'smoe'])
    assert (args.capacity_factor, args.eval_capacity_factor) == (None, None)
