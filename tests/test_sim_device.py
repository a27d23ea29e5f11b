"""The GPU path on a simulated CUDA device (tests/sim_device.py): every router's training step, evaluation at
k = 1 and 16, and a resume, taking the branches a CUDA run takes, with host reads and wrong devices caught."""
import glob
import json

import pytest
import torch

import evaluation
import train
from data_utils import get_lm_corpus
from hyper_router import set_top_k
from mem_transformer import RelPartialLearnableMultiHeadAttn
from moe import ROUTERS, MoEPositionwiseFF, describe_engine
from run_utils import Distributed
from tests.conftest import TINY_MOE_ARGS, tiny_model
from sim_device import SimDeviceError, SimTensor, SimulatedCuda

PARTS = {RelPartialLearnableMultiHeadAttn: 'attention', MoEPositionwiseFF: 'moe'}
# the tiny run in bf16 (--amp) on "cuda": d_inner 16, so that grouped_mm's rows are 16-byte aligned in bf16
SIM_ARGS = [*TINY_MOE_ARGS, '--cuda', '--amp', '--d_inner', '16']
METHODS = [(router, 'plain') for router in ROUTERS] + [('hyper_router', 'hypermoe')]


# ----------------------------------------------------------------------------- the simulator itself

def test_the_simulated_device_refuses_a_cpu_tensor_beside_a_device_one_and_counts_host_reads():
    with SimulatedCuda() as sim:
        x = torch.ones(3, device='cuda')
        assert isinstance(x, SimTensor) and x.device == torch.device('cuda', 0) and x.is_cuda
        with pytest.raises(SimDeviceError, match='CPU tensor of shape'):
            x + torch.ones(3)                                     # made on the CPU: CUDA refuses it
        x * torch.tensor(2.0)                                     # a 0-d CPU tensor is a scalar, as on CUDA
        assert sim.host_reads == []
        x.sum().item(), x.tolist(), x.cpu(), bool(x[0]), x.nonzero()
        assert [read[0] for read in sim.host_reads] == ['aten._local_scalar_dense.default', 'Tensor.tolist',
                                                        'to cpu', 'aten._local_scalar_dense.default',
                                                        'aten.nonzero.default']


def test_the_simulated_device_takes_cudas_autocast_and_its_engine_choice():
    with SimulatedCuda(capability=(9, 0)) as sim:
        a, b = torch.ones(4, 4, device='cuda'), torch.ones(4, 4, device='cuda')
        with torch.autocast('cuda', dtype=torch.bfloat16):
            assert (a @ b).dtype == torch.bfloat16               # CUDA's autocast policy applies
        model = tiny_model(d_inner=16).to(sim.device)
        assert describe_engine(model, sim.device, torch.bfloat16).startswith('moe engine: grouped')
        assert describe_engine(model, sim.device, torch.float32).startswith('moe engine: loop')   # fp32 on CUDA
    with SimulatedCuda(capability=(7, 5)):
        assert describe_engine(model, torch.device('cuda', 0), torch.bfloat16).startswith('moe engine: loop')


def test_the_simulated_device_answers_torch_accelerator_so_adam_steps_on_any_torch_build():
    # Adam's step asks torch.accelerator for the current stream (is a CUDA graph being captured?): a CPU build
    # answers "no accelerator", a CUDA build without a driver raises; the simulation answers as one idle GPU
    real = torch.accelerator.current_accelerator
    with SimulatedCuda():
        assert torch.accelerator.current_accelerator(check_available=True) == torch.device('cuda')
        assert torch.accelerator.is_available() and torch.accelerator.device_count() == 1
        assert not torch.accelerator.current_stream().is_capturing()
        weight = torch.nn.Parameter(torch.ones(3, device='cuda'))
        opt = torch.optim.Adam([weight], lr=0.5)
        (weight * torch.arange(3.0, device='cuda')).sum().backward()
        opt.step()
        assert weight.detach().elem.tolist() == pytest.approx([1.0, 0.5, 0.5])    # Adam's first step: lr * sign(g)
    assert torch.accelerator.current_accelerator is real               # a real GPU's answers come back


# ----------------------------------------------------------------------------- refusals, each shown on a planted defect

def test_a_synchronous_copy_from_the_host_in_a_step_is_a_host_sync_as_set_sync_debug_mode_counts_it():
    def step_with_a_host_list(x):                        # planted: a Python list moved to the device in the step
        return x * torch.tensor([1.0, 2.0, 3.0], device='cuda')

    def step_with_a_host_tensor(x):                      # planted: a CPU tensor moved to the device in the step
        return x + torch.arange(3.0).to('cuda')

    def step_made_on_the_device(x):
        return x * torch.arange(1.0, 4.0, device='cuda')
    with SimulatedCuda() as sim:
        x = torch.ones(3, device='cuda')
        sim.reset_counts()
        step_made_on_the_device(x)
        torch.ones(3).to('cuda', non_blocking=True)     # an asynchronous copy: not a sync
        assert sim.host_syncs == []
        step_with_a_host_list(x)
        step_with_a_host_tensor(x)
        assert [what for what, _, _ in sim.host_copies] == ['to cuda (3,)'] * 2 and sim.host_reads == []
        torch.cuda.set_sync_debug_mode('warn')
        with pytest.warns(UserWarning, match='called a synchronizing CUDA operation'):
            step_with_a_host_tensor(x)
        torch.cuda.set_sync_debug_mode('error')
        for planted in (step_with_a_host_list, step_with_a_host_tensor, lambda x: x.sum().item()):
            with pytest.raises(SimDeviceError, match='called a synchronizing CUDA operation'):
                planted(x)
        step_made_on_the_device(x)
        torch.cuda.set_sync_debug_mode('default')


def grouped(groups, width, offs_dtype=torch.int32, rows_per_group=1):
    """F.grouped_mm of `groups` experts (weights [groups, width, width]) over rows_per_group bf16 rows each."""
    a = torch.ones(groups * rows_per_group, width, dtype=torch.bfloat16, device='cuda')
    b = torch.ones(groups, width, width, dtype=torch.bfloat16, device='cuda').transpose(-2, -1)  # column major
    offs = torch.arange(1, groups + 1, device='cuda').mul(rows_per_group).to(offs_dtype)
    return torch.nn.functional.grouped_mm(a, b, offs=offs)


@pytest.mark.skipif(not hasattr(torch.nn.functional, 'grouped_mm'), reason='no F.grouped_mm in this torch')
def test_grouped_mm_on_the_simulated_gpu_keeps_to_cudas_limits():
    with SimulatedCuda():
        assert grouped(1023, 8).shape == (1023, 8)                  # the most torch's CUDA kernel takes
        with pytest.raises(SimDeviceError, match="Can't process more than 1024 groups"):
            grouped(1024, 8)                                         # planted: one group per expert set (HyperMoE)
        with pytest.raises(SimDeviceError, match='multiple of 16 bytes'):
            grouped(4, 12)                                           # planted: rows of 24 bytes in bf16
        with pytest.raises(SimDeviceError, match='int32'):
            grouped(4, 8, offs_dtype=torch.int64)                    # planted: offsets as torch.long
    assert grouped_on_cpu(1024, 8).shape == (1024, 8)               # the CPU's kernel has no limit of groups


def grouped_on_cpu(groups, width):
    a = torch.ones(groups, width, dtype=torch.bfloat16)
    b = torch.ones(groups, width, width, dtype=torch.bfloat16).transpose(-2, -1)
    return torch.nn.functional.grouped_mm(a, b, offs=torch.arange(1, groups + 1, dtype=torch.int32))


def test_tf32_is_emulated_so_a_tolerance_too_tight_for_tf32_fails_on_the_simulated_gpu():
    a = torch.tensor([[1 + 2 ** -11 + 2 ** -12]])                # 1.00073...: TF32 keeps 10 bits, 1 + 2 ** -10
    b = torch.tensor([[1.0]])

    def matches_the_cpu_to(tolerance):                         # planted: an fp32 tolerance for a TF32 product
        with SimulatedCuda():
            on_gpu = (a.to('cuda') @ b.to('cuda')).cpu()
        return bool((on_gpu - a @ b).abs().max() <= tolerance), on_gpu.item()
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert matches_the_cpu_to(1e-6) == (False, 1 + 2 ** -10)      # rounded to nearest, by hand
        assert matches_the_cpu_to(2 ** -11)[0]                        # TF32's half unit in the last place
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert matches_the_cpu_to(0.0) == (True, a.item())                # TF32 off: the fp32 product


def test_the_cuda_rng_state_is_kept_so_a_resume_that_forgets_it_is_caught():
    def dropout_masks(restore_cuda_rng):
        """Two steps' dropout masks on the device, run straight and run as 'stop after one, resume'."""
        x = torch.ones(64, device='cuda')
        torch.manual_seed(0)
        straight = [torch.nn.functional.dropout(x, 0.5).elem.clone() for _ in range(2)]
        torch.manual_seed(0)
        first = torch.nn.functional.dropout(x, 0.5).elem.clone()
        saved = torch.get_rng_state(), torch.cuda.get_rng_state()     # the checkpoint
        torch.manual_seed(1234)                                           # a fresh process
        torch.set_rng_state(saved[0])
        if restore_cuda_rng:
            torch.cuda.set_rng_state(saved[1])
        return straight, [first, torch.nn.functional.dropout(x, 0.5).elem.clone()]
    with SimulatedCuda():
        straight, resumed = dropout_masks(restore_cuda_rng=True)
        assert all(torch.equal(s, r) for s, r in zip(straight, resumed))
        straight, resumed = dropout_masks(restore_cuda_rng=False)      # planted: the CPU's state alone restored
        assert not torch.equal(straight[1], resumed[1])
        cpu_state = torch.get_rng_state()
        torch.nn.functional.dropout(torch.ones(8, device='cuda'), 0.5)
        assert torch.equal(torch.get_rng_state(), cpu_state)         # a draw on the device leaves the CPU's


# ----------------------------------------------------------------------------- training step, every router

@pytest.fixture(scope='module')
def corpus(synthetic_dir):
    return get_lm_corpus(synthetic_dir, 'synthetic')


def sim_trainer(sim, corpus, synthetic_dir, tmp_path, gate_name, variant='plain', extra=()):
    args = train.parse_args([*SIM_ARGS, '--data', synthetic_dir, '--work_dir', str(tmp_path / 'run'),
                             '--gate_name', gate_name, '--moe_variant', variant, *extra])
    trainer = train.Trainer(args, Distributed(args.cuda), corpus, str(tmp_path))
    sim.attribute_parts(trainer.model, PARTS)
    return trainer


@pytest.mark.parametrize('gate_name, variant', METHODS)
def test_a_training_step_runs_on_the_simulated_gpu_in_bf16_and_reads_nothing_back(gate_name, variant, corpus,
                                                                                   synthetic_dir, tmp_path):
    with SimulatedCuda() as sim:
        trainer = sim_trainer(sim, corpus, synthetic_dir, tmp_path, gate_name, variant)
        before = {name: p.detach().elem.clone() for name, p in trainer.model.named_parameters()}
        batches = trainer.tr_iter.iter_from(0)
        trainer.train_step(*next(batches)[:2])
        sim.reset_counts()
        data, target, _ = next(batches)                  # the second step attends over the first's memory
        assert isinstance(data, SimTensor)
        trainer.train_step(data, target)
        # the experts: grouped GEMMs (DTS-Gate's first, dense phase routes to all E: one wide FFN, no grouping)
        assert sim.op_names['hyperrouter::grouped_mm'] > 0 or gate_name == 'dts'
        assert ('efficient', True) in sim.sdpa_backends                        # attention: BD's gradient, fused
        for name, p in trainer.model.named_parameters():
            assert isinstance(p, SimTensor), name
            if p.grad is not None:
                assert isinstance(p.grad, SimTensor) and not torch.equal(p.detach().elem, before[name]), name
        assert sim.host_copies == []      # no synchronous host-to-device copy (capacity is made on the device)
        if variant == 'hypermoe':     # its one read on purpose, per MoE layer
            assert [what for what, _, _ in sim.host_reads] == [HYPERMOE_READ] * len(trainer.model.moe_layers)
        else:
            expect_no_host_reads(sim.host_reads)


# The one host read a training step keeps on purpose: HyperMoE sizes the adapters it generates by the number of
# distinct expert sets in the batch (torch.unique), once per MoE layer; a static bound, all C(E, k) sets, would
# generate 12,870 adapters per layer at k = 8 (docs/speed.md).
HYPERMOE_READ = 'aten.unique_dim.default'


def expect_no_host_reads(reads, allowed=0):
    """At most `allowed` reads back to the host; the failure lists each (operator, model part, code line)."""
    assert len(reads) <= allowed, reads


# ----------------------------------------------------------------------------- evaluation, resume

@pytest.mark.parametrize('k', [1, 16])
def test_evaluation_at_k_on_the_simulated_gpu_gives_the_cpus_loss(k, tokens):
    windows = [(tokens[i:i + 4], tokens[i + 1:i + 5], 4) for i in range(0, 12, 4)]
    args = dict(tgt_len=4, eval_tgt_len=4, mem_len=6, ext_len=0)
    model = tiny_model(gate_name='hyper_router', moe_num_expert=16, d_inner=16)
    set_top_k(model, k)
    on_cpu = evaluation.evaluate(model, windows, args)
    with SimulatedCuda() as sim:
        model.to(sim.device)
        sim.attribute_parts(model, PARTS)
        on_sim = evaluation.evaluate(model, [(d.to(sim.device), t.to(sim.device), n) for d, t, n in windows], args)
    assert on_sim == on_cpu                             # fp32: the loop engine, the same numbers as the CPU's
    # evaluation.py reads each window's loss back; the loop engine (fp32 on CUDA) its counts once per MoE layer,
    # except at k = E (one wide FFN, nothing to count)
    per_window = 1 + (len(model.moe_layers) if k < 16 else 0)
    expect_no_host_reads(sim.host_reads, allowed=per_window * len(windows))


def test_a_run_stopped_and_resumed_on_the_simulated_gpu_ends_as_the_straight_run(tmp_path, synthetic_dir):
    common = [*SIM_ARGS, '--data', synthetic_dir, '--max_step', '2', '--eval-interval', '1', '--max_eval_steps', '1',
              '--eval_ks', '2', '--gate_name', 'hyper_router']

    def final_losses(work):
        [run_dir] = glob.glob(f'{work}-synthetic/*')
        with open(f'{run_dir}/metrics.jsonl') as f:
            return run_dir, [r['loss'] for r in map(json.loads, f) if r['split'] in ('train', 'valid')]
    with SimulatedCuda():
        train.main([*common, '--work_dir', str(tmp_path / 'straight'), '--log-interval', '1'])
        train.main([*common, '--work_dir', str(tmp_path / 'stopped'), '--log-interval', '1', '--stop_step', '1'])
        run_dir, _ = final_losses(tmp_path / 'stopped')
        train.main([*common, '--work_dir', str(tmp_path / 'stopped'), '--log-interval', '1', '--restart',
                    '--restart_dir', run_dir])
    assert final_losses(tmp_path / 'stopped')[1] == final_losses(tmp_path / 'straight')[1]
