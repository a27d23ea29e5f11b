"""The paper's small enwik8 model and its analytic FLOPs: what bench.py measures against and Table A3 quotes.

Counted by formula (FLOPS_FORMULA), not traced, so that a test can check them by hand and the traced
counts of analysis.py against them.
"""

# the paper's small enwik8 model (Table A1): 4 layers, d 256, 16 experts of width 512, MoE in every layer
SMALL = dict(n_token=204, n_layer=4, n_head=8, d_model=256, d_head=64, d_inner=512, dropout=0.1,
             dropatt=0.0, tgt_len=512, mem_len=512, moe=True, moe_num_expert=16, moe_top_k=2,
             moe_index='0,1,2,3', hyper_size=256)

FLOPS_FORMULA = """model FLOPs of a training step = 3 x forward (backward = 2 x forward), 2 FLOPs per multiply-add;
forward = n_layer x (attention + FFN) + softmax, B batch, T segment, M memory, K = M + T, HD = n_head x d_head:
  attention = 2 K B d 3HD (qkv over memory + segment) + 2 K d HD (r_net) + 3 x 2 B T K HD (AC, BD, prob @ v)
              + 2 B T HD d (o_net)
  FFN       = 2 B T (d E + k x 2 d h) (router + k experts), + 2 (d s + s E (d + 1)) (HyperRouter's hypernetwork);
              dense: 2 B T x 2 d d_inner
  softmax   = 2 B T d V"""


def analytic_eval_flops(cfg, k, bsz=10, qlen=128, mlen=896):
    """FLOPs of one evaluation forward (HyperRouter's router cached: no hypernetwork), default the reference protocol."""
    return analytic_forward_flops(dict(cfg, gate_name=None), k, bsz, qlen, mlen)


def analytic_forward_flops(cfg, k, bsz, qlen, mlen):
    """FLOPs (2 per multiply-add) of one forward (FLOPS_FORMULA); attention recomputes K/V over memory."""
    d, hd, klen = cfg['d_model'], cfg['n_head'] * cfg['d_head'], qlen + mlen
    attn = (2 * klen * bsz * d * 3 * hd            # qkv_net over memory + segment
            + 2 * klen * d * hd                    # r_net
            + 3 * 2 * bsz * qlen * klen * hd       # content and position scores, prob @ v
            + 2 * bsz * qlen * hd * d)             # o_net
    if cfg['moe']:
        num_expert, hyper = cfg['moe_num_expert'], cfg.get('hyper_size', 0)
        ffn = 2 * bsz * qlen * (d * num_expert + k * 2 * d * cfg['d_inner'])
        if cfg.get('gate_name') == 'hyper_router':
            ffn += 2 * (d * hyper + hyper * num_expert * (d + 1))
    else:
        ffn = 2 * bsz * qlen * 2 * d * cfg['d_inner']
    softmax = 2 * bsz * qlen * d * cfg['n_token']
    return cfg['n_layer'] * (attn + ffn) + softmax
