"""Hash layers, X-MoE and DTS-Gate: each router's defining behaviour against a computation written here, then
each one trained, resumed, evaluated and analysed end to end on the built-in corpus."""
import glob
import math
import os

import pytest
import torch
import torch.nn.functional as F

import analysis
import eval as eval_script
import evaluation
import train
from custom_gate import DTSGate, HashGate, XMoEGate
from hyper_router import param_breakdown, set_top_k
from moe import MoEPositionwiseFF, RouterStats, aux_losses
from tests.conftest import TINY, tiny_model

E, D, V = 4, 16, 37


def hash_block(seed=0, k=1, n_token=V, layer_index=0):
    return MoEPositionwiseFF(D, 16, 0.0, num_expert=E, top_k=k, gate_name='hash', layer_index=layer_index,
                             router_settings={'seed': seed}, n_token=n_token)


# ----------------------------------------------------------------------------- Hash layers

def test_hash_routing_depends_only_on_the_token_id():
    gate = hash_block().gate
    token_ids = torch.randint(V, (200,), generator=torch.Generator().manual_seed(1))
    first, _ = gate(torch.randn(200, D), token_ids)
    second, _ = gate(torch.randn(200, D) * 100, token_ids)            # other hidden states, same ids
    assert torch.equal(first, second)
    expert_of = {}
    for token, expert in zip(token_ids.tolist(), first[:, 0].tolist()):
        assert expert_of.setdefault(token, expert) == expert           # every occurrence of an id, one expert


def test_hash_routing_in_a_model_ignores_the_context(tokens):
    """The same token id at different positions and contexts goes to the same expert in every layer."""
    model = tiny_model(gate_name='hash', moe_top_k=1).eval()
    routed = {}

    def keep(gate, inputs, output, layer):
        routed.setdefault(layer, []).append((inputs[1], output[0]))       # (token ids [T], top_idx [T, k])
    hooks = [block.gate.register_forward_hook(lambda g, inp, out, i=i: keep(g, inp, out, i))
             for i, block in enumerate(model.moe_layers)]
    with torch.no_grad():
        model(tokens[:-1], tokens[1:])
        model(tokens.flip(0)[:-1], tokens.flip(0)[1:])
    for h in hooks:
        h.remove()
    for calls in routed.values():
        ids = torch.cat([c[0] for c in calls])
        experts = torch.cat([c[1][:, 0] for c in calls])
        for token in ids.unique():
            assert experts[ids == token].unique().numel() == 1


@pytest.mark.parametrize('n_token,n_expert', [(37, 4), (1000, 16), (204, 16)])
def test_the_hash_is_balanced_over_the_vocabulary(n_token, n_expert):
    gate = HashGate(D, n_expert, top_k=1, n_token=n_token, seed=3)
    top_idx, top_score = gate(torch.zeros(n_token, D), torch.arange(n_token))
    counts = torch.bincount(top_idx[:, 0], minlength=n_expert)
    assert set(counts.tolist()) <= {n_token // n_expert, -(-n_token // n_expert)} and counts.sum() == n_token
    assert (top_score == 1).all()


def test_hash_at_k_routes_to_k_distinct_experts_led_by_the_hash_with_gate_values_one_over_k():
    gate = hash_block(k=1).gate
    ids = torch.arange(V)
    hashed = gate(torch.zeros(V, D), ids)[0][:, 0]
    for k in (2, 3, E):
        gate.top_k = k
        top_idx, top_score, logits = gate(torch.zeros(V, D), ids, return_logits=True)
        assert top_idx.shape == (V, k) and all(len(set(row)) == k for row in top_idx.tolist())
        assert all(hashed[v].item() in top_idx[v].tolist() for v in range(V))
        torch.testing.assert_close(top_score, torch.full((V, k), 1 / k))
        probs = F.softmax(logits, -1)                                  # uniform over the chosen k, 0 elsewhere
        assert torch.equal((probs > 0).sum(-1), torch.full((V,), k))
        stats = RouterStats(E)
        stats.update(logits, top_idx)
        assert stats.mean_entropy == pytest.approx(math.log(k), abs=1e-6)


def test_the_hash_depends_on_the_seed_and_the_layer():
    tables = {(seed, layer): hash_block(seed, layer_index=layer, n_token=500).gate.expert_order
              for seed in (0, 1) for layer in (0, 1)}
    assert torch.equal(tables[(0, 0)], hash_block(0, layer_index=0, n_token=500).gate.expert_order)
    assert len({tuple(t[:, 0].tolist()) for t in tables.values()}) == 4


def test_the_hash_table_is_saved_and_loaded_with_the_model_and_has_no_parameters():
    saved = tiny_model(gate_name='hash', hash_seed=0)
    other = tiny_model(gate_name='hash', hash_seed=7)
    assert not any(p.numel() for block in saved.moe_layers for p in block.gate.parameters())
    key = 'layers.0.pos_ff.gate.expert_order'
    assert key in saved.state_dict() and not torch.equal(saved.state_dict()[key], other.state_dict()[key])
    other.load_state_dict(saved.state_dict())
    assert torch.equal(other.state_dict()[key], saved.state_dict()[key])


def test_the_hash_gate_without_token_ids_or_vocabulary_is_a_clear_error():
    with pytest.raises(ValueError, match='routes by token id'):
        hash_block().gate(torch.zeros(3, D))
    with pytest.raises(ValueError, match='vocabulary size'):
        HashGate(D, E)


# ----------------------------------------------------------------------------- X-MoE

def xmoe_gate(k=2, seed=0):
    torch.manual_seed(seed)
    gate = XMoEGate(D, E, top_k=k, dim=8)
    torch.nn.init.normal_(gate.project.weight)
    return gate


def test_xmoe_scores_are_the_cosine_over_the_temperature():
    gate = xmoe_gate()
    with torch.no_grad():
        gate.temperature.fill_(0.25)
    x = torch.randn(30, D)
    _, _, logits = gate(x, return_logits=True)
    expected = torch.empty(30, E)
    for t in range(30):
        h = gate.project.weight.detach() @ x[t]
        for e in range(E):
            emb = gate.expert_emb.detach()[e]
            expected[t, e] = (h @ emb) / (h.norm() * emb.norm()) / 0.25
    torch.testing.assert_close(logits, expected)
    assert logits.abs().max() <= 1 / 0.25 + 1e-5


def test_xmoe_scores_do_not_change_when_the_tokens_projection_is_scaled():
    gate = xmoe_gate()
    x = torch.randn(30, D)
    _, _, before = gate(x, return_logits=True)
    with torch.no_grad():
        gate.project.weight.mul_(7.5)
        gate.expert_emb.mul_(0.1)
    _, _, after = gate(x, return_logits=True)
    torch.testing.assert_close(after, before)
    torch.testing.assert_close(gate(3 * x, return_logits=True)[2], before)


def test_xmoe_gate_values_full_softmax_at_k_1_renormalised_over_the_top_k_above():
    gate = xmoe_gate()
    x = torch.randn(30, D)
    for k in (1, 2, 3):
        gate.top_k = k
        top_idx, top_score, logits = gate(x, return_logits=True)
        probs = logits.softmax(-1).gather(1, top_idx)
        torch.testing.assert_close(top_score, probs if k == 1 else probs / probs.sum(-1, keepdim=True))


def test_xmoe_starts_at_the_papers_temperature_and_trains_it_with_the_projection_and_embeddings():
    gate = XMoEGate(D, E, top_k=1)
    assert gate.temperature.item() == pytest.approx(0.07) and gate.project.weight.shape == (16, D)
    torch.testing.assert_close(gate.expert_emb.norm(dim=-1), torch.full((E,), 0.32))     # orthogonal rows, gain 0.32
    _, top_score = gate(torch.randn(20, D))
    top_score.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())
    with torch.no_grad():
        gate.temperature.fill_(-1.0)                                   # floored at 1e-4, never divides by <= 0
    assert torch.isfinite(gate(torch.randn(5, D), return_logits=True)[2]).all()
    assert XMoEGate.default_aux_losses == {'balance': 0.01}


def test_xmoe_balance_loss_reads_the_cosines_at_the_fixed_temperature_0_07_and_never_pushes_tau():
    """torchscale routing.py's TEMPERATURE_FOR_L_UAX: the balance loss E * sum_e f_e P_e with P_e the mean of
    softmax(cos / 0.07), whatever the learned tau; so its gradient reaches W and e but not tau."""
    gate = xmoe_gate(k=2)
    with torch.no_grad():
        gate.temperature.fill_(0.25)
    x = torch.randn(40, D)
    top_idx, top_score, logits = gate(x, return_logits=True)
    [loss] = aux_losses(gate, ('balance',), logits, top_idx, top_score).values()
    h = F.normalize(x @ gate.project.weight.detach().t(), dim=-1)
    cos = h @ F.normalize(gate.expert_emb.detach(), dim=-1).t()                 # [T, E] by hand
    frac = torch.bincount(top_idx.flatten(), minlength=E).float() / top_idx.numel()
    expected = E * (frac * F.softmax(cos / 0.07, -1).mean(0)).sum()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert gate.temperature.grad is None or gate.temperature.grad.item() == 0
    assert gate.project.weight.grad.abs().sum() > 0 and gate.expert_emb.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- DTS-Gate

def dts_gate(anneal=100, scale=1.0, threshold=0.001):
    torch.manual_seed(0)
    gate = DTSGate(D, E, top_k=2, max_temp=2.0, min_temp=0.3, anneal_steps=anneal, threshold=threshold)
    torch.nn.init.normal_(gate.gate.weight, std=scale)
    return gate


def hand_gumbel_weights(gate, x, seed, temperature):
    """softmax((x W^T + g) / tau) with the Gumbel noise g = -log(-log u) drawn as the gate draws it."""
    torch.manual_seed(seed)
    u = torch.rand(x.size(0), E).clamp(min=torch.finfo(torch.float32).tiny)
    return F.softmax((x @ gate.gate.weight.detach().t() - (-u.log()).log()) / temperature, -1)


def test_dts_temperature_decays_exponentially_from_max_to_min():
    gate = dts_gate(anneal=100)
    expected = {0: 2.0, 50: 2.0 * math.sqrt(0.3 / 2.0), 25: 2.0 * (0.3 / 2.0) ** 0.25, 100: 0.3, 1000: 0.3}
    for step, temperature in expected.items():
        gate.set_step(step)
        assert gate.temperature == pytest.approx(temperature)
    assert 2.0 * math.sqrt(0.15) == pytest.approx(0.7746, abs=1e-4)


def test_dts_is_dense_at_step_0():
    gate = dts_gate(scale=0.02)                                        # the model's init: logits near 0
    gate.set_step(0)
    x = torch.randn(64, D)
    top_idx, top_score = gate(x)
    assert top_idx.shape == (64, E) and (top_idx >= 0).all()           # every token to every expert
    torch.testing.assert_close(top_score.sum(-1), torch.ones(64))
    assert all(sorted(row) == list(range(E)) for row in top_idx.tolist())


def router_probs(gate, x):
    """softmax(x W^T) at temperature 1, computed here from the router's weight."""
    return F.softmax(x @ gate.gate.weight.detach().t(), -1)


def test_dts_keeps_the_experts_above_the_threshold_with_their_softmax_probabilities():
    """EvoMoE's default gate (topkgate.py, without --use-gumbel-gates): the Gumbel weights select, the gate
    value of a selected expert is its softmax(logits) probability at temperature 1, not renormalised."""
    gate = dts_gate(anneal=100, scale=3.0)                             # sharp logits, late in the annealing
    gate.set_step(90)
    x = torch.randn(64, D)
    torch.manual_seed(5)
    top_idx, top_score = gate(x)
    weights = hand_gumbel_weights(gate, x, 5, gate.temperature)
    probs = router_probs(gate, x)
    kept = weights > 0.001
    assert (~kept).any() and kept.any(-1).all()                        # some dropped, none left without an expert
    for t in range(64):
        chosen = sorted(e for e in top_idx[t].tolist() if e >= 0)
        assert chosen == kept[t].nonzero().flatten().tolist()
        routed = top_idx[t] >= 0
        torch.testing.assert_close(top_score[t][routed], probs[t, top_idx[t][routed]])
        assert (top_score[t][~routed] == 0).all()


def test_dts_is_top_k_of_the_noisy_logits_at_the_end_of_its_schedule():
    gate = dts_gate(anneal=100, scale=3.0)
    gate.set_step(100)
    x = torch.randn(64, D)
    torch.manual_seed(6)
    top_idx, top_score = gate(x)
    weights = hand_gumbel_weights(gate, x, 6, 0.3)
    assert top_idx.shape == (64, 2) and (top_idx >= 0).all()
    assert torch.equal(top_idx, weights.topk(2, -1).indices)
    torch.testing.assert_close(top_score, router_probs(gate, x).gather(1, top_idx))


def test_dts_evaluates_by_the_top_k_logits_with_the_gate_values_of_training():
    """Training and evaluation scale an expert alike: the value of an expert chosen in both is the same."""
    gate = dts_gate(anneal=100)
    x = torch.randn(64, D)
    probs = router_probs(gate, x)
    gate.eval()
    gate.set_step(0)                                                   # the step does not matter in evaluation
    for k in (1, 2, E):
        gate.top_k = k
        top_idx, top_score = gate(x)
        assert torch.equal(top_idx, probs.topk(k, -1).indices)
        torch.testing.assert_close(top_score, probs.gather(1, top_idx))
    gate.train().set_step(100)
    gate.top_k = 2
    train_idx, train_score = gate(x)
    gate.eval()
    eval_idx, eval_score = gate(x)
    same = train_idx == eval_idx
    assert same.any()
    torch.testing.assert_close(train_score[same], eval_score[same])


def test_dts_defaults_are_evomoes_flag_defaults():
    """fairseq/dataclass/configs.py of EvoMoE: --max-temperature 1.0, --min-temperature 0.5."""
    gate = DTSGate(D, E)
    assert (gate.max_temp, gate.min_temp, gate.threshold, gate.top_k) == (1.0, 0.5, 0.001, 1)
    args = train.parse_args(['--moe', '--gate_name', 'dts'])
    assert (args.dts_max_temp, args.dts_min_temp) == (1.0, 0.5)


def test_dts_router_gets_a_gradient_through_the_gate_values():
    gate = dts_gate()
    for step in (0, 100):
        gate.set_step(step)
        gate.zero_grad()
        _, top_score = gate(torch.randn(16, D))
        (top_score * torch.arange(top_score.size(1))).sum().backward()
        assert gate.gate.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- parameters (Table A4)

def test_each_routers_parameters_are_counted_as_router_parameters():
    per_layer = {'hash': 0, 'xmoe': D * 16 + E * 16 + 1, 'dts': D * E}     # no bias in the DTS router
    for name, count in per_layer.items():
        model = tiny_model(gate_name=name, moe_num_expert=E, d_model=D)
        counts = param_breakdown(model)
        assert counts['router'] == TINY['n_layer'] * count
        assert counts['router_embedding'] == counts['hypernetwork'] == counts['generated_router'] == 0
        assert counts['total'] == sum(p.numel() for p in model.parameters())
        _, status = analysis.param_row(model)
        assert status['router'] == ('F' if name == 'hash' else 'T')


# ----------------------------------------------------------------------------- end to end

RUN_ARGS = ['--dataset', 'synthetic', '--n_layer', '2', '--d_model', '16', '--n_head', '2', '--d_head', '8',
            '--d_inner', '16', '--tgt_len', '16', '--mem_len', '16', '--eval_tgt_len', '8', '--batch_size', '4',
            '--max_eval_steps', '2', '--moe', '--moe-num-expert', '4', '--max_step', '6', '--eval-interval', '3',
            '--log-interval', '1', '--lr', '0.01', '--eval_ks', '1,2']
# DTS-Gate: dense for 3 steps, then top-k. Threshold 0 keeps every expert in the dense phase: an expert dropped
# by the threshold is a -1 slot, which this engine does not skip yet (the gate's own tests cover the threshold)
ROUTERS = {'hash': ['--gate_name', 'hash', '--moe-top-k', '1', '--hash_seed', '3'],
           'xmoe': ['--gate_name', 'xmoe', '--moe-top-k', '2'],
           'dts': ['--gate_name', 'dts', '--moe-top-k', '1', '--dts_anneal_steps', '3', '--dts_threshold', '0']}
NAMES = {'hash': 'Hash', 'xmoe': 'X-MoE', 'dts': 'DTS-Gate'}


@pytest.fixture(scope='module')
def router_runs(tmp_path_factory):
    """{router: run directory} of 6-step runs on the built-in corpus."""
    root = tmp_path_factory.mktemp('router_runs')
    dirs = {}
    for name, flags in ROUTERS.items():
        work = str(root / name)
        train.main(['--data', str(root / 'synthetic'), '--work_dir', work, *RUN_ARGS, *flags])
        [dirs[name]] = glob.glob(f'{work}-synthetic/*')
    return dirs


def test_each_router_trains_and_is_tested_at_k_1_and_2(router_runs):
    for name, run_dir in router_runs.items():
        entries = evaluation.read_results(run_dir)
        assert entries['method'] == NAMES[name] and entries['gate'] == name
        assert set(entries['results']) == {'1', '2'} and all(math.isfinite(v) for v in entries['results'].values())


def test_a_hash_run_evaluates_with_the_table_of_its_checkpoint(router_runs):
    ckpt = evaluation.load_checkpoint(os.path.join(router_runs['hash'], 'model_best.pt'))
    assert ckpt['model_config']['router'] == {'name': 'hash', 'settings': {'seed': 3}}
    model = evaluation.model_from_checkpoint(dict(ckpt, model_config=dict(ckpt['model_config'], hash_seed=0)))
    key = 'layers.0.pos_ff.gate.expert_order'
    fresh = tiny_model(gate_name='hash', n_token=ckpt['model_config']['n_token'], hash_seed=0)
    assert torch.equal(model.state_dict()[key], ckpt['model'][key])
    assert not torch.equal(model.state_dict()[key], fresh.state_dict()[key])


def test_xmoe_logs_its_learned_temperature_per_layer_to_tensorboard(router_runs):
    """router/temperature/layer<i>: tau as it routes, the last record that of the saved checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = router_runs['xmoe']
    events = EventAccumulator(run_dir).Reload()
    model = torch.load(os.path.join(run_dir, 'checkpoint_last.pt'), weights_only=True)['model']
    for layer in range(2):
        last = events.Scalars(f'router/temperature/layer{layer}')[-1]
        saved = model[f'layers.{layer}.pos_ff.gate.temperature'].item()
        assert last.step == 6 and last.value == pytest.approx(saved, rel=1e-6)
        assert saved != pytest.approx(0.07, abs=1e-7)                           # it did learn
    tags = EventAccumulator(router_runs['hash']).Reload().Tags()['scalars']
    assert not any(tag.startswith('router/temperature') for tag in tags)        # no learned temperature, none logged


def test_a_dts_checkpoint_routes_densely_before_its_anneal_step_and_top_k_from_it(router_runs):
    with open(os.path.join(router_runs['dts'], 'config.json')) as f:
        assert '"dts_anneal_steps": 3' in f.read()
    ckpt = evaluation.load_checkpoint(os.path.join(router_runs['dts'], 'checkpoint_last.pt'))
    model = evaluation.model_from_checkpoint(ckpt).train()
    routed = []
    for step, width in ((2, 4), (3, 1)):
        for block in model.moe_layers:
            block.gate.set_step(step)
        handle = model.moe_layers[0].gate.register_forward_hook(lambda g, inp, out: routed.append(out[0].shape[1]))
        data = torch.randint(ckpt['model_config']['n_token'], (9, 2))
        model(data[:-1], data[1:])
        handle.remove()
        assert routed[-1] == width


@pytest.mark.parametrize('name', sorted(ROUTERS))
def test_resuming_gives_the_same_run_as_never_stopping(name, router_runs, tmp_path):
    work = str(tmp_path / 'split')
    data = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(router_runs[name]))), 'synthetic')
    common = ['--data', data, '--work_dir', work, *RUN_ARGS, *ROUTERS[name]]
    train.main([*common, '--stop_step', '3'])
    [split] = glob.glob(f'{work}-synthetic/*')
    train.main([*common, '--restart', '--restart_dir', split])
    final = [torch.load(os.path.join(d, 'checkpoint_last.pt'), weights_only=True)['model']
             for d in (router_runs[name], split)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.parametrize('command', [['--entropy'], ['--load'], ['--flops'], ['--params'],
                                     ['--jacobian', '--max_tokens', '40'], ['--routers', '--tokens', '3,12']])
def test_every_analysis_runs_on_each_router(command, router_runs, tmp_path, capsys):
    extra = ['--out', str(tmp_path / 'figure.png')] if command[0] == '--routers' else []
    eval_script.main([command[0], *router_runs.values(), *command[1:], '--max_eval_steps', '2', *extra])
    out = capsys.readouterr().out
    assert all(label in out for label in NAMES.values())


def test_hash_entropy_is_log_k_and_its_jacobian_has_no_router_term(router_runs, capsys):
    eval_script.main(['--entropy', router_runs['hash'], '--max_eval_steps', '2'])
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[0] == 'Hash' and float(row[1]) == pytest.approx(0.0, abs=1e-4)          # k = 1: log 1
    eval_script.main(['--entropy', router_runs['hash'], '--max_eval_steps', '2', '--k', '2'])
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert float(row[1]) == pytest.approx(math.log(2), abs=1e-4)
    eval_script.main(['--jacobian', router_runs['hash'], '--max_tokens', '40'])
    assert 'the routing does not read h' in capsys.readouterr().out


def test_bad_router_flags_are_clear_errors(capsys):
    for flags, message in ((['--xmoe_dim', '0'], '--xmoe_dim must be at least 1'),
                           (['--dts_min_temp', '3'], '--dts_min_temp'),
                           (['--dts_threshold', '1'], '--dts_threshold must be in'),
                           (['--dts_anneal_steps', '0'], '--dts_anneal_steps must be positive')):
        with pytest.raises(SystemExit):
            train.parse_args(['--moe', *flags])
        assert message in capsys.readouterr().err


def test_set_top_k_reaches_the_new_routers():
    for name in ROUTERS:
        model = tiny_model(gate_name=name)
        set_top_k(model, 3)
        assert all(block.gate.top_k == 3 for block in model.moe_layers)
