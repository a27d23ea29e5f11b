"""Issue 26: GPU defects of the training path, each shown on the CPU (the simulated device, CPU autocast) first.

grouped_mm's group limit for HyperMoE's adapters, fp32 sums of the chunked softmax's shared weights under bf16,
THOR's loss in chunks, no host read nor synchronous host-to-device copy per step, one compiled graph per router,
routing in full fp32, the engine per GPU generation.
"""
import signal
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bench
import evaluation
import train
from adaptive_softmax import ProjectedAdaptiveLogSoftmax
from custom_gate import BaseGate
from hyper_expert import HyperExpert, HyperExpertGenerator, run_adapters
from mem_transformer import ThorObjective
from moe import ROUTERS
from moe_engine import GROUPED_MM_MAX_GROUPS, choose_engine, grouped_mm, grouped_mm_problem
from sim_device import SimulatedCuda
from tests.conftest import tiny_model

aten = torch.ops.aten


class GroupedMMCalls(TorchDispatchMode):
    """Records the number of groups of every grouped_mm call (ours or torch's). Stands in for the simulated
    device's own refusal of 1024 groups or more (issue 25), so that the test holds with or without it."""

    def __init__(self):
        super().__init__()
        self.groups = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if 'grouped_mm' in func.name():
            offs = kwargs.get('offs', args[2] if len(args) > 2 else None)
            self.groups.append(offs.numel())
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- 1. HyperMoE past 1023 expert sets

def many_sets(n_tok=3000, n_set=1500, d_model=16, bottleneck=16, seed=0):
    """Tokens spread over n_set adapters (more than grouped_mm's 1023 groups), their adapters and a gradient."""
    gen = torch.Generator().manual_seed(seed)
    token_set = torch.cat([torch.arange(n_set), torch.randint(n_set, (n_tok - n_set,), generator=gen)])
    shapes = ((n_set, d_model, bottleneck), (n_set, bottleneck), (n_set, bottleneck, d_model), (n_set, d_model))
    adapters = [0.3 * torch.randn(shape, generator=gen) for shape in shapes]
    return torch.randn(n_tok, d_model, generator=gen), token_set, adapters, torch.randn(n_tok, d_model, generator=gen)


def naive_adapters(x, token_set, w_down, b_down, w_up, b_up):
    """Every token through its own set's adapter, weights gathered per token (the reference)."""
    hidden = torch.relu(torch.einsum('td,tdb->tb', x, w_down[token_set]) + b_down[token_set])
    return torch.einsum('tb,tbd->td', hidden, w_up[token_set]) + b_up[token_set]


def test_grouped_hyper_expert_past_1023_sets_calls_grouped_mm_with_at_most_1023_groups_and_same_numbers():
    """1,500 sets (HyperMoE at k = 4 of 16 has about 1,800 in a batch): every grouped_mm call (forward and
    backward) takes at most 1023 groups, and the output and every gradient are the naive per-token adapters'
    (fp64 reference). Before: one call of 1,500 groups, which CUDA refuses."""
    x, token_set, adapters, grad = many_sets()
    reference = [w.double().requires_grad_() for w in adapters]
    x64 = x.double().requires_grad_()
    expected = naive_adapters(x64, token_set, *reference)
    expected.backward(grad.double())
    leaves = [w.clone().requires_grad_() for w in adapters]
    x32 = x.clone().requires_grad_()
    with GroupedMMCalls() as calls:
        out = run_adapters(x32, token_set, *leaves, engine='grouped')
        out.backward(grad)
    assert calls.groups and max(calls.groups) <= GROUPED_MM_MAX_GROUPS, calls.groups
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip([x32, *leaves], [x64, *reference]):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(grouped_mm_problem(torch.device('cpu'), torch.bfloat16, (16, 16)) is not None,
                    reason='this torch has no bf16 grouped_mm on the CPU')
def test_hyper_moe_in_bf16_on_a_simulated_h100_keeps_grouped_mm_under_its_limit():
    """HyperMoE's HyperExpert, k = 4 of 16 experts, 3,000 tokens (about 1,400 distinct sets), in bf16 on the
    simulated H100, where auto takes the grouped engine: no grouped_mm call of 1024 groups or more."""
    torch.manual_seed(0)
    generator = HyperExpertGenerator(16, 1, cond_dim=16, hidden=16, adapter_dim=16)
    expert = HyperExpert(16, generator, 0)
    top_idx = torch.rand(3000, 16).topk(4, -1).indices
    with SimulatedCuda() as sim:
        generator.to(sim.device), expert.to(sim.device)
        x = torch.randn(3000, 16).to(sim.device).requires_grad_()
        with GroupedMMCalls() as calls, torch.autocast('cuda', dtype=torch.bfloat16):
            expert(x, top_idx.to(sim.device)).float().sum().backward()
    assert calls.groups and max(calls.groups) <= GROUPED_MM_MAX_GROUPS, calls.groups


# ----------------------------------------------------------------------------- 2. the chunked softmax under bf16

def norm_error(actual, expected):
    """|actual - expected| / |expected| in the 2-norm, in float64."""
    return ((actual.double() - expected).norm() / expected.norm()).item()


def test_chunked_softmax_under_bf16_autocast_sums_its_output_gradients_over_wt103s_45_chunks_in_fp32():
    """WikiText-103's plain softmax is computed in 45 chunks of rows (11,264 x 267,735 logits): its output
    weight's and bias's gradients, summed over the chunks, against fp64 from the same (bf16-exact) inputs.
    Here 2,880 rows x 512 words in 45 chunks. Measured (torch 2.14, relative error in the 2-norm): bias 4e-6,
    weight 2.5e-3 (as in one piece: each chunk's bf16 product); with autocast's one bf16 copy shared by the
    chunks (before) 1.9e-2 and 8.2e-3."""
    torch.manual_seed(0)
    n_rows, n_token, d = 45 * 64, 512, 32
    crit = ProjectedAdaptiveLogSoftmax(n_token, d, d, [], chunk_elements=64 * n_token)
    layer = crit.out_layers[0]
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_token, d).mul(0.05).bfloat16())
        layer.bias.copy_(torch.randn(n_token).mul(0.1).bfloat16())
    hidden = torch.randn(n_rows, d).bfloat16().float()
    target = torch.randint(n_token // 8, (n_rows,))            # a skewed target: the bias gradients do not cancel
    reference = ProjectedAdaptiveLogSoftmax(n_token, d, d, []).double()
    reference.load_state_dict(crit.state_dict())
    reference(hidden.double(), target).sum().backward()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        crit(hidden, target).sum().backward()
    ref = reference.out_layers[0]
    assert norm_error(layer.bias.grad, ref.bias.grad) < 1e-4
    assert norm_error(layer.weight.grad, ref.weight.grad) < 4e-3


# ----------------------------------------------------------------------------- 6. THOR's loss in chunks

class LargestLogits(TorchDispatchMode):
    """The most rows of any [rows, V] log-softmax computed (V the vocabulary): the log-probabilities held at once."""

    def __init__(self, n_token):
        super().__init__()
        self.n_token, self.rows = n_token, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._log_softmax.default and out.size(-1) == self.n_token:
            self.rows = max(self.rows, out.numel() // self.n_token)
        return out


def thor_step(tokens, chunk_elements):
    """THOR's objective and its gradients on the tiny word-level model, the loss in chunks of `chunk_elements`."""
    model = tiny_model(gate_name='thor', moe_top_k=1, dropout=0.1)
    model.crit.chunk_elements = chunk_elements
    torch.manual_seed(5)
    with LargestLogits(model.crit.n_token) as largest:
        nll, consistency = ThorObjective(model)(tokens[:-1], tokens[1:])[:2]
        (nll + 1.5 * consistency).sum().backward()
    return [nll, consistency, *(p.grad for p in model.parameters() if p.grad is not None)], largest.rows


def test_thor_objective_is_computed_in_chunks_of_rows_with_the_same_numbers(tokens):
    """12 x 3 = 36 predicted tokens, 37 words: in chunks of 4 rows no [rows, V] tensor has more than 4 rows
    (before: both passes' [36, V] log-probabilities at once), and the NLL, the consistency and every gradient
    are those of the whole (one chunk), as in the plain chunked loss."""
    whole, whole_rows = thor_step(tokens, 2 ** 26)
    chunked, chunk_rows = thor_step(tokens, 4 * 37)
    assert whole_rows == 36 and chunk_rows == 4
    assert len(whole) == len(chunked)
    for got, want in zip(chunked[:2], whole[:2]):                     # row by row: the same up to a rounding
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for got, want in zip(chunked[2:], whole[2:]):                     # sums over the rows, in another order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 3. no host sync per step

@pytest.mark.parametrize('case', ['plain', 'ddp', 'capacity_ddp'])
def test_a_step_without_log_or_evaluation_reads_nothing_back_and_copies_nothing_from_the_host(case, synthetic_dir):
    """train.py's loop on the simulated H100 in bf16, steps 2, 4 and 5 (a log line at 3): no host read, no
    synchronous copy from the host, with and without capacity, alone and under DDP (bench.py's (g) figures).
    Before: the capacity built on the host and copied once per MoE layer and step; under DDP the stop flag
    copied, all-reduced and read back at every step. The copies are counted by bench.HostCopies until the
    simulated device counts them as host syncs itself (issue 25)."""
    per_step = bench.loop_syncs_per_step(case, synthetic_dir)
    assert {step: per_step[step] for step in (2, 4, 5)} == {2: (0, 0), 4: (0, 0), 5: (0, 0)}, per_step


def test_under_ddp_a_signal_stops_every_rank_at_the_next_log_step():
    """The ranks agree on a signal only at log, evaluation and stop steps: a signal after step 4 (log lines every
    3 steps) stops the run at step 6, every rank together; --stop_step still stops at its step."""
    agreed = []

    class TwoRanks:
        world_size = 2

        def max(self, value):
            agreed.append(value)
            return value
    args = types.SimpleNamespace(log_interval=3, eval_interval=1000, max_step=100, stop_step=8)
    trainer = types.SimpleNamespace(ddp=TwoRanks(), args=args, stop_signal=0)
    stop = types.SimpleNamespace(signum=None)
    stopped = {}
    for trainer.step in range(1, 9):
        stop.signum = signal.SIGTERM if trainer.step > 4 else None
        stopped[trainer.step] = train.Trainer._should_stop(trainer, stop)
    assert [step for step, yes in stopped.items() if yes] == [6, 7, 8] and trainer.stop_signal == signal.SIGTERM
    assert agreed == [0, signal.SIGTERM, signal.SIGTERM]              # at steps 3, 6 and the stop step 8
    trainer.stop_signal, stop.signum = 0, None
    assert train.Trainer._should_stop(trainer, stop)                  # step 8, --stop_step, no signal


# ----------------------------------------------------------------------------- 7. routing in full fp32

MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


class MatmulPrecision(TorchDispatchMode):
    """Records, for every fp32 matmul of a forward on the simulated device, its model part and whether TF32 was
    allowed when it ran. Stands in for the simulator's TF32 emulation (issue 25)."""

    def __init__(self, sim):
        super().__init__()
        self.sim, self.seen = sim, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS and args[0].dtype == torch.float32 and torch._C._current_autograd_node() is None:
            self.seen.append((self.sim.part(), torch.backends.cuda.matmul.allow_tf32))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('gate_name, variant', [(name, 'plain') for name in ROUTERS] + [('hyper_router', 'hypermoe')])
def test_every_router_routes_in_full_fp32_on_cuda_while_the_rest_takes_tf32(gate_name, variant, tokens):
    """A fp32 run on the simulated H100 with TF32 on (train.py's default): every matmul of the router (HyperRouter's
    hypernetwork included) runs with TF32 off, the other matmuls keep TF32, and the setting is restored."""
    model = tiny_model(gate_name=gate_name, moe_variant=variant, d_inner=16)
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with SimulatedCuda() as sim:
            model.to(sim.device)
            sim.attribute_parts(model, {BaseGate: 'router'})
            with MatmulPrecision(sim) as matmuls:
                model(tokens[:-1].to(sim.device), tokens[1:].to(sim.device))
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    router = [tf32 for part, tf32 in matmuls.seen if part == 'router']
    rest = [tf32 for part, tf32 in matmuls.seen if part != 'router']
    assert rest and all(rest)
    assert not any(router), matmuls.seen
    assert router or gate_name in ('thor', 'hash')                     # random and hashed routing: no matmul


# ----------------------------------------------------------------------------- 4. one compiled graph per router

@pytest.mark.parametrize('gate_name', ROUTERS)
def test_torch_compile_makes_no_new_graph_as_the_training_steps_go_on(gate_name):
    """Each router of the tiny model compiled, routing four training batches, each told its step as Trainer.run
    tells it (DTS-Gate's Gumbel temperature changes at every one): the graph made at the first step serves the
    others. Before: DTS-Gate's step and temperature were constants of its graph, a new graph at every step (32 of
    them, then eager without a word)."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    torch._dynamo.reset()
    gate = tiny_model(gate_name=gate_name).moe_layers[0].gate
    compiled = torch.compile(gate, backend=counting_backend)
    x, token_ids = torch.randn(24, gate.d_model), torch.randint(37, (24,))
    made = []
    for step in range(4):
        gate.set_step(step)
        compiled(x, token_ids if gate.needs_token_ids else None)
        made.append(len(graphs))
    torch._dynamo.reset()
    assert made[0] > 0 and made[1:] == [made[0]] * 3, made


# ----------------------------------------------------------------------------- 5. the engine per GPU generation

@pytest.mark.parametrize('capability, engine', [((8, 0), 'loop'), ((8, 9), 'loop'), ((9, 0), 'grouped'),
                                                ((10, 0), 'grouped'), ((10, 3), 'grouped'), ((12, 0), 'loop')])
def test_auto_takes_grouped_only_where_torchs_grouped_gemm_kernel_runs(capability, engine):
    """torch's CUDA grouped_mm runs its kernel on majors 9 and 10 only; on 12.x (RTX 50xx) it is the per-group
    fallback that copies the offsets to the host, as on 8.x. Before: grouped for any capability >= 9.0."""
    assert choose_engine('auto', torch.device('cuda'), torch.bfloat16, (16, 16), False, capability)[0] == engine


def test_an_empty_groups_weight_gradient_is_zero_whatever_the_kernel_leaves_there(monkeypatch):
    """sm100's grouped_mm leaves an empty group's weight gradient non-zero (pytorch#172439): played here by a
    grouped_mm that writes 7 into every group of the 2-D x 2-D form; the experts' gradient of an empty group
    must still be 0, the others the naive per-group products."""
    real = F.grouped_mm

    def sm100_like(a, b, offs=None, **kwargs):
        out = real(a, b, offs=offs, **kwargs)
        if a.dim() == 2 and b.dim() == 2:                               # the weight gradient: [G, K, N]
            counts = torch.diff(offs, prepend=offs.new_zeros(1))
            out = torch.where((counts == 0)[:, None, None], 7.0, out)
        return out
    monkeypatch.setattr(F, 'grouped_mm', sm100_like)
    torch.manual_seed(0)
    x, w = torch.randn(6, 16), torch.randn(3, 16, 16, requires_grad=True)
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)                  # group 1 is empty
    grad = torch.randn(6, 16)
    grouped_mm(x, w, offs).backward(grad)
    torch.testing.assert_close(w.grad[0], x[:2].t() @ grad[:2])
    assert (w.grad[1] == 0).all()
    torch.testing.assert_close(w.grad[2], x[2:].t() @ grad[2:])


# ----------------------------------------------------------------------------- 8. one precision switch

@pytest.mark.parametrize('precision, flags, status', [(None, [], 0), ('fp32', [], 0), ('bf16', ['--amp'], 0),
                                                      ('fp16', None, 2)])
def test_the_scripts_take_one_precision_switch(precision, flags, status, launch_script):
    """PRECISION=fp32 (the default, the paper's) or bf16 (--amp) on every script, as DEVICE and SEEDS; anything
    else is one error line and exit 2."""
    result, runs = launch_script('script/table1/hyper_router_enwik8.sh', gpu=True, DEVICE='auto', PRECISION=precision)
    assert result.returncode == status, result.stderr
    if status:
        assert result.stderr.strip() == "error: PRECISION must be fp32 or bf16; got 'fp16'"
        return
    [argv] = runs
    assert argv[0] == 'train.py' and '--cuda' in argv
    assert [flag for flag in argv if flag == '--amp'] == flags


@pytest.mark.parametrize('flags, precision', [([], 'fp32'), (['--cuda'], 'tf32'), (['--cuda', '--no_tf32'], 'fp32'),
                                              (['--cuda', '--amp'], 'bf16')])
def test_a_runs_precision_is_a_column_of_its_hparams_row(flags, precision, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    args = vars(train.parse_args(['--moe', *flags]))
    config = {'args': args, 'model_config': {'moe': True, 'gate_name': 'smoe', 'moe_num_expert': 16, 'n_layer': 12,
                                             'd_model': 512, 'dropout': 0.1, 'moe_variant': 'plain'}}
    assert evaluation.run_precision(args) == precision
    assert evaluation.run_hparams(config)['precision'] == precision
