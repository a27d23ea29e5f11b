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
