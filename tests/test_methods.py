"""THOR (random routing, two passes, consistency loss) and HyperMoE (HyperExpert from the unselected experts)."""
import glob
import json
import os

import pytest
import torch
import torch.nn.functional as F

import eval as eval_script
import evaluation
import train
from custom_gate import RandomGate
from hyper_router import param_breakdown
from mem_transformer import ThorObjective, symmetric_kl
from hyper_expert import HyperExpert, HyperExpertGenerator, unique_sets
from moe import MoEPositionwiseFF, record_routing, switch_balance_loss
from tests.conftest import TINY, tiny_model

E, D, H = 6, 16, 12
HYPERMOE = dict(moe_variant='hypermoe', hypermoe_emb_dim=8, hypermoe_hidden=12, hypermoe_layer_emb_dim=3,
                hypermoe_adapter_dim=5)


def brute_force_experts(experts, x):
    """[E, T, d]: every expert on every token."""
    return torch.stack([F.linear(F.relu(F.linear(x, experts.htoh4.weight[e], experts.htoh4.bias[e])),
                                 experts.h4toh.weight[e], experts.h4toh.bias[e]) for e in range(E)])


def spread(module, std=0.5):
    """Well-spread parameters, so that the adapters are far from zero and nothing ties."""
    for p in module.parameters():
        p.data.normal_(0, std)
    return module


# ----------------------------------------------------------------------------- THOR

def route_records(model):
    """Collects the top_idx of every gate call of the model."""
    seen = []
    for block in model.moe_layers:
        block.gate.register_forward_hook(lambda gate, args, out: seen.append(out[0].clone()))
    return seen


def test_thor_two_passes_draw_different_experts(tokens):
    model = tiny_model(gate_name='thor', moe_num_expert=E, moe_top_k=1)
    seen = route_records(model)
    ThorObjective(model)(tokens[:-1], tokens[1:])
    assert len(seen) == 2 * len(model.moe_layers)                       # layer 0, layer 1, then again
    for first, second in zip(seen[:2], seen[2:]):
        assert not torch.equal(first, second)


def test_thor_consistency_is_zero_when_both_passes_draw_the_same(tokens):
    model = tiny_model(gate_name='thor', moe_num_expert=E, moe_top_k=2, dropout=0.1)
    objective = ThorObjective(model)
    state = torch.get_rng_state()
    nll, consistency = objective(tokens[:-1], tokens[1:])[:2]
    assert consistency.shape == nll.shape == (12, 3) and (consistency > 0).all()

    original = model._predicting_hidden

    def same_draws(*args):                  # both passes start from one RNG state: same experts, same dropout
        torch.set_rng_state(state)
        return original(*args)

    model._predicting_hidden = same_draws
    nll, consistency = objective(tokens[:-1], tokens[1:])[:2]
    assert consistency.abs().max() == 0
    torch.set_rng_state(state)
    torch.testing.assert_close(nll, model(tokens[:-1], tokens[1:])[0])  # the NLL of the ordinary forward


def test_symmetric_kl_is_the_mean_of_both_kl_directions():
    logp, logq = F.log_softmax(torch.randn(5, 7), -1), F.log_softmax(torch.randn(5, 7), -1)
    kl_pq = F.kl_div(logq, logp, log_target=True, reduction='none').sum(-1)     # KL(p || q)
    kl_qp = F.kl_div(logp, logq, log_target=True, reduction='none').sum(-1)
    torch.testing.assert_close(symmetric_kl(logp, logq), 0.5 * (kl_pq + kl_qp))


def test_forward_log_probs_gives_the_loss_of_forward_also_with_adaptive_softmax(tokens):
    model = tiny_model(cutoffs=[10, 20], div_val=2, tie_projs=[False, True, True]).eval()
    with torch.no_grad():
        nll, logp, _ = model.forward_log_probs(tokens[:-1], tokens[1:])
        torch.testing.assert_close(nll, model(tokens[:-1], tokens[1:])[0])
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(logp.size(0)))


def windows(tokens, n=3, length=4):
    return [(tokens[i * length:(i + 1) * length], tokens[i * length + 1:(i + 1) * length + 1], length)
            for i in range(n)]


def test_thor_random_inference_is_reproducible_and_leaves_the_training_rng_alone(tokens):
    model = tiny_model(gate_name='thor', moe_num_expert=E, moe_top_k=1)
    args = dict(tgt_len=4, eval_tgt_len=4, mem_len=6, ext_len=0)
    rng = torch.get_rng_state()
    first = evaluation.evaluate(model, windows(tokens), args)
    assert torch.equal(torch.get_rng_state(), rng)
    assert evaluation.evaluate(model, windows(tokens), args) == first
    assert model.training                                                 # evaluate restores the mode

    model.eval()
    seen = route_records(model)
    with torch.no_grad():
        model(tokens[:-1], tokens[1:])
    assert not torch.equal(seen[0], seen[1])                              # each layer draws its own experts


def test_thor_average_inference_is_the_mean_over_all_experts():
    torch.manual_seed(0)
    block = MoEPositionwiseFF(D, H, 0.0, num_expert=E, top_k=1, gate_name='thor',
                             router_settings={'inference': 'average'})
    spread(block).double().eval()
    x = torch.randn(20, D, dtype=torch.double)
    expected = brute_force_experts(block.experts, x).mean(0)
    for k in (1, 2, E):
        block.gate.top_k = k
        torch.testing.assert_close(block.moe(x), expected)
    block.gate.top_k = 2
    block.train()
    assert block.gate(x)[0].shape == (20, 2)                              # training still draws k random experts


def test_thor_gate_draws_uniformly_and_each_layer_seeds_its_own_evaluation_stream():
    gates = [RandomGate(D, E, top_k=2, eval_seed=seed) for seed in (0, 1)]
    x = torch.randn(3000, D)
    counts = torch.bincount(gates[0](x)[0].view(-1), minlength=E).float()
    assert (counts / counts.sum() - 1 / E).abs().max() < 0.02
    for gate in gates:
        gate.eval()
    draws = [gate(x)[0] for gate in gates]
    assert not torch.equal(draws[0], draws[1])
    gates[0].eval()                                                       # a new evaluation starts over
    assert torch.equal(gates[0](x)[0], draws[0])


# ----------------------------------------------------------------------------- HyperMoE

def hyper_expert(seed=0, layers=3, layer_index=1):
    torch.manual_seed(seed)
    generator = spread(HyperExpertGenerator(D, layers, cond_dim=8, hidden=12, layer_emb_dim=3, adapter_dim=5))
    return spread(HyperExpert(E, generator, layer_index)).double(), generator.double()


def per_token_reference(module, x, top_idx):
    """HyperExpert(x) token by token, straight from the definition."""
    outs = []
    for x_t, chosen in zip(x, top_idx.tolist()):
        unselected = sum(module.expert_emb.weight[e] for e in range(E) if e not in chosen)
        cond = module.mlp(unselected[None])                               # [1, c]
        w_down, b_down, w_up, b_up = (w[0] for w in module.generator(cond, module.layer_index))
        outs.append(F.relu(x_t @ w_down + b_down) @ w_up + b_up)
    return torch.stack(outs)


@pytest.mark.parametrize('path', ['grouped', 'gathered'])
def test_one_adapter_per_expert_set_equals_one_per_token(path):
    module, generator = hyper_expert()
    module.grouped_max_sets = 10 ** 9 if path == 'grouped' else 0
    params = {**dict(module.named_parameters()), **dict(generator.named_parameters(prefix='generator'))}
    x = torch.randn(40, D, dtype=torch.double, requires_grad=True)
    pairs = torch.tensor([[a, 3 + b] for a in range(3) for b in range(3)])
    top_idx = pairs[torch.arange(40) % 9][torch.randperm(40)]            # 9 distinct sets, shared by 4-5 tokens
    top_idx[::2] = top_idx[::2].flip(1)                                   # a set is a set in any order
    assert unique_sets(top_idx)[0].size(0) == 9

    def run(fn):
        for p in params.values():
            p.grad = None
        x.grad = None
        y = fn()
        y.pow(2).sum().backward()
        return y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in params.items()}

    y_set, gx_set, g_set = run(lambda: module(x, top_idx))
    y_tok, gx_tok, g_tok = run(lambda: module(x, top_idx, per_set=False))
    y_ref = per_token_reference(module, x, top_idx)
    torch.testing.assert_close(y_set, y_ref.detach())
    torch.testing.assert_close(y_tok, y_ref.detach())
    torch.testing.assert_close(gx_set, gx_tok)
    for name in g_set:
        torch.testing.assert_close(g_set[name], g_tok[name], msg=name)


@pytest.mark.parametrize('k', [1, 2, E - 1])
def test_unselected_sum_adds_the_embeddings_of_the_other_experts(k):
    module, _ = hyper_expert()
    sets = torch.rand(10, E).topk(k, -1).indices
    expected = torch.stack([sum(module.expert_emb.weight[e] for e in range(E) if e not in row)
                            for row in sets.tolist()])
    torch.testing.assert_close(module.unselected_sum(sets), expected)


def test_the_generator_knows_the_layer_it_generates_for():
    module, generator = hyper_expert()
    cond = torch.randn(4, 8, dtype=torch.double)
    assert not torch.equal(generator(cond, 0)[0], generator(cond, 1)[0])


def test_with_the_generator_zeroed_the_model_is_its_plain_moe_twin(tokens):
    model = tiny_model(**HYPERMOE)
    plain = tiny_model()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all('hyper_expert' in key for key in unexpected)
    with torch.no_grad():
        for head in (model.hyper_expert_generator.w_down, model.hyper_expert_generator.b_down,
                     model.hyper_expert_generator.w_up, model.hyper_expert_generator.b_up):
            head.weight.zero_()
            head.bias.zero_()
        torch.testing.assert_close(model.eval()(tokens[:-1], tokens[1:])[0], plain.eval()(tokens[:-1], tokens[1:])[0])


def test_a_fresh_hypermoe_model_starts_near_its_plain_twin(tokens):
    model, plain = tiny_model(**HYPERMOE).eval(), tiny_model().eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        diff = model(tokens[:-1], tokens[1:])[0] - plain(tokens[:-1], tokens[1:])[0]
    assert 0 < diff.abs().max() < 1e-3                                    # N(0, 0.02) weights, zero biases


def test_hypermoe_modules_take_the_backbones_init_as_in_the_published_lm_path():
    """HyperMoE's GPT-2 LM code re-initialises its modules with GPT-2's init: every Linear and Embedding
    N(0, initializer_range = 0.02), biases zero (its adapter code's hyperfan-in is overwritten)."""
    model = tiny_model(moe_variant='hypermoe', hypermoe_emb_dim=64, hypermoe_hidden=64, hypermoe_layer_emb_dim=32,
                       hypermoe_adapter_dim=16, moe_num_expert=E)
    hyper = {n: p for n, p in model.named_parameters() if 'hyper_expert' in n}
    weights = [n for n in hyper if n.endswith('weight')]
    assert len(weights) == 6 + 3 * TINY['n_layer']          # layer_emb, body, 4 heads; per layer expert_emb, 2 mlp
    for name in weights:
        assert hyper[name].mean().abs() < 0.005 and abs(hyper[name].std().item() - 0.02) < 0.004, name
    assert all(hyper[n].abs().max() == 0 for n in hyper if n.endswith('bias'))


def test_block_dropout_drops_the_experts_mixture_but_not_the_hyper_expert():
    """With dropout p = 1 in training, the block is LayerNorm(input + HyperExpert(input)), computed here by
    hand: the SMoE router's top 2 by sorting its logits, the HyperExpert token by token from its definition."""
    module, generator = hyper_expert()
    block = MoEPositionwiseFF(D, H, dropout=1.0, num_expert=E, top_k=2, gate_name='smoe',
                              layer_index=module.layer_index, hyper_expert_generator=generator).double().train()
    spread(block.gate), spread(block.experts)
    block.hyper_expert.load_state_dict(module.state_dict())
    inp = torch.randn(5, 3, D, dtype=torch.double)                       # [T, B, d]
    x = inp.reshape(-1, D)
    logits = x @ block.gate.gate.weight.T + block.gate.gate.bias
    top_idx = torch.tensor([sorted(range(E), key=lambda e: -row[e].item())[:2] for row in logits])
    v = x + per_token_reference(module, x, top_idx)
    expected = (v - v.mean(-1, keepdim=True)) / (v.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    expected = expected * block.layer_norm.weight + block.layer_norm.bias
    with torch.no_grad():
        torch.testing.assert_close(block(inp).reshape(-1, D), expected)
        plain = spread(MoEPositionwiseFF(D, H, dropout=1.0, num_expert=E, top_k=2, gate_name='smoe')).double()
        assert torch.equal(plain(inp), plain.layer_norm(inp))            # without it, the input alone


def test_the_generator_is_one_module_shared_by_every_layer_and_saved_once():
    model = tiny_model(**HYPERMOE, moe_num_expert=E)
    generator = model.hyper_expert_generator
    assert all(block.hyper_expert.generator is generator for block in model.moe_layers)
    keys = [k for k in model.state_dict() if 'hyper' in k]
    generator_keys = ['layer_emb.weight', 'body.0.weight', 'body.0.bias'] + [
        f'{head}.{p}' for head in ('w_down', 'b_down', 'w_up', 'b_up') for p in ('weight', 'bias')]
    per_layer = ['expert_emb.weight', 'mlp.0.weight', 'mlp.0.bias', 'mlp.2.weight', 'mlp.2.bias']
    assert keys == ([f'hyper_expert_generator.{k}' for k in generator_keys]
                    + [f'layers.{i}.pos_ff.hyper_expert.{k}' for i in (0, 1) for k in per_layer])
    c, h, b, d, n_layer = 8, 12, 5, TINY['d_model'], TINY['n_layer']
    generator_size = n_layer * 3 + (c + 3) * h + h + (h + 1) * (2 * d * b + b + d)
    layer_size = E * c + 2 * (c * c + c)
    assert sum(p.numel() for p in generator.parameters()) == generator_size
    counts = param_breakdown(model)
    assert counts['hyper_expert'] == generator_size + n_layer * layer_size
    assert [n for n, _ in model.named_parameters(remove_duplicate=False) if n.endswith('w_down.weight')] == [
        'hyper_expert_generator.w_down.weight']
    assert counts['transformer'] + counts['router'] + counts['hyper_expert'] == counts['total']


def test_plain_models_have_no_hypermoe_parameters():
    model = tiny_model()
    assert model.hyper_expert_generator is None and all(block.hyper_expert is None for block in model.moe_layers)
    assert not [k for k in model.state_dict() if 'hyper' in k] and param_breakdown(model)['hyper_expert'] == 0


def test_gradients_reach_the_expert_embeddings_the_mlp_and_the_generator(tokens):
    model = tiny_model(**HYPERMOE)
    model(tokens[:-1], tokens[1:])[0].mean().backward()
    hyper = {n: p for n, p in model.named_parameters() if 'hyper_expert' in n}
    assert len(hyper) == 11 + 5 * TINY['n_layer']
    for name, p in hyper.items():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize('gate_name', ['hyper_router', 'smoe_dropout', 'thor'])
def test_hypermoe_runs_on_any_router(gate_name, tokens):
    model = tiny_model(gate_name=gate_name, **HYPERMOE)
    model(tokens[:-1], tokens[1:])[0].mean().backward()
    assert model.hyper_expert_generator.w_down.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(tokens[:-1], tokens[1:])[0]).all()


# ----------------------------------------------------------------------------- load balancing

def test_balance_loss_is_one_for_a_balanced_uniform_router_and_e_when_collapsed():
    uniform, balanced = torch.zeros(6, E), torch.arange(12).view(6, 2) % E          # every expert twice
    assert switch_balance_loss(uniform, balanced).item() == pytest.approx(1.0)
    collapsed = torch.full((12, E), -1e4).index_fill(1, torch.tensor([0]), 0.0)
    assert switch_balance_loss(collapsed, torch.zeros(12, 1, dtype=torch.long)).item() == pytest.approx(E)


def test_recorded_balance_losses_train_the_router(tokens):
    model = tiny_model(gate_name='smoe')
    with record_routing(model, ('balance',)) as record:
        model(tokens[:-1], tokens[1:])
    losses = record.losses['balance']
    assert len(losses) == len(model.moe_layers) and all(loss.requires_grad for loss in losses)
    record.loss_sums()['balance'].backward()
    assert all(block.gate.gate.weight.grad.abs().sum() > 0 for block in model.moe_layers)
    assert all(block.record is None for block in model.moe_layers)      # recording stops with the block


# ----------------------------------------------------------------------------- training runs

TINY_ARGS = ['--dataset', 'synthetic', '--n_layer', '2', '--d_model', '16', '--n_head', '2', '--d_head', '8',
             '--d_inner', '16', '--tgt_len', '16', '--mem_len', '16', '--eval_tgt_len', '8', '--batch_size', '4',
             '--max_eval_steps', '2', '--eval_ks', '1,4', '--moe', '--moe-num-expert', '4', '--moe-top-k', '1',
             '--hypermoe_emb_dim', '8', '--hypermoe_hidden', '8', '--hypermoe_adapter_dim', '4']



def read_metrics(run_dir, split='train'):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['split'] == split]


def test_thor_with_hypermoe_and_load_balance_trains_logs_its_terms_and_resumes_exactly(tmp_path, synthetic_dir):
    common = [*TINY_ARGS, '--data', synthetic_dir, '--gate_name', 'thor', '--moe_variant', 'hypermoe',
              '--load_balance', '0.01', '--max_step', '4', '--eval-interval', '2', '--log-interval', '1']
    runs = {}
    for name, extra in (('whole', []), ('split', ['--stop_step', '2'])):
        train.main([*common, '--work_dir', str(tmp_path / name), *extra])
        [runs[name]] = glob.glob(str(tmp_path / f'{name}-synthetic' / '*'))
    train.main([*common, '--restart', '--restart_dir', runs['split']])
    rows = {name: [{k: v for k, v in r.items() if k != 'tokens_per_s'} for r in read_metrics(run_dir)]
            for name, run_dir in runs.items()}
    assert rows['split'] == rows['whole'] and len(rows['whole']) == 4
    assert read_metrics(runs['split'], 'valid') == read_metrics(runs['whole'], 'valid')
    assert all(r['consistency'] > 0 for r in rows['whole'])
    aux = read_metrics(runs['whole'], 'aux')
    assert len(aux) == 4 and all(r['balance'] > 0 for r in aux)
    with open(os.path.join(runs['whole'], 'train.log')) as f:
        log = f.read()
        assert '| consistency ' in log and '| balance ' in log
    final = [torch.load(os.path.join(d, 'checkpoint_last.pt'), weights_only=True)['model'] for d in runs.values()]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    with open(os.path.join(runs['whole'], 'results.json')) as f:
        entries = json.load(f)
    assert {e['method'] for e in entries} == {'THOR+HyperMoE'} and all(set(e['results']) == {'1', '4'}
                                                                        for e in entries)


def test_eval_can_switch_a_thor_run_to_average_inference(tmp_path, synthetic_dir):
    work = str(tmp_path / 'thor')
    train.main([*TINY_ARGS, '--data', synthetic_dir, '--work_dir', work, '--gate_name', 'thor', '--max_step', '2',
                '--eval-interval', '2'])
    [run_dir] = glob.glob(f'{work}-synthetic/*')
    results = {}
    for mode in ('random', 'average'):
        out = str(tmp_path / f'{mode}.json')
        eval_script.main(['--run', run_dir, '--ks', '1,4', '--max_eval_steps', '2', '--thor_inference', mode,
                         '--json', out])
        with open(out) as f:
            [entry, *_] = json.load(f)
        assert entry['thor_inference'] == mode
        results[mode] = entry['results']
    assert results['average']['1'] == results['average']['4'] == results['random']['4']   # k = E: every expert
    assert results['random']['1'] != results['random']['4']


def test_thor_inference_is_refused_for_other_routers(tmp_path, capsys):
    with open(tmp_path / 'config.json', 'w') as f:
        json.dump({'args': {'moe': True, 'gate_name': 'CustomNaiveGate'}}, f)
    with pytest.raises(SystemExit):
        eval_script.main(['--run', str(tmp_path), '--thor_inference', 'average'])
    assert '--thor_inference applies to THOR runs' in capsys.readouterr().err


@pytest.mark.parametrize('gate_name,flag', [('thor', '--thor_alpha'), ('smoe', '--load_balance')])
def test_the_weight_of_each_extra_term_enters_the_update(gate_name, flag, tmp_path, synthetic_dir):
    losses = {}
    for weight in ('0', '10'):
        work = str(tmp_path / weight)
        train.main([*TINY_ARGS, '--data', synthetic_dir, '--work_dir', work, '--gate_name', gate_name, flag, weight,
                    '--max_step', '2', '--eval-interval', '2', '--log-interval', '1'])
        [run_dir] = glob.glob(f'{work}-synthetic/*')
        losses[weight] = [r['loss'] for r in read_metrics(run_dir)]
    assert losses['10'][0] == losses['0'][0] and losses['10'][1] != losses['0'][1]   # same first step, other update


@pytest.mark.parametrize('config,name', [
    (dict(moe=True, gate_name='thor'), 'THOR'), (dict(moe=True, gate_name='RandomGate'), 'THOR'),
    (dict(moe=True, gate_name='CustomNaiveGate', moe_variant='hypermoe'), 'SMoE+HyperMoE'),
    (dict(moe=True, gate_name='noisy_topk', moe_variant='hypermoe'), 'HyperMoE'),
    (dict(moe=True, gate_name='HyperRouterGate', moe_variant='hypermoe'), 'HyperRouter+HyperMoE'),
    (dict(moe=True, gate_name='smoe_dropout', moe_variant='plain'), 'SMoE-Dropout'),
    (dict(moe=True, gate_name='smoe'), 'SMoE'),                            # configs saved before moe_variant
    (dict(moe=True, gate_name='switch'), 'Switch'), (dict(moe=True, gate_name='gshard'), 'GShard'),
    (dict(moe=True, gate_name='noisy_topk'), 'Noisy top-k'),
])
def test_method_names(config, name):
    assert evaluation.method_name(dict(config, dropout=0.1)) == name


@pytest.mark.parametrize('extra,message', [
    (['--moe_variant', 'hypermoe'], '--moe_variant hypermoe needs --moe'),
    (['--load_balance', '0.01'], '--balance_loss needs --moe'),
    (['--moe', '--load_balance', '-1'], 'must be non-negative'),
    (['--moe', '--gate_name', 'thor', '--thor_inference', 'mean'], "invalid choice: 'mean'"),
])
def test_bad_method_flags_are_clear_errors(extra, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(extra)
    assert message in capsys.readouterr().err
