"""Speed benchmark of the MoE engine on the paper's small enwik8 model (4 layers, d 256, 16 experts).

  python bench.py [--device cpu] [--repeats 5] [--json bench.json]

(a) the MoE FFN block, forward + backward at k = 2, against its floor: one dense FFN of the same
    FLOPs (2 rows per token through Linear(256, 512) -> ReLU -> Dropout -> Linear(512, 256));
(b) evaluation forward of the whole model (batch 10, eval_tgt_len 128, memory 896) at k = 1..16,
    against the analytic FLOPs ratio;
(c) a HyperRouter training step and evaluation forward against SMoE-Dropout's;
(d) HyperMoE's HyperExpert, forward + backward at k = 2: one adapter generated per distinct expert set
    of the batch (ours) against one per token (the original's).
Prints a table and writes the figures as JSON. Timings are medians over interleaved repeats.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from hyper_router import set_top_k
from mem_transformer import MemTransformerLM
from moe import HyperExpert, HyperExpertGenerator, MoEPositionwiseFF

SMALL = dict(n_token=204, n_layer=4, n_head=8, d_model=256, d_head=64, d_inner=512, dropout=0.1,
             dropatt=0.0, tgt_len=512, mem_len=512, moe=True, moe_num_expert=16, moe_top_k=2,
             moe_index='0,1,2,3', hyper_size=256)
TARGETS = {'moe_block_vs_floor': 1.5, 'eval_k1_vs_k16': 0.70, 'hyper_vs_smoe_dropout_train': 1.05,
           'hyper_vs_smoe_dropout_eval': 1.02, 'hyper_expert_per_set_vs_per_token': 0.25}


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_interleaved(fns, repeats, device, warmup=1):
    """{name: median seconds}, running the functions in turn so drifts hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_moe_block(device, n_tokens, repeats):
    torch.manual_seed(0)
    block = MoEPositionwiseFF(256, 512, 0.1, num_expert=16, top_k=2, gate_name='smoe_dropout',
                              backend='torch').to(device)
    x = torch.randn(n_tokens, 256, device=device, requires_grad=True)
    w1 = torch.randn(512, 256, device=device, requires_grad=True)
    w2 = torch.randn(256, 512, device=device, requires_grad=True)
    x_rows = torch.randn(2 * n_tokens, 256, device=device, requires_grad=True)   # k = 2 rows per token

    def moe():
        block.moe(x).sum().backward()

    def floor():
        F.linear(F.dropout(F.relu(F.linear(x_rows, w1)), 0.1), w2).sum().backward()

    t = time_interleaved({'moe': moe, 'floor': floor}, repeats, device)
    return {'moe_block_s': t['moe'], 'floor_s': t['floor'], 'moe_block_vs_floor': t['moe'] / t['floor']}


def analytic_eval_flops(cfg, k, bsz=10, qlen=128, mlen=896):
    """FLOPs (2 per multiply-add) of one evaluation forward: attention recomputes K/V over memory."""
    d, hd, klen = cfg['d_model'], cfg['n_head'] * cfg['d_head'], qlen + mlen
    attn = (2 * klen * bsz * d * 3 * hd            # qkv_net over memory + segment
            + 2 * klen * d * hd                    # r_net
            + 3 * 2 * bsz * qlen * klen * hd       # content and position scores, prob @ v
            + 2 * bsz * qlen * hd * d)             # o_net
    ffn = 2 * bsz * qlen * (d * cfg['moe_num_expert'] + k * 2 * d * cfg['d_inner'])
    softmax = 2 * bsz * qlen * d * cfg['n_token']
    return cfg['n_layer'] * (attn + ffn) + softmax


def eval_setup(gate_name, device):
    torch.manual_seed(0)
    model = MemTransformerLM(**dict(SMALL, gate_name=gate_name)).to(device).eval()
    model.reset_length(128, 0, 896)
    data = torch.randint(0, 204, (128, 10), device=device)
    with torch.no_grad():
        mems = model(data, data)[1:]
        while mems[0].size(0) < 896:
            mems = model(data, data, *mems)[1:]
    return model, data, mems


def bench_eval_over_k(device, repeats):
    model, data, mems = eval_setup('hyper_router', device)
    fns = {}
    for k in (1, 2, 4, 8, 16):
        def run(k=k):
            set_top_k(model, k)
            with torch.no_grad():
                model(data, data, *mems)
        fns[k] = run
    t = time_interleaved(fns, repeats, device)
    flops = {k: analytic_eval_flops(SMALL, k) for k in fns}
    rows = {k: {'eval_s': t[k], 'time_vs_k16': t[k] / t[16], 'flops': flops[k], 'flops_vs_k16': flops[k] / flops[16]}
            for k in fns}
    return {'eval_over_k': rows, 'eval_k1_vs_k16': t[1] / t[16]}


def bench_hyper_vs_smoe_dropout(device, repeats, bsz, tgt_len):
    fns_train, fns_eval = {}, {}
    for gate_name in ('hyper_router', 'smoe_dropout'):
        torch.manual_seed(0)
        model = MemTransformerLM(**dict(SMALL, gate_name=gate_name, tgt_len=tgt_len)).to(device)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2.5e-4)
        set_top_k(model, 8)
        data = torch.randint(0, 204, (tgt_len + 1, bsz), device=device)

        def step(model=model, opt=opt, data=data):
            model.train()
            opt.zero_grad()
            model(data[:-1], data[1:])[0].mean().backward()
            opt.step()
        fns_train[gate_name] = step

        eval_model, eval_data, mems = eval_setup(gate_name, device)
        set_top_k(eval_model, 2)

        def evaluate(model=eval_model, data=eval_data, mems=mems):
            with torch.no_grad():
                model(data, data, *mems)
        fns_eval[gate_name] = evaluate
    t_train = time_interleaved(fns_train, repeats, device)
    t_eval = time_interleaved(fns_eval, repeats * 2, device)
    return {'train_step_s': t_train, 'eval_s': t_eval,
            'hyper_vs_smoe_dropout_train': t_train['hyper_router'] / t_train['smoe_dropout'],
            'hyper_vs_smoe_dropout_eval': t_eval['hyper_router'] / t_eval['smoe_dropout']}


def bench_hyper_expert(device, n_tokens, repeats):
    torch.manual_seed(0)
    hyper_expert = HyperExpert(16, HyperExpertGenerator(256, 4), layer_index=0).to(device)
    x = torch.randn(n_tokens, 256, device=device, requires_grad=True)
    top_idx = torch.rand(n_tokens, 16, device=device).topk(2, dim=-1).indices         # [T, 2], random sets
    fns = {per_set: lambda per_set=per_set: hyper_expert(x, top_idx, per_set=per_set).sum().backward()
           for per_set in (True, False)}
    t = time_interleaved(fns, repeats, device)
    return {'hyper_expert_per_set_s': t[True], 'hyper_expert_per_token_s': t[False],
            'hyper_expert_per_set_vs_per_token': t[True] / t[False]}


def print_report(res):
    print(f"device {res['device']}, torch {res['torch']}, {res['threads']} threads")
    print(f"(a) MoE block fwd+bwd, k=2, {res['block_tokens']} tokens: {res['moe_block_s'] * 1e3:.1f} ms "
          f"vs floor {res['floor_s'] * 1e3:.1f} ms")
    print('(b) eval forward (batch 10, tgt 128, mem 896)')
    print(f"    {'k':>3} {'ms':>9} {'time/k16':>9} {'FLOPs/k16':>10} {'GFLOPs':>8}")
    for k, row in res['eval_over_k'].items():
        print(f"    {k:>3} {row['eval_s'] * 1e3:9.1f} {row['time_vs_k16']:9.3f} {row['flops_vs_k16']:10.3f} "
              f"{row['flops'] / 1e9:8.2f}")
    print(f"(c) train step (batch {res['train_bsz']}, tgt {res['train_tgt_len']}, k=8): "
          + ', '.join(f'{g} {s * 1e3:.1f} ms' for g, s in res['train_step_s'].items()))
    print('    eval forward (k=2): ' + ', '.join(f'{g} {s * 1e3:.1f} ms' for g, s in res['eval_s'].items()))
    print(f"(d) HyperExpert fwd+bwd, k=2, {res['hyper_expert_tokens']} tokens: one adapter per expert set "
          f"{res['hyper_expert_per_set_s'] * 1e3:.1f} ms, per token {res['hyper_expert_per_token_s'] * 1e3:.1f} ms")
    print('\nratio                              measured  target')
    for name, target in TARGETS.items():
        verdict = 'ok' if res[name] <= target else 'MISSED'
        print(f'{name:34} {res[name]:8.3f}  <= {target:.2f}  {verdict}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--block_tokens', type=int, default=512 * 22, help='tokens through the MoE block (a)')
    parser.add_argument('--hyper_expert_tokens', type=int, default=2048, help='tokens through the HyperExpert (d)')
    parser.add_argument('--train_bsz', type=int, default=22)
    parser.add_argument('--train_tgt_len', type=int, default=512)
    parser.add_argument('--json', default='bench.json')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    res = {'device': str(device), 'torch': torch.__version__, 'threads': torch.get_num_threads(),
           'block_tokens': args.block_tokens, 'hyper_expert_tokens': args.hyper_expert_tokens,
           'train_bsz': args.train_bsz, 'train_tgt_len': args.train_tgt_len}
    res.update(bench_moe_block(device, args.block_tokens, args.repeats))
    res.update(bench_eval_over_k(device, args.repeats))
    res.update(bench_hyper_vs_smoe_dropout(device, args.repeats, args.train_bsz, args.train_tgt_len))
    res.update(bench_hyper_expert(device, args.hyper_expert_tokens, args.repeats))
    print_report(res)
    with open(args.json, 'w') as f:
        json.dump(res, f, indent=2)
    print(f'\nwrote {args.json}')


if __name__ == '__main__':
    main()
