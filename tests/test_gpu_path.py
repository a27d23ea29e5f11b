"""The GPU path, made right before its first run (issue 19): what a CPU can check of it.

The torch bound, fp32 sums and products under bf16 autocast, the attention backend pinned for BD's
gradient, no host read in a training step, the engine chosen per GPU capability, fused Adam and DDP
without a gradient all-reduce per batch chunk.
"""
import importlib
import importlib.util
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import moe
import moe_engine
import torch_version
import train
from data_utils import Corpus, Vocab
from hyper_router import HyperRouterGate
from mem_transformer import RelPartialLearnableMultiHeadAttn
from hyper_expert import run_adapters
from moe import ROUTERS, Experts, torch_moe
from run_utils import Distributed
from moe_engine import grouped_mm_problem


def test_an_older_torch_stops_at_import_with_one_line(monkeypatch):
    monkeypatch.setattr(torch, '__version__', '2.3.1+cu121')
    with pytest.raises(SystemExit) as stop:
        importlib.reload(moe_engine)
    assert str(stop.value) == "error: this code needs torch >= 2.7 (found 2.3.1+cu121): pip install 'torch>=2.7'"


@pytest.mark.parametrize('version', ['2.7.0', '2.7.1+cu126', '2.10.0a0+git1234', '3.0.0'])
def test_the_bound_and_newer_torch_pass(version):
    torch_version.check_torch(version)


# ----------------------------------------------------------------------------- 5. fp32 sums under bf16 autocast

def realistic_experts(seed=0, n_expert=16, d_model=256, d_inner=512):
    torch.manual_seed(seed)
    experts = Experts(n_expert, d_model, d_inner, 0.0)
    with torch.no_grad():
        for w in (experts.htoh4.weight, experts.h4toh.weight):
            w.normal_(0, 0.02)
        for b in (experts.htoh4.bias, experts.h4toh.bias):
            b.normal_(0, 0.1)
    return experts


def realistic_routing(n_tok=11264, n_expert=16, k=2, d_model=256, seed=1):
    """The paper's batch 22 x 512 tokens routed to k = 2 of 16 experts (22,528 slots), and an incoming gradient
    with a common component (as the loss's pull on the output has), so that each expert's bias gradient is a
    sum of thousands of terms that do not cancel."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tok, d_model, generator=gen)
    top_score, top_idx = torch.softmax(torch.randn(n_tok, n_expert, generator=gen), -1).topk(k, -1)
    grad = 1 + 0.5 * torch.randn(n_tok, d_model, generator=gen)
    return x, top_idx, top_score, grad


def relative_errors(actual, expected):
    """Element-wise |actual - expected| / |expected|, in float64."""
    return (actual.double() - expected).abs() / expected.abs().clamp(min=1e-30)


@pytest.mark.skipif(grouped_mm_problem(torch.device('cpu'), torch.bfloat16, (256, 512)) is not None,
                    reason='this torch has no bf16 grouped_mm on the CPU')
def test_bf16_grouped_experts_sum_bias_gradients_and_weigh_slots_in_fp32():
    """Under bf16 autocast, at the paper's size: the output bias's gradient (each expert's rows summed through the
    gather's index_add) and the router's gradient (the k-way combine) must keep fp32 precision. References:
    the bias gradient in fp64 from the same weights; the router's, sum_d grad * y_slot in fp64 from the slots'
    bf16 outputs (each read back alone with a one-hot score, exact in any dtype). Measured (torch 2.13):
    bias median relative error 3.6e-5, router 8e-8; summed and multiplied in bf16 (before) 1.8e-3 and 2.7e-3."""
    experts = realistic_experts()
    x, top_idx, top_score, grad = realistic_routing()
    reference = realistic_experts().double()
    score64 = top_score.double().requires_grad_()
    torch_moe(x.double(), top_idx, score64, reference, 'loop').backward(grad.double())

    score = top_score.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        torch_moe(x, top_idx, score, experts, 'grouped').backward(grad)
        with torch.no_grad():
            slots = [torch_moe(x, top_idx, torch.eye(2)[j].expand_as(top_score), experts, 'grouped') for j in (0, 1)]
    router_reference = torch.stack([(grad.double() * y.double()).sum(-1) for y in slots], 1)   # [T, k]

    bias_errors = relative_errors(experts.h4toh.bias.grad, reference.h4toh.bias.grad)
    assert bias_errors.median() < 2e-4 and bias_errors.max() < 2e-3, (bias_errors.median(), bias_errors.max())
    router_errors = relative_errors(score.grad, router_reference)
    assert router_errors.median() < 1e-5, router_errors.median()
    torch.testing.assert_close(score.grad.double(), score64.grad, rtol=2e-2, atol=0.05)   # bf16 experts: loose


@pytest.mark.skipif(grouped_mm_problem(torch.device('cpu'), torch.bfloat16, (256, 64)) is not None,
                    reason='this torch has no bf16 grouped_mm on the CPU')
def test_bf16_grouped_hyper_expert_sums_its_bias_gradients_in_fp32():
    """HyperMoE's adapters (120 expert sets of k = 2 of 16, bottleneck 64) under bf16 autocast: the generated
    up-projection bias's gradient, summed over each set's tokens, against fp64. Measured (torch 2.13): median
    relative error 1.3e-4; gathered in bf16 (before) 1.3e-3."""
    x, _, _, grad = realistic_routing()
    gen = torch.Generator().manual_seed(2)
    n_set, d_model, bottleneck = 120, 256, 64
    token_set = torch.randint(n_set, (x.size(0),), generator=gen)
    shapes = ((n_set, d_model, bottleneck), (n_set, bottleneck), (n_set, bottleneck, d_model), (n_set, d_model))
    adapters = [scale * torch.randn(shape, generator=gen) for shape, scale in zip(shapes, (0.05, 0.1, 0.05, 0.1))]
    reference = [w.double().requires_grad_() for w in adapters]
    run_adapters(x.double(), token_set, *reference, engine='loop').backward(grad.double())
    leaves = [w.clone().requires_grad_() for w in adapters]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        run_adapters(x, token_set, *leaves, engine='grouped').backward(grad)
    errors = relative_errors(leaves[3].grad, reference[3].grad)
    assert errors.median() < 4e-4 and errors.max() < 2e-3, (errors.median(), errors.max())


# ----------------------------------------------------------------------------- 6. attention backend for BD's gradient

def attention_grads(dtype, fused, amp=False):
    """Gradients of a post-LN attention layer with memory (d_model 64, 4 heads, 32 tokens, 32 in memory) in
    `dtype` (the layer and inputs), explicit or through SDPA (BD as its bias), under bf16 autocast if `amp`."""
    torch.manual_seed(0)
    attn = RelPartialLearnableMultiHeadAttn(4, 64, 16, 0.0).to(dtype)
    attn.fused_in_training = fused
    w, mems, r = (torch.randn(shape).to(dtype) for shape in ((32, 3, 64), (32, 3, 64), (64, 64)))
    r_w_bias, r_r_bias = (torch.randn(4, 16).to(dtype).requires_grad_() for _ in range(2))
    mask = torch.triu(torch.ones(32, 64, dtype=torch.bool), 1 + 32)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        out = attn(w, r, r_w_bias, r_r_bias, mask, mems)
    (out.double() * torch.linspace(-1, 1, 64, dtype=torch.float64)).sum().backward()
    return {'r_r_bias': r_r_bias.grad, 'r_net': attn.r_net.weight.grad, 'qkv_net': attn.qkv_net.weight.grad}


@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'bf16'])
def test_bd_gradient_through_sdpa_matches_the_explicit_fp64_attention(amp):
    """BD (r_r_bias, r_net) gets its gradient only through SDPA's bias: against the explicit path in fp64."""
    reference = attention_grads(torch.float64, fused=False)
    grads = attention_grads(torch.float32, fused=True, amp=amp)
    # of the largest gradient; measured (torch 2.13) 1.1e-2 in bf16 (8 bits of mantissa), 6e-7 in fp32
    tolerance = dict(rtol=3e-2, atol=3e-2) if amp else dict(rtol=1e-5, atol=2e-6)
    for name, grad in grads.items():
        scale = reference[name].abs().max()
        torch.testing.assert_close(grad.double() / scale, reference[name] / scale, **tolerance, msg=name)


def test_sdpa_with_a_bias_that_needs_a_gradient_is_pinned_to_the_backends_that_give_it(monkeypatch):
    """What SDPA may choose from, read inside the call: memory-efficient attention or the math path, never flash
    (no bias) nor cuDNN (the dispatcher's choice on recent GPUs); free when no gradient is needed."""
    allowed = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        cuda = torch.backends.cuda
        allowed.append({'flash': cuda.flash_sdp_enabled(), 'efficient': cuda.mem_efficient_sdp_enabled(),
                        'math': cuda.math_sdp_enabled(), 'cudnn': cuda.cudnn_sdp_enabled()})
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)
    attention_grads(torch.float32, fused=True)
    assert allowed == [{'flash': False, 'efficient': True, 'math': True, 'cudnn': False}]
    with torch.no_grad():
        RelPartialLearnableMultiHeadAttn(4, 64, 16, 0.0)(torch.randn(8, 2, 64), torch.randn(8, 64), torch.zeros(4, 16),
                                                          torch.zeros(4, 16), torch.zeros(8, 8, dtype=torch.bool))
    assert allowed[1]['flash'] and allowed[1]['cudnn']


# ----------------------------------------------------------------------------- 7. no host read in a training step

def tiny_trainer(tmp_path, gate_name, engine, *extra):
    """A Trainer of train.py (2 MoE layers of 4 experts, k = 2, 2 batch chunks, balance and z losses, capacity
    1.0) on a small corpus; its log line every 10 steps."""
    args = train.parse_args(['--dataset', 'synthetic', '--moe', '--gate_name', gate_name, '--moe-num-expert', '4',
                             '--moe-top-k', '2', '--n_layer', '2', '--d_model', '16', '--n_head', '2', '--d_head', '8',
                             '--d_inner', '16', '--tgt_len', '8', '--mem_len', '8', '--eval_tgt_len', '8',
                             '--batch_size', '4', '--batch_chunk', '2', '--balance_loss', '0.01', '--z_loss', '0.001',
                             '--capacity_factor', '1.0', '--moe_engine', engine, '--log-interval', '10', *extra])
    stream = torch.randint(0, 11, (2000,), generator=torch.Generator().manual_seed(0))
    corpus = Corpus('synthetic', Vocab([str(i) for i in range(11)]), stream, stream[:400], stream[:400])
    return train.Trainer(args, Distributed(False), corpus, str(tmp_path))


def step(trainer, batch):
    """One iteration of Trainer.run's loop without its evaluation: the update, then the log window."""
    data, target, _ = batch
    loss = trainer.train_step(data, target)
    trainer.step += 1
    trainer.log_progress(loss, target.numel())


def adam_step_counts(optimizer):
    """Adam keeps its step counts on the host (unless fused) and reads them there: no device sync."""
    return {id(state['step']) for state in optimizer.state.values()}


@pytest.mark.parametrize('gate_name', ROUTERS)
def test_a_training_step_with_the_grouped_engine_reads_nothing_back_and_changes_no_buffer(gate_name, tmp_path,
                                                                                           request):
    """No host read in a step without a log line; and no buffer changes, so DDP need not broadcast them."""
    trainer = tiny_trainer(tmp_path, gate_name, 'grouped')
    buffers = {name: b.clone() for name, b in trainer.model.named_buffers()}
    batches = trainer.tr_iter.iter_from(0)
    step(trainer, next(batches))                                        # Adam's state is made at the first step
    host_tensors = request.getfixturevalue('no_host_sync')
    host_tensors.update(adam_step_counts(trainer.optimizer))
    step(trainer, next(batches))                                        # step 2: no log line
    assert trainer.window['steps'] == 2
    after = dict(trainer.model.named_buffers())
    assert after.keys() == buffers.keys() and all(torch.equal(after[name], b) for name, b in buffers.items())


def test_the_loop_engine_reads_its_expert_counts_once_per_moe_layer_forward(tmp_path, request, monkeypatch):
    trainer = tiny_trainer(tmp_path, 'smoe', 'loop')
    batches = trainer.tr_iter.iter_from(0)
    step(trainer, next(batches))
    host_tensors = request.getfixturevalue('no_host_sync')
    host_tensors.update(adam_step_counts(trainer.optimizer))
    counted = []

    def counts_read_on_the_host(sorted_group, n_group):
        counts = moe_engine.group_counts(sorted_group, n_group)
        host_tensors.add(id(counts))
        counted.append(counts)
        return counts
    monkeypatch.setattr(moe, 'group_counts', counts_read_on_the_host)
    step(trainer, next(batches))
    assert len(counted) == 2 * 2                                        # 2 MoE layers x 2 batch chunks


# ----------------------------------------------------------------------------- 8. the engine per GPU

@pytest.mark.parametrize('capability, compiling, engine', [
    ((8, 0), False, 'loop'),        # A100: torch's grouped_mm is a per-group loop with host copies
    ((8, 6), False, 'loop'),        # A40
    ((9, 0), False, 'grouped'),     # H100: grouped GEMM kernels
    ((10, 0), False, 'grouped'),    # B200
    ((8, 0), True, 'grouped'),      # --compile: one opaque op in the graph, never the loop's host-side counts
])
def test_auto_takes_the_grouped_engine_on_cuda_by_compute_capability(capability, compiling, engine, monkeypatch):
    cuda = torch.device('cuda')
    chosen, reason = moe_engine.choose_engine('auto', cuda, torch.bfloat16, (256, 512), compiling, capability)
    assert chosen == engine, reason
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)   # the device's own
    assert moe_engine.choose_engine('auto', cuda, torch.bfloat16, (256, 512), compiling)[0] == engine


def test_compile_on_cuda_without_the_grouped_engine_is_refused_at_parse_time(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (8, 0))
    train.parse_args(['--moe', '--cuda', '--amp', '--compile'])                  # bf16: grouped_mm runs
    for extra in (['--compile'], ['--amp', '--compile', '--moe_engine', 'loop']):
        with pytest.raises(SystemExit):
            train.parse_args(['--moe', '--cuda', *extra])
        assert 'error: --compile on CUDA needs the grouped MoE engine' in capsys.readouterr().err


def test_fastmoe_is_looked_up_once_per_process_not_per_forward(monkeypatch):
    looked_up = []
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: looked_up.append(name))
    moe.fastmoe_available.cache_clear()
    try:
        assert not moe.fastmoe_available() and not moe.fastmoe_available()
        assert looked_up == ['fmoe']
    finally:
        moe.fastmoe_available.cache_clear()


# ----------------------------------------------------------------------------- 9. fused Adam, DDP across batch chunks

def test_adam_is_fused_on_cuda_and_torch_default_on_the_cpu():
    args = train.parse_args([])
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert train.make_optimizer(params, args, torch.device('cuda')).defaults['fused'] is True
    assert train.make_optimizer(params, args, torch.device('cpu')).defaults['fused'] is None     # CPU numbers kept


def test_after_a_fused_adam_step_hyperrouter_validates_with_the_router_of_the_new_embedding():
    """The fused kernel (run here on the CPU, as make_optimizer asks for CUDA) writes the embedding in place; the
    router cached by the evaluation before the step must not be reused after it."""
    torch.manual_seed(0)
    gate = HyperRouterGate(8, 4, hyper_size=16)
    optimizer = train.make_optimizer([gate.embedding], train.parse_args(['--lr', '0.1']), torch.device('cuda'))
    with torch.no_grad():
        before, _ = gate.router()                                         # cached, as a validation leaves it
    weight, bias = gate.generate_router()
    (weight.square().sum() + bias.sum()).backward()
    optimizer.step()
    first, second = gate.hypernet[0], gate.hypernet[2]
    hidden = (gate.embedding.detach() @ first.weight.T + first.bias).clamp(min=0)          # [1, 16], by hand
    expected = (hidden @ second.weight.T + second.bias).view(4, 9)                         # [E, d + 1]
    with torch.no_grad():
        weight, bias = gate.router()
    assert not torch.allclose(before, expected[:, :-1], rtol=0, atol=1e-3)   # the step moved the router
    torch.testing.assert_close(weight, expected[:, :-1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias, expected[:, -1], rtol=1e-6, atol=1e-6)


def ddp_steps(rank, world_size, port, folder):
    """One training step of a 2-process gloo run (spawned) with --batch_chunk 1 and one with 2: rank 0 saves the
    gradients and the number of bucket all-reduces that DDP made in each."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ddp = Distributed(False)
    stream = torch.randint(0, 11, (2000,), generator=torch.Generator().manual_seed(0))
    corpus = Corpus('synthetic', Vocab([str(i) for i in range(11)]), stream, stream[:400], stream[:400])
    for batch_chunk in (1, 2):
        args = train.parse_args(['--dataset', 'synthetic', '--moe', '--moe-num-expert', '4', '--moe-top-k', '2',
                                 '--n_layer', '2', '--d_model', '16', '--n_head', '2', '--d_head', '8',
                                 '--d_inner', '16', '--tgt_len', '8', '--mem_len', '8', '--batch_size', '8',
                                 '--batch_chunk', str(batch_chunk), '--dropout', '0', '--moe_engine', 'grouped'])
        trainer = train.Trainer(args, ddp, corpus, os.path.join(folder, f'rank{rank}'))
        reduces = []

        def counting_allreduce(state, bucket):
            reduces.append(bucket.index())
            return allreduce_hook(state, bucket)
        trainer.ddp_model.register_comm_hook(dist.group.WORLD, counting_allreduce)
        data, target, _ = next(trainer.tr_iter.iter_from(0))
        trainer.train_step(data, target)
        if rank == 0:
            grads = {name: p.grad for name, p in trainer.model.named_parameters() if p.grad is not None}
            torch.save({'grads': grads, 'reduces': len(reduces),
                        'broadcast_buffers': trainer.ddp_model.broadcast_buffers},
                       os.path.join(folder, f'chunks{batch_chunk}.pt'))
    ddp.barrier()                       # neither process leaves the group while the other still uses it
    ddp.close()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_ddp_all_reduces_once_per_step_across_batch_chunks_with_the_same_gradients(tmp_path):
    os.makedirs(tmp_path / 'rank0', exist_ok=True)
    torch.multiprocessing.spawn(ddp_steps, args=(2, free_port(), str(tmp_path)), nprocs=2)
    one, two = (torch.load(tmp_path / f'chunks{n}.pt', weights_only=True) for n in (1, 2))
    assert one['reduces'] >= 1 and two['reduces'] == one['reduces']      # no all-reduce for the first chunk
    assert one['grads'].keys() == two['grads'].keys() and not one['broadcast_buffers']
    for name, grad in one['grads'].items():                               # the sum of the chunks, in another order
        torch.testing.assert_close(two['grads'][name], grad, rtol=1e-5, atol=1e-7, msg=name)

