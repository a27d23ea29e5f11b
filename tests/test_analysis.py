"""The analyses (analysis.py, and eval.py's commands in analysis_commands.py) on constructed cases and on tiny
trained runs."""
import glob
import math
import os
import re

import pytest
import torch

import analysis
import analysis_commands
import eval as eval_script
import train
from mem_transformer import MemTransformerLM
from model_flops import SMALL, analytic_eval_flops
from moe import MoEPositionwiseFF, RouterStats
from tests.conftest import TINY, tiny_model

RUN_ARGS = ['--n_layer', '2', '--d_model', '16', '--n_head', '2', '--d_head', '8', '--d_inner', '16',
            '--tgt_len', '16', '--mem_len', '16', '--eval_tgt_len', '8', '--batch_size', '4', '--max_eval_steps', '2',
            '--moe', '--moe-num-expert', '4', '--moe-top-k', '2', '--max_step', '4', '--eval-interval', '2',
            '--log-interval', '2', '--lr', '0.01', '--eval_ks', '1,2,4']
DYNAMIC_K = ['--dynamic_moe', '--moe-top-k-min', '1', '--moe-top-k-max', '4']
METHODS = {'hyper_router': ['--gate_name', 'HyperRouterGate', *DYNAMIC_K],
           'smoe_dropout': ['--gate_name', 'CustomNaiveGate', '--freeze_gate', *DYNAMIC_K],
           'smoe': ['--gate_name', 'CustomNaiveGate']}


@pytest.fixture(scope='session')
def runs(tmp_path_factory):
    """{method: run directory} of 4-step runs of a 2-layer, 4-expert model on the built-in corpus."""
    root = tmp_path_factory.mktemp('analysis_runs')
    dirs = {}
    for method, flags in METHODS.items():
        work = str(root / method)
        train.main(['--dataset', 'synthetic', '--data', str(root / 'synthetic'), '--work_dir', work, *RUN_ARGS, *flags])
        [dirs[method]] = glob.glob(f'{work}-synthetic/*')
    return dirs


def one_window(tokens):
    """A single evaluation window and the run arguments that evaluate it."""
    args = {'tgt_len': 12, 'eval_tgt_len': 12, 'mem_len': 6, 'ext_len': 0}
    return [(tokens[:-1], tokens[1:], 12)], args


@torch.no_grad()
def set_routers(model, bias):
    for block in model.moe_layers:
        block.gate.gate.weight.zero_()
        block.gate.gate.bias.copy_(torch.tensor(bias))


def test_entropy_of_a_uniform_router_is_log_e_and_of_a_one_hot_router_zero(tokens):
    windows, args = one_window(tokens)
    uniform, one_hot = tiny_model(), tiny_model()
    set_routers(uniform, [0.0, 0.0, 0.0, 0.0])
    set_routers(one_hot, [1e4, 0.0, 0.0, 0.0])
    stats = {'uniform': analysis.router_stats(uniform, windows, args),
             'one-hot': analysis.router_stats(one_hot, windows, args)}
    for s in stats['uniform'].values():
        assert s.mean_entropy == pytest.approx(math.log(4)) and s.std_entropy == pytest.approx(0, abs=1e-5)
    for s in stats['one-hot'].values():
        assert s.mean_entropy == 0 and s.std_entropy == 0
        assert s.load_fraction[0] == 0.5                     # every token's first slot of k = 2
    table = analysis.format_entropy_table(stats).splitlines()
    assert table[0].split() == ['Method', 'Router', '1', 'Router', '2']
    assert table[1].split() == ['uniform', '1.3863', '±', '0.00', '1.3863', '±', '0.00']
    assert table[2].split() == ['one-hot', '0.0000', '±', '0.00', '0.0000', '±', '0.00']
    assert '50.0' in analysis.format_load_table('one-hot', stats['one-hot'])


def test_counted_flops_are_the_analytic_matmul_count_at_every_k():
    """FlopCounterMode on the inference path (the CPU attention kernel included) against bench's analytic count.

    The analytic count leaves out two small matmul terms of our implementation, added here exactly, per layer:
    the zero column padded to r_k for the position scores (shifted_position_scores), 2 B T H D; and at k = E
    the [T, E] @ [E, d] product that mixes the expert biases in Experts.run_all, 2 B T E d (below E, torch_moe
    sums each token's k weighted outputs elementwise, which is no matmul). On the paper's model they are
    0.01 % (k = 1) and 0.05 % (k = 16) of the total.
    """
    cfg = dict(TINY, moe=True, moe_num_expert=4, moe_top_k=1, gate_name='hyper_router')
    torch.manual_seed(0)
    model = MemTransformerLM(**cfg)
    bsz, qlen, mlen = 10, 8, 16
    n_layer, d, hd, n_expert = cfg['n_layer'], cfg['d_model'], cfg['n_head'] * cfg['d_head'], cfg['moe_num_expert']
    counted = {k: analysis.count_eval_flops(model, k, bsz, qlen, mlen) for k in range(1, n_expert + 1)}
    mix_biases = n_layer * 2 * bsz * qlen * n_expert * d
    for k, flops in counted.items():
        omitted = n_layer * 2 * bsz * qlen * hd + (mix_biases if k == n_expert else 0)
        assert flops == analytic_eval_flops(cfg, k, bsz, qlen, mlen) + omitted
    step = analytic_eval_flops(cfg, 2, bsz, qlen, mlen) - analytic_eval_flops(cfg, 1, bsz, qlen, mlen)
    assert [counted[k + 1] - counted[k] for k in range(1, n_expert)] == [step, step, step + mix_biases]


def test_thor_at_every_expert_counts_the_smoe_flops_less_the_router():
    """THOR has no router: at k = E it is the SMoE forward without the [T, d] @ [d, E] logits, per layer."""
    bsz, qlen, mlen = 10, 8, 16
    counted = {}
    for gate in ('smoe', 'thor'):
        model = tiny_model(gate_name=gate)
        counted[gate] = analysis.count_eval_flops(model, model.moe_layers[0].gate.tot_expert, bsz, qlen, mlen)
    cfg = dict(TINY, moe_num_expert=4)
    assert counted['smoe'] - counted['thor'] == cfg['n_layer'] * 2 * bsz * qlen * cfg['d_model'] * 4


def test_the_param_table_gets_a_hyper_expert_column_only_for_hypermoe():
    plain = analysis.param_row(tiny_model())
    hypermoe = analysis.param_row(tiny_model(moe_variant='hypermoe'))
    assert 'HyperExpert' not in analysis.format_param_table({'SMoE': plain})
    header, _, row, _ = analysis.format_param_table({'SMoE': plain, 'HyperMoE': hypermoe}).splitlines()
    assert header.split()[:6] == ['Method', 'Router', 'Emb.', 'Router', 'HyperNetwork', 'HyperExpert']
    assert f"{hypermoe[0]['hyper_expert']:,} (T)" in row and hypermoe[0]['hyper_expert'] > 0
    assert hypermoe[0]['transformer'] == plain[0]['transformer']


def test_the_spectrum_recovers_the_rank_of_a_constructed_case():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 16, generator=gen)                                # E = 3 router rows, d = 16
    spec = analysis.spectrum(torch.randn(500, 3, generator=gen) @ rows)     # 500 combinations of them
    assert spec['rank'] == 3 and 1 < spec['effective_rank'] <= 3
    assert spec['s'][3] < 1e-6 and spec['basis'].shape == (3, 16)
    row_basis = torch.linalg.qr(rows.double().T)[0].T
    overlap, angle = analysis.subspace_overlap(spec['basis'], row_basis)
    assert overlap == pytest.approx(1) and angle == pytest.approx(0, abs=1e-3)


def router_term_by_formula(block, h, grad_y):
    """Eq. 3 written out: sum_i c_i W_{r,i}, c_i = sum_j S_j (1_ji - S_i) E_j(h)^T dL/dy over the top k."""
    top_idx, score, _ = block.gate(h, return_logits=True)                               # [N, k]
    ex = block.experts
    hidden = torch.relu(torch.einsum('nd,nkhd->nkh', h, ex.htoh4.weight[top_idx]) + ex.htoh4.bias[top_idx])
    out = torch.einsum('nkh,nkdh->nkd', hidden, ex.h4toh.weight[top_idx]) + ex.h4toh.bias[top_idx]   # E_j(h)
    e_dot_g = torch.einsum('nkd,nd->nk', out, grad_y)
    c = score * e_dot_g - score * (score * e_dot_g).sum(-1, keepdim=True)             # [N, k]
    return torch.einsum('nk,nkd->nd', c, block.gate.gate.weight[top_idx]), c


def test_a_router_that_ignores_h_has_no_router_term():
    """THOR's random gate does not read h, so dL/dh has no router part: zero terms of rank 0."""
    model = tiny_model(gate_name='thor').eval()
    data = torch.randint(0, TINY['n_token'], (TINY['tgt_len'], 3))
    terms = analysis.router_terms(model, [(data, data, TINY['tgt_len'])], max_tokens=18)
    assert set(terms) == {0, 1} and all(not g.any() for g in terms.values())
    assert analysis.spectrum(terms[0])['rank'] == 0 and analysis.spectrum(terms[0][:0])['rank'] == 0


def random_block_and_inputs(num_expert, k):
    """An SMoE-Dropout block (d 16) with N(0, 1) parameters, 300 tokens h and an upstream gradient."""
    torch.manual_seed(0)
    block = MoEPositionwiseFF(16, 8, 0.0, num_expert=num_expert, top_k=k, gate_name='smoe_dropout',
                              backend='torch').eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
    return block, torch.randn(300, 16), torch.randn(300, 16)


def test_the_router_term_probe_is_eq_3_and_spans_e_minus_one_dimensions():
    """The autograd probe and the formula agree; the term lies in the span of the E = 3 router rows, and in
    fact of their differences (rank E - 1 = 2): the c_i of a token sum to zero (softmax shift invariance)."""
    block, h, grad_y = random_block_and_inputs(num_expert=3, k=2)
    with analysis.router_term_probe({0: block}) as deltas:
        (block.moe(h) * grad_y).sum().backward()
    probed = deltas[0][0].grad
    formula, c = router_term_by_formula(block, h, grad_y)
    torch.testing.assert_close(probed, formula.detach(), rtol=1e-4, atol=1e-4)
    assert c.sum(-1).abs().max() < 1e-4
    assert analysis.spectrum(probed)['rank'] == 2
    rows = analysis.spectrum(block.gate.gate.weight.detach())['basis']
    assert analysis.subspace_overlap(rows, analysis.spectrum(probed)['basis'])[0] == pytest.approx(1)


def test_init_is_the_model_train_py_started_from(runs):
    _, init = analysis.load_model(runs['smoe_dropout'], 'init')
    _, last = analysis.load_model(runs['smoe_dropout'], 'last')
    for a, b in zip(init.moe_layers, last.moe_layers):
        assert torch.equal(a.gate.gate.weight, b.gate.gate.weight)                 # frozen router
        assert not torch.equal(a.experts.htoh4.weight, b.experts.htoh4.weight)
    _, init = analysis.load_model(runs['hyper_router'], 'init')
    _, last = analysis.load_model(runs['hyper_router'], 'last')
    for a, b in zip(init.moe_layers, last.moe_layers):
        assert torch.equal(a.gate.hypernet[0].weight, b.gate.hypernet[0].weight)    # frozen hypernetwork
        assert not torch.equal(a.gate.embedding, b.gate.embedding)                # trained embedding


def test_a_fixed_router_keeps_its_span_and_every_span_has_at_most_e_minus_one_dimensions(runs):
    for method in ('smoe_dropout', 'hyper_router', 'smoe'):
        rows = analysis.jacobian_rows(runs[method], ['init', 'best', 'last'], max_tokens=160)
        assert {0, 4} <= {r['step'] for r in rows} and all(r['tokens'] == 160 for r in rows)
        assert all(1 <= r['rank'] <= 3 for r in rows)
        if method == 'smoe_dropout':
            assert all(r['overlap_first'] == pytest.approx(1) and r['union_rank'] <= 3 for r in rows)


def test_the_tables_have_the_papers_shape(runs, capsys):
    run_dirs = list(runs.values())
    eval_script.main(['--entropy', *run_dirs, '--max_eval_steps', '4'])
    header, *rows = capsys.readouterr().out.splitlines()[2:]
    assert header.split() == ['Method', 'Router', '1', 'Router', '2']
    assert [r.split()[0] for r in rows] == ['HyperRouter', 'SMoE-Dropout', 'SMoE']
    eval_script.main(['--params', *run_dirs])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:4]}
    assert '(G)' in rows['HyperRouter'] and '(F)' in rows['SMoE-Dropout'] and '(T)' in rows['SMoE']
    eval_script.main(['--flops', *run_dirs])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ['k', 'HyperRouter', 'SMoE-Dropout', 'SMoE']
    assert [line.split()[0] for line in lines[2:5]] == ['1', '2', '4']
    eval_script.main(['--jacobian', runs['smoe_dropout'], '--max_tokens', '80'])
    assert 'union rank' in capsys.readouterr().out


@pytest.mark.parametrize('command', [['--plot'], ['--routers', '--tokens', '3,12'], ['--load'],
                                     ['--jacobian', '--max_tokens', '80'], ['--diagram']])
def test_each_figure_command_writes_a_png(command, runs, tmp_path):
    out = str(tmp_path / 'figure.png')
    run_dirs = [] if command[0] == '--diagram' else list(runs.values())
    eval_script.main([command[0], *run_dirs, *command[1:], '--out', out, '--max_eval_steps', '2'])
    with open(out, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert os.path.getsize(out) > 5000


# ----------------------------------------------------------------------------- the paper's numbers, by hand

def hand_eval_flops(k, bsz=10, qlen=128, mlen=896, router=True):
    """Matmul FLOPs (2 per multiply-add) of one evaluation forward of the paper's small enwik8 model, counted
    by hand: 4 layers, d 256, 8 heads of 64, 16 experts of 512, 204 symbols, K = mlen + qlen keys."""
    d, hd, d_inner, n_expert, vocab, klen = 256, 8 * 64, 512, 16, 204, mlen + qlen
    tokens = bsz * qlen
    per_layer = (2 * bsz * klen * d * 3 * hd           # q, k, v of memory and segment
                 + 2 * klen * d * hd                   # r_net on the K relative positions
                 + 2 * tokens * klen * hd              # content scores
                 + 2 * tokens * (klen + 1) * hd        # position scores, against K + 1 columns (one zero pad)
                 + 2 * tokens * klen * hd              # probabilities @ values
                 + 2 * tokens * hd * d                 # o_net
                 + (2 * tokens * d * n_expert if router else 0)
                 + k * 2 * tokens * 2 * d * d_inner    # k experts per token, two Linear each
                 + (2 * tokens * n_expert * d if k == n_expert else 0))  # k = E: the biases mixed by a [T, E] @ [E, d]
    # (below E the k outputs are mixed elementwise, which FlopCounterMode, counting matmuls, leaves out)
    return 4 * per_layer + 2 * tokens * d * vocab      # tied softmax


def test_flops_of_the_papers_model_at_k_1_and_16():
    """The README's Table A3 figures: 5.36e10 at k = 1 and 9.39e10 at k = 16 (ratio 0.57) for one evaluation batch;
    counted here on one column (the count is linear in the batch but for r_net, which the hand count has)."""
    assert (hand_eval_flops(1), hand_eval_flops(16)) == (53_599_535_104, 93_906_796_544)
    assert round(hand_eval_flops(1) / hand_eval_flops(16), 2) == 0.57
    torch.manual_seed(0)
    model = MemTransformerLM(**dict(SMALL, gate_name='hyper_router'))
    for k in (1, 16):
        assert analysis.count_eval_flops(model, k, bsz=1) == hand_eval_flops(k, bsz=1)


def hand_param_counts():
    """Table A4 by hand for the paper's small enwik8 model (4 layers, d 256, 16 experts of 512, hyper_size 256)."""
    d, hd, n_layer, n_expert, d_inner, hyper, vocab = 256, 8 * 64, 4, 16, 512, 256, 204
    attention = 3 * hd * d + hd * d + hd * d + 2 * d                 # qkv, r_net, o_net (no biases), LayerNorm
    experts = n_expert * (d_inner * d + d_inner + d * d_inner + d) + 2 * d      # + LayerNorm
    transformer = vocab * d + n_layer * (attention + experts) + 2 * hd + vocab  # r_w/r_r biases, softmax bias
    router = n_layer * (n_expert * d + n_expert)
    hypernetwork = n_layer * (d * hyper + hyper + hyper * n_expert * (d + 1) + n_expert * (d + 1))
    return dict(router_embedding=n_layer * d, router=router, hypernetwork=hypernetwork, transformer=transformer)


def test_table_a4_of_the_papers_model(capsys):
    hand = hand_param_counts()
    assert hand == dict(router_embedding=1_024, router=16_448, hypernetwork=4 * 1_122_576, transformer=19_505_356)
    eval_script.main(['--params'])
    header, *lines = capsys.readouterr().out.splitlines()[:-1]
    titles = re.split(r'\s{2,}', header.strip())                          # Method, Router Emb., Router, ...
    rows = {cells[0]: dict(zip(titles, cells)) for cells in (re.split(r'\s{2,}', line.strip()) for line in lines)}
    counts = {key: f'{value:,}' for key, value in hand.items()}
    assert rows['SMoE']['Router Emb.'] == '-' and rows['SMoE']['Router'] == f"{counts['router']} (T)"
    assert rows['SMoE']['Transformer'] == f"{counts['transformer']} (T)" and rows['SMoE']['HyperNetwork'] == '-'
    assert rows['SMoE-Dropout']['Router'] == f"{counts['router']} (F)"
    assert [rows['HyperRouter'][t] for t in ('Router Emb.', 'Router', 'HyperNetwork', 'Transformer')] == [
        f"{counts['router_embedding']} (T)", f"{counts['router']} (G)", f"{counts['hypernetwork']} (F)",
        f"{counts['transformer']} (T)"]
    # the other routers' router column, by hand (4 layers, d 256, 16 experts): Switch, GShard, DTS-Gate a
    # linear router without bias; noisy top-k W_g and W_noise (HyperMoE's router too); X-MoE a 256 -> 16
    # projection, 16 expert embeddings of 16 and a temperature; THOR and Hash layers no router
    router = {'Switch': 4 * 16 * 256, 'GShard': 4 * 16 * 256, 'DTS-Gate': 4 * 16 * 256,
              'Noisy top-k': 4 * 2 * 16 * 256, 'HyperMoE': 4 * 2 * 16 * 256, 'X-MoE': 4 * (256 * 16 + 16 * 16 + 1)}
    assert {label: rows[label]['Router'] for label in router} == {label: f'{n:,} (T)' for label, n in router.items()}
    assert rows['THOR']['Router'] == rows['Hash']['Router'] == '-'
    assert rows['HyperMoE']['HyperExpert'] != '-' and rows['SMoE']['HyperExpert'] == '-'



def test_table_a3_without_runs_has_a_column_per_router_hypermoe_and_the_dense_twin(monkeypatch, capsys):
    """`eval.py --flops` with no run: the paper's model under every router (shrunk here to stay fast); THOR at
    k = E only, as the paper gives it."""
    monkeypatch.setattr(analysis_commands, 'SMALL', dict(SMALL, n_layer=1, moe_index='0', d_model=16, n_head=2,
                                                          d_head=8, d_inner=16, hyper_size=8, moe_num_expert=4))
    eval_script.main(['--flops', '--ks', '1,2,4', '--mem_len', '8'])
    header, *rows = capsys.readouterr().out.splitlines()[1:5]
    labels = ['SMoE', 'SMoE-Dropout', 'HyperRouter', 'THOR', 'Switch', 'GShard', 'Noisy top-k', 'Hash', 'X-MoE',
              'DTS-Gate', 'HyperMoE', 'Dense+Dropout', 'analytic']
    assert re.split(r'\s{2,}', header.strip()) == ['k', *labels]
    cells = {row.split()[0]: re.split(r'\s{2,}', row.strip())[1:] for row in rows}
    assert sorted(cells) == ['1', '2', '4']
    thor = labels.index('THOR')
    assert [cells[k][thor] for k in ('1', '2')] == ['-', '-'] and cells['4'][thor] != '-'


def test_entropy_of_a_constructed_router_is_its_analytic_value(tokens):
    """Every token gets the router softmax (1, 2, 3, 4) / 10: entropy -sum p ln p, whatever the token."""
    windows, args = one_window(tokens)
    model = tiny_model()
    set_routers(model, [math.log(1), math.log(2), math.log(3), math.log(4)])
    p = [0.1, 0.2, 0.3, 0.4]
    analytic = -sum(q * math.log(q) for q in p)                           # 1.2799 nats
    for s in analysis.router_stats(model, windows, args).values():
        assert s.mean_entropy == pytest.approx(analytic, rel=1e-6) and s.std_entropy == pytest.approx(0, abs=1e-3)


def test_entropy_statistics_over_tokens_of_two_kinds():
    """Half the tokens uniform over 4 experts (ln 4), half one-hot (0): mean ln 4 / 2, standard deviation ln 4 / 2."""
    stats = RouterStats(4)
    uniform, one_hot = torch.zeros(3, 4), torch.tensor([[1e4, 0.0, 0.0, 0.0]] * 3)
    stats.update(uniform, torch.zeros(3, 2, dtype=torch.long))
    stats.update(one_hot, torch.zeros(3, 2, dtype=torch.long))
    assert stats.mean_entropy == pytest.approx(math.log(4) / 2, rel=1e-6)
    assert stats.std_entropy == pytest.approx(math.log(4) / 2, rel=1e-5)


def test_spectrum_of_a_constructed_matrix_with_singular_values_4_2_1():
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(50, 3, generator=gen, dtype=torch.float64))[0]        # [N, 3] orthonormal
    v = torch.linalg.qr(torch.randn(16, 3, generator=gen, dtype=torch.float64))[0]        # [d, 3] orthonormal
    spec = analysis.spectrum(u @ torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)) @ v.T)
    assert spec['rank'] == 3
    torch.testing.assert_close(spec['s'][:3], torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))
    p = [4 / 7, 2 / 7, 1 / 7]
    assert spec['effective_rank'] == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-9)


def test_overlap_and_angle_of_spans_at_a_known_angle():
    theta = math.radians(30)
    first = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)             # span{e1, e3}
    turned = torch.tensor([[math.cos(theta), math.sin(theta), 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    overlap, angle = analysis.subspace_overlap(first, turned)
    assert overlap == pytest.approx((math.cos(theta) ** 2 + 1) / 2) and angle == pytest.approx(30)


@pytest.mark.parametrize('k,rank', [(1, 0), (2, 3), (4, 3)])
def test_router_term_rank_at_k_1_is_0_and_otherwise_e_minus_1(k, rank):
    """The scores are a softmax over the k chosen logits: at k = 1 the score is 1 whatever h, so the router
    term vanishes; from k = 2 on, token after token, it fills the E - 1 = 3 directions W_i - W_j."""
    block, h, grad_y = random_block_and_inputs(num_expert=4, k=k)
    with analysis.router_term_probe({0: block}) as deltas:
        (block.moe(h) * grad_y).sum().backward()
    assert analysis.spectrum(deltas[0][0].grad)['rank'] == rank
