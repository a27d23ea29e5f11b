"""The fast paths against their references: grouped GEMM, no host sync, fused attention, TF32, --compile."""
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from mem_transformer import RelativeAttentionProbs, shifted_position_scores
from model_flops import analytic_forward_flops
from hyper_expert import HyperExpert, HyperExpertGenerator, run_adapters
from moe import MoEPositionwiseFF, describe_engine
from moe_engine import choose_engine, group_ends, grouped_mm, grouped_mm_problem
from tests.conftest import HostSync, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loop_grouped_mm(a, b, counts):
    """The reference: rows of a grouped by `counts`, group g times b[g]."""
    return torch.cat([chunk @ b[g] for g, chunk in enumerate(a.split(counts))])


@pytest.mark.device
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_grouped_mm_sum_backward_matches_the_loop_with_an_empty_group(dtype, device):
    if grouped_mm_problem(device, dtype, (16, 8)):
        pytest.skip(grouped_mm_problem(device, dtype, (16, 8)))
    counts = [3, 0, 6, 2]                                               # group 1 is empty
    a = torch.randn(11, 16, device=device).to(dtype).requires_grad_()
    b = torch.randn(4, 16, 8, device=device).to(dtype).requires_grad_()
    ends = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    grouped_mm(a, b, ends).sum().backward()                        # an expanded (stride-0) gradient
    a_ref, b_ref = (t.detach().double().requires_grad_() for t in (a, b))
    loop_grouped_mm(a_ref, b_ref, counts).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a.grad.double(), a_ref.grad, atol=tol * 16, rtol=tol)
    torch.testing.assert_close(b.grad.double(), b_ref.grad, atol=tol * 16, rtol=tol)
    assert (b.grad[1] == 0).all()


def test_group_ends_are_the_cumulative_counts():
    sorted_group = torch.tensor([0, 0, 2, 2, 2, 3])
    assert group_ends(sorted_group, 5).tolist() == [2, 2, 5, 6, 6]
    assert group_ends(sorted_group, 5).dtype == torch.int32


def test_engine_choice_falls_back_to_the_loop_and_says_why():
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert choose_engine('grouped', cpu, torch.float32, (256, 512)) == ('grouped', 'asked for')
    assert choose_engine('grouped', cpu, torch.bfloat16, (256, 512)) == ('grouped', 'asked for')
    engine, reason = choose_engine('auto', cpu, torch.float32, (256, 512))    # measured faster on CPU
    assert engine == 'loop' and 'faster than grouped_mm on CPU' in reason
    engine, reason = choose_engine('auto', cpu, torch.float64, (256, 512))
    assert engine == 'loop' and 'fp32 or bf16' in reason
    engine, reason = choose_engine('auto', cuda, torch.float32, (256, 512))     # CUDA fp32: the loop, as the issue says
    assert engine == 'loop' and 'needs bf16' in reason
    engine, reason = choose_engine('auto', cpu, torch.float32, (256, 13))      # 52-byte rows
    assert engine == 'loop' and '16 bytes' in reason
    assert choose_engine('loop', cpu, torch.float32, (256, 512)) == ('loop', 'asked for')
    with pytest.raises(ValueError, match='moe_engine grouped cannot run: .*fp32 or bf16'):
        choose_engine('grouped', cpu, torch.float64, (256, 512))
    with pytest.raises(ValueError, match='unknown moe_engine'):
        choose_engine('fast', cpu, torch.float32, (256, 512))


def test_grouped_engine_where_it_cannot_run_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(['--moe', '--moe_engine', 'grouped', '--d_inner', '13'])
    assert 'error: --moe_engine grouped cannot run: grouped_mm needs widths' in capsys.readouterr().err


@pytest.mark.parametrize('gate_name', ['smoe', 'hyper_router', 'thor'])
def test_grouped_path_reads_nothing_back_to_the_host_forward_and_backward(gate_name, no_host_sync):
    torch.manual_seed(0)
    block = MoEPositionwiseFF(16, 32, 0.1, num_expert=4, top_k=2, gate_name=gate_name, engine='grouped')
    x = torch.randn(7, 3, 16, requires_grad=True)
    block(x).sum().backward()
    assert x.grad is not None and block.experts.htoh4.weight.grad is not None
    loop = MoEPositionwiseFF(16, 32, 0.1, num_expert=4, top_k=2, gate_name=gate_name, engine='loop')
    with pytest.raises(HostSync):                                        # the guard does catch the loop's counts
        loop(x)


def test_grouped_adapters_read_nothing_back_to_the_host(no_host_sync):
    x = torch.randn(10, 16, requires_grad=True)
    token_set = torch.tensor([2, 0, 2, 1, 0, 2, 2, 0, 1, 1])
    weights = [torch.randn(3, 16, 8), torch.randn(3, 8), torch.randn(3, 8, 16), torch.randn(3, 16)]
    run_adapters(x, token_set, *weights, engine='grouped').sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize('engine', ['grouped', 'loop'])
def test_hyper_expert_gives_the_per_token_definition_with_either_engine(engine):
    torch.manual_seed(0)
    generator = HyperExpertGenerator(16, 2, cond_dim=8, hidden=12, layer_emb_dim=3, adapter_dim=8)
    for p in generator.parameters():
        p.data.normal_(0, 0.3)
    module = HyperExpert(4, generator, layer_index=1, engine=engine)
    x = torch.randn(30, 16)
    top_idx = torch.rand(30, 4).topk(2, -1).indices
    per_token = module(x, top_idx, per_set=False)     # one adapter per token, gathered: no grouping at all
    torch.testing.assert_close(module(x, top_idx), per_token, atol=1e-5, rtol=1e-5)


def test_the_training_log_names_the_engine_once(tmp_path):
    run_dir = run_tiny_training(tmp_path, '--max_step', '1')
    with open(os.path.join(run_dir, 'train.log')) as f:
        assert 'moe engine: loop (auto: faster than grouped_mm on CPU' in f.read()
    run_dir = run_tiny_training(tmp_path / 'grouped', '--max_step', '1', '--moe_engine', 'grouped')
    with open(os.path.join(run_dir, 'train.log')) as f:
        lines = [line for line in f if 'moe engine' in line]
    assert len(lines) == 1 and 'moe engine: grouped (asked for; torch.float32 on cpu)' in lines[0]


def test_under_torch_compile_auto_takes_the_grouped_engine_on_cpu_too():
    cpu = torch.device('cpu')
    assert choose_engine('auto', cpu, torch.float32, (16, 16), compiling=True)[0] == 'grouped'
    assert choose_engine('auto', cpu, torch.float64, (16, 16), compiling=True)[0] == 'loop'
    assert describe_engine(tiny_model(d_inner=16), 'cpu', torch.float32, compiling=True).startswith(
        'moe engine: grouped (auto: grouped_mm runs here, and torch.compile gets one graph')


def test_describe_engine_of_a_float64_model_is_the_loop():
    model = tiny_model().double()
    assert describe_engine(model, 'cpu', torch.float64).startswith('moe engine: loop (auto: grouped_mm on CPU')


# ---------------------------------------------------------------- attention

def loss_and_grads(model, tokens, fused):
    for layer in model.layers:
        layer.dec_attn.fused_in_training = fused
    model.zero_grad()
    out = model(tokens[:6], tokens[1:7])
    out = model(tokens[6:12], tokens[7:13], *out[1:])                   # the second segment attends to memory
    out[0].mean().backward()
    return out[0].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.device
@pytest.mark.parametrize('same_length', [False, True])
def test_fused_attention_in_training_gives_the_explicit_loss_and_gradients(same_length, tokens, device):
    model = tiny_model(mem_len=6, same_length=same_length, moe=False).to(device).train()
    tokens = tokens.to(device)
    loss_fused, grads_fused = loss_and_grads(model, tokens, fused=True)
    loss_explicit, grads_explicit = loss_and_grads(model, tokens, fused=False)
    torch.testing.assert_close(loss_fused, loss_explicit, atol=1e-5, rtol=1e-5)
    assert grads_fused.keys() == grads_explicit.keys() and 'r_r_bias' in grads_fused   # BD's own parameter
    for name in grads_explicit:
        torch.testing.assert_close(grads_fused[name], grads_explicit[name], atol=1e-5, rtol=1e-5, msg=name)


def test_each_device_trains_with_its_faster_attention():
    attn = tiny_model().layers[0].dec_attn
    q = torch.randn(2, 1, 3, 8, requires_grad=True)
    assert not attn._fused(q, q)                                        # CPU: RelativeAttentionProbs (faster)
    with torch.no_grad():
        assert attn._fused(q, q)                                        # inference: always fused
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert attn._fused(q, q)                                        # bf16 autocast: SDPA
    attn.fused_in_training = True
    assert attn._fused(q, q)


def attention_inputs(dtype, n_head=2, bsz=3, qlen=5, mlen=4, d_head=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    klen = qlen + mlen
    shapes = [(n_head, bsz, qlen, d_head), (n_head, bsz, qlen, d_head), (n_head, bsz, klen, d_head),
              (n_head, d_head, klen)]
    return [torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_() for shape in shapes]


def attention_masks(qlen=5, mlen=4):
    future = torch.triu(torch.ones(qlen, qlen + mlen, dtype=torch.bool), 1 + mlen)
    too_far = torch.tril(torch.ones(qlen, qlen + mlen, dtype=torch.bool), -2)   # as same_length hides old keys
    return {'future': future, 'future and too far': future | too_far}


def naive_attention_probs(q_content, q_position, k, r_k, mask):
    """The definition entry by entry: softmax_j(q_c[i] . k[j] + q_p[i] . r_k[:, column of distance M + i - j])."""
    qlen, klen = mask.shape
    i, j = torch.arange(qlen)[:, None], torch.arange(klen)[None]
    column = (klen - 1 - (klen - qlen + i - j)).clamp(0, klen - 1)      # [T, K]; the future is masked anyway
    position = torch.einsum('hbtd,hdtk->hbtk', q_position, r_k[:, :, column])
    score = torch.einsum('hbtd,hbkd->hbtk', q_content, k) + position
    return score.masked_fill(mask, float('-inf')).softmax(-1)


def probs_and_grads(probs_fn, inputs, weight):
    prob = probs_fn(*inputs)
    grads = torch.autograd.grad((prob * weight).sum(), inputs)
    return prob, grads


@pytest.mark.parametrize('mask_name', ['future', 'future and too far'])
def test_relative_attention_probs_and_their_gradients_match_the_definition(mask_name):
    mask = attention_masks()[mask_name]
    inputs = attention_inputs(torch.float64)
    mask_bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask, float('-inf'))
    weight = torch.randn(2, 3, 5, 9, dtype=torch.float64)
    prob, grads = probs_and_grads(lambda *x: RelativeAttentionProbs.apply(*x, mask_bias), inputs, weight)
    prob_ref, grads_ref = probs_and_grads(lambda *x: naive_attention_probs(*x, mask), inputs, weight)
    torch.testing.assert_close(prob, prob_ref, atol=1e-12, rtol=1e-12)
    for name, grad, grad_ref in zip(['q_content', 'q_position', 'k', 'r_k'], grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=1e-12, msg=name)


def test_relative_attention_probs_are_autograd_in_float32():
    """The written-out backward keeps autograd's numbers in fp32: the probabilities and the query and position
    gradients bit for bit; the key gradient within fp32 rounding, since it is one matmul whose operands are
    laid out otherwise than autograd's, and some BLAS builds (seen on an AMD EPYC) pick another kernel for it."""
    mask = attention_masks(qlen=16, mlen=16)['future']
    inputs = attention_inputs(torch.float32, n_head=4, bsz=2, qlen=16, mlen=16, d_head=8)
    mask_bias = torch.zeros(mask.shape).masked_fill(mask, float('-inf'))
    weight = torch.randn(4, 2, 16, 32)

    def autograd_probs(q_content, q_position, k, r_k):
        score = q_content @ k.transpose(-1, -2)
        score += shifted_position_scores(q_position, r_k)
        return score.masked_fill(mask, float('-inf')).softmax(-1)
    prob, grads = probs_and_grads(lambda *x: RelativeAttentionProbs.apply(*x, mask_bias), inputs, weight)
    prob_ref, grads_ref = probs_and_grads(autograd_probs, inputs, weight)
    assert torch.equal(prob, prob_ref)
    for name, grad, grad_ref in zip(['q_content', 'q_position', 'k', 'r_k'], grads, grads_ref):
        if name == 'k':
            torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(grad, grad_ref), name


FAULTS_OF_LARGE_TENSORS = """
import resource, sys, torch
import run_utils
if sys.argv[1] == 'keep':
    assert run_utils.keep_freed_memory()
def page_faults(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        torch.ones(1 << 24).sum()                        # 64 MiB, touched, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
page_faults(20)
print(page_faults(5))
"""


@pytest.mark.skipif(not sys.platform.startswith('linux') or os.confstr('CS_GNU_LIBC_VERSION') is None,
                    reason='keep_freed_memory sets glibc malloc')
def test_keep_freed_memory_reuses_large_blocks_instead_of_faulting_them_in_again():
    def faults(mode):
        out = subprocess.run([sys.executable, '-c', FAULTS_OF_LARGE_TENSORS, mode], cwd=REPO, check=True,
                             capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
        return int(out.stdout)
    pages = 5 * (64 << 20) // os.sysconf('SC_PAGE_SIZE')
    assert faults('default') >= 0.9 * pages                             # glibc: a fresh mmap each time
    assert faults('keep') < 0.01 * pages


def test_fused_attention_with_dropatt_drops_attention_in_training_only(tokens):
    model = tiny_model(dropatt=0.5, moe=False)
    for layer in model.layers:
        layer.dec_attn.fused_in_training = True
    model.train()
    torch.manual_seed(0)
    first = model(tokens[:-1], tokens[1:])[0]
    second = model(tokens[:-1], tokens[1:])[0]
    first.mean().backward()
    assert not torch.equal(first, second) and torch.isfinite(model.r_r_bias.grad).all()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens[:-1], tokens[1:])[0], model(tokens[:-1], tokens[1:])[0])


# ---------------------------------------------------------------- train.py: TF32, --compile

def test_cuda_runs_fp32_matmuls_in_tf32_unless_no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        train.set_matmul_precision(train.parse_args(['--no_tf32']))    # on the CPU: left alone
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
        args = train.parse_args([])
        args.cuda = True                                                # as if --cuda had been given
        train.set_matmul_precision(args)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        args.no_tf32 = True
        train.set_matmul_precision(args)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


TINY_RUN = ['--dataset', 'synthetic', '--n_layer', '2', '--d_model', '16', '--n_head', '2', '--d_head', '8',
            '--d_inner', '16', '--tgt_len', '8', '--mem_len', '8', '--eval_tgt_len', '8', '--batch_size', '4',
            '--max_eval_steps', '1', '--eval_ks', '2', '--log-interval', '1', '--eval-interval', '100',
            '--moe', '--moe-num-expert', '4', '--moe-top-k', '2']


def run_tiny_training(tmp_path, *extra):
    work = str(tmp_path / 'runs')
    train.main([*TINY_RUN, '--data', str(tmp_path / 'synthetic'), '--work_dir', work, *extra])
    return sorted(glob.glob(f'{work}-synthetic/*'))[-1]


def compiler_problem():
    """Why torch.compile cannot run here (None if it can): inductor needs a C++ compiler on the CPU."""
    if shutil.which(os.environ.get('CXX', 'g++')) is None and shutil.which('c++') is None:
        return 'torch.compile on the CPU needs a C++ compiler (g++), and there is none'
    return None


@pytest.mark.slow
@pytest.mark.skipif(compiler_problem() is not None, reason=str(compiler_problem()))
def test_compiled_training_gives_the_eager_losses(tmp_path):
    """Two steps of a tiny model with --compile, in a fresh process (dynamo's caches stay out of this one)."""
    code = 'import sys, train; train.main(sys.argv[1:])'
    losses = {}
    for name, extra in (('eager', []), ('compiled', ['--compile'])):
        work = str(tmp_path / name)
        result = subprocess.run([sys.executable, '-c', code, *TINY_RUN, '--data', str(tmp_path / 'synthetic'),
                                 '--work_dir', work, '--max_step', '2', '--dropout', '0'], cwd=REPO,
                                capture_output=True, text=True, timeout=600,
                                env=dict(os.environ, OMP_NUM_THREADS='1',
                                         TORCHINDUCTOR_CACHE_DIR=str(tmp_path / 'inductor')))   # a cold start
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        run_dir = sorted(glob.glob(f'{work}-synthetic/*'))[-1]
        with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
            losses[name] = [r['loss'] for r in map(json.loads, f) if r['split'] == 'train']
    assert len(losses['compiled']) == 2
    assert losses['compiled'] == pytest.approx(losses['eager'], rel=1e-4)


# ---------------------------------------------------------------- bench.py

def test_bench_quick_writes_every_ratio_finite_and_positive(capsys):
    """With --json -, the JSON alone goes to stdout (the report to stderr), so `bench.py --json - | jq` works."""
    import bench
    bench.main(['--quick', '--json', '-'])
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    for key in ('moe_block_vs_floor', 'train_hr_k2_vs_dense', 'train_mfu', 'eval_k1_vs_k16',
                'hyper_vs_smoe_dropout_train', 'hyper_vs_smoe_dropout_eval', 'hyper_expert_per_set_vs_per_token'):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert 0 < res['eval_k1_vs_k16_flops'] < 1
    report = captured.err
    assert 'model FLOPs of a training step = 3 x forward' in report
    assert all(name in report for name in bench.TARGETS)
    # the simulated sm90 trace: no host sync, operators in every part, a finite projection
    assert res['sim_host_syncs_per_step'] == 0 and 'sim_host_syncs_per_step 0' in report
    assert all(res['sim_kernels_per_step'][part] > 0 for part in bench.SIM_PARTS)
    assert res['sim_kernels_per_step']['total'] == sum(res['sim_kernels_per_step'][p] for p in bench.SIM_PARTS)
    assert 0 < res['sim_h100_step_s_projected'] < math.inf and 'projected H100 step' in report
    # train.py's loop, steps without a log line: no host read, no synchronous copy from the host, in every case
    assert all(res[f'loop_host_{what}_per_step_{case}'] == 0
               for what in ('reads', 'copies') for case in bench.LOOP_CASES)


def test_the_h100_projection_adds_flops_bytes_and_launches_and_the_host_can_bind():
    import bench
    model = dict(peak_flops=1e12, flops_fraction=0.5, hbm_bytes_per_s=1e9, launch_s=1e-6, host_launch_s=1e-3)
    # 1e12 FLOPs at 5e11/s: 2 s; 1e9 bytes: 1 s; 10 launches: 10 us on the GPU, 10 ms on the host
    assert bench.project_h100(1e12, 1e9, 10, model) == pytest.approx(3 + 1e-5)
    assert bench.project_h100(0, 0, 10_000, model) == pytest.approx(10.0)        # the host's launches bind


def test_analytic_flops_of_a_forward_by_hand():
    cfg = dict(n_layer=1, n_head=1, d_head=2, d_model=2, d_inner=3, n_token=5, moe=True, moe_num_expert=4,
               gate_name='smoe')
    # B = 1, T = 2, M = 1, K = 3: qkv 2*3*1*2*3*2 = 72, r_net 2*3*2*2 = 24, scores 3*2*1*2*3*2 = 72, o_net 2*1*2*2*2 = 16;
    # FFN at k = 2: 2*1*2*(2*4 + 2*2*2*3) = 128; softmax 2*1*2*2*5 = 40
    assert analytic_forward_flops(cfg, 2, bsz=1, qlen=2, mlen=1) == 72 + 24 + 72 + 16 + 128 + 40
    dense = dict(cfg, moe=False, d_inner=6)                           # 2*1*2*2*2*6 = 96
    assert analytic_forward_flops(dense, 2, bsz=1, qlen=2, mlen=1) == 72 + 24 + 72 + 16 + 96 + 40
