"""Transformer-XL: memory, relative attention, adaptive softmax, state_dict layout, parameter counts."""
import pytest
import torch
import torch.nn.functional as F

from adaptive_softmax import ProjectedAdaptiveLogSoftmax
from hyper_router import param_breakdown
from mem_transformer import MemTransformerLM, shifted_position_scores
from tests.conftest import TINY, tiny_model

SMALL_ENWIK8 = dict(n_token=204, n_layer=4, n_head=8, d_model=256, d_head=64, d_inner=512, dropout=0.1,
                    dropatt=0.0, tgt_len=512, mem_len=512, moe=True, moe_num_expert=16, moe_top_k=2,
                    moe_index='0,1,2,3')


def test_forward_returns_per_token_loss_and_new_mems(tokens):
    model = tiny_model()
    out = model(tokens[:-1], tokens[1:])
    loss, mems = out[0], out[1:]
    assert loss.shape == (12, 3)
    assert len(mems) == TINY['n_layer'] + 1
    assert all(m.shape == (TINY['mem_len'], 3, TINY['d_model']) for m in mems)
    out2 = model(tokens[:4], tokens[1:5], *mems)
    assert all(m.shape == (TINY['mem_len'], 3, TINY['d_model']) for m in out2[1:])
    model.reset_length(4, 0, 0)
    assert len(model(tokens[:4], tokens[1:5])) == 1                      # no memory kept


@pytest.mark.device
@pytest.mark.parametrize('gate_name', ['smoe', 'hyper_router'])
def test_second_segment_with_memory_equals_one_pass_with_context(gate_name, tokens, device):
    model = tiny_model(gate_name=gate_name, mem_len=6).to(device).eval()
    data, target = tokens[:-1].to(device), tokens[1:].to(device)          # 12 tokens
    with torch.no_grad():
        model.reset_length(6, 0, 6)
        first = model(data[:6], target[:6])
        second = model(data[6:], target[6:], *first[1:])[0]
        model.reset_length(12, 0, 0)
        whole = model(data, target)[0]
    torch.testing.assert_close(second, whole[6:], atol=1e-5, rtol=1e-5)


def test_memory_keeps_the_newest_mem_len_states(tokens):
    model = tiny_model(mem_len=4).eval()
    with torch.no_grad():
        hidden_mems = model(tokens[:5], tokens[1:6])[1:]
        model.reset_length(5, 0, 0)
        states = []
        model.layers[0].register_forward_pre_hook(lambda mod, args: states.append(args[0].clone()))
        model(tokens[:5], tokens[1:6])
    torch.testing.assert_close(hidden_mems[0], states[0][-4:])           # layer-0 input, last 4 steps


def test_position_scores_are_aligned_with_relative_distance():
    n_head, bsz, qlen, mlen, d_head = 2, 3, 5, 4, 6
    klen = qlen + mlen
    q = torch.randn(n_head, bsz, qlen, d_head, dtype=torch.double)
    r_k = torch.randn(n_head, d_head, klen, dtype=torch.double)          # column t: distance klen-1-t
    scores = shifted_position_scores(q, r_k)
    assert scores.shape == (n_head, bsz, qlen, klen)
    for i in range(qlen):
        for j in range(mlen + i + 1):                                     # every key query i may see
            column = klen - 1 - (mlen + i - j)
            expected = torch.einsum('hbd,hd->hb', q[:, :, i], r_k[:, :, column])
            torch.testing.assert_close(scores[:, :, i, j], expected)


def test_fused_inference_attention_equals_the_autograd_path(tokens):
    model = tiny_model(mem_len=6).eval()
    with torch.no_grad():                                                 # fused kernel
        first = model(tokens[:6], tokens[1:7])
        fused = model(tokens[6:12], tokens[7:13], *first[1:])[0]
    explicit = model(tokens[6:12], tokens[7:13], *first[1:])[0]          # grad enabled: explicit path
    assert explicit.requires_grad
    torch.testing.assert_close(fused, explicit.detach(), atol=1e-5, rtol=1e-5)


def test_same_length_gives_every_query_the_same_number_of_keys():
    model = tiny_model(same_length=True, mem_len=4)
    mask = model._attn_mask(qlen=4, mlen=4, device='cpu')
    assert (~mask).sum(1).tolist() == [4, 4, 4, 4]
    plain = tiny_model(mem_len=4)._attn_mask(qlen=4, mlen=4, device='cpu')
    assert (~plain).sum(1).tolist() == [5, 6, 7, 8]


def test_same_length_without_a_memory_is_refused():
    """Without a memory the same_length mask would hide every key of the first query (a NaN loss)."""
    with pytest.raises(ValueError, match='same_length needs mem_len > 0'):
        tiny_model(same_length=True, mem_len=0)


def test_clamp_len_caps_the_relative_distances(tokens):
    seen = []
    model = tiny_model(clamp_len=2).eval()
    model.pos_emb.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    model(tokens[:-1], tokens[1:])
    assert seen[0].max().item() == 2 and seen[0][-3:].tolist() == [2.0, 1.0, 0.0]


@pytest.mark.parametrize('div_val', [1, 2])
def test_adaptive_softmax_is_a_normalised_distribution(div_val):
    torch.manual_seed(0)
    crit = ProjectedAdaptiveLogSoftmax(n_token=30, d_embed=8, d_proj=6, cutoffs=[10, 20], div_val=div_val)
    for p in crit.parameters():
        p.data.normal_(0, 0.3)
    hidden = torch.randn(4, 6)
    nll = torch.stack([crit(hidden, torch.full((4,), t)) for t in range(30)], 1)   # [4, V]
    torch.testing.assert_close(torch.exp(-nll).sum(1), torch.ones(4))


def test_plain_softmax_loss_is_cross_entropy_of_tied_embedding(tokens):
    model = tiny_model(moe=False).eval()
    with torch.no_grad():
        hidden, _ = model.forward_hidden(tokens[:-1], model.init_mems())
        logits = hidden @ model.word_emb.emb_layers[0].weight.t() + model.crit.out_layers[0].bias
        expected = F.cross_entropy(logits.view(-1, TINY['n_token']), tokens[1:].reshape(-1), reduction='none')
        torch.testing.assert_close(model(tokens[:-1], tokens[1:])[0].view(-1), expected)
    assert model.crit.out_layers[0].weight is model.word_emb.emb_layers[0].weight


def reference_keys(n_layer, moe_layers, gate_keys, expert_shapes, dense_shapes, d=256, n_token=204):
    """The state_dict layout listed in REFERENCE.md (reference Transformer-XL + fastmoe names)."""
    keys = {'r_w_bias': (8, 64), 'r_r_bias': (8, 64), 'word_emb.emb_layers.0.weight': (n_token, d),
            'pos_emb.inv_freq': (d // 2,), 'crit.out_layers.0.weight': (n_token, d),
            'crit.out_layers.0.bias': (n_token,)}
    for layer in range(n_layer):
        p = f'layers.{layer}.'
        keys.update({p + 'dec_attn.qkv_net.weight': (3 * 512, d), p + 'dec_attn.o_net.weight': (d, 512),
                     p + 'dec_attn.r_net.weight': (512, d), p + 'dec_attn.layer_norm.weight': (d,),
                     p + 'dec_attn.layer_norm.bias': (d,), p + 'pos_ff.layer_norm.weight': (d,),
                     p + 'pos_ff.layer_norm.bias': (d,)})
        shapes = {**expert_shapes, **gate_keys} if layer in moe_layers else dense_shapes
        keys.update({p + 'pos_ff.' + k: v for k, v in shapes.items()})
    return keys


def state_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_state_dict_of_dense_model_matches_reference_layout():
    dense = {'CoreNet.0.weight': (8192, 256), 'CoreNet.0.bias': (8192,), 'CoreNet.3.weight': (256, 8192),
             'CoreNet.3.bias': (256,)}
    model = MemTransformerLM(**dict(SMALL_ENWIK8, moe=False, d_inner=8192))
    assert state_shapes(model) == reference_keys(4, [], {}, {}, dense)


@pytest.mark.parametrize('gate_name,gate_keys', [
    ('CustomNaiveGate', {'gate.gate.weight': (16, 256), 'gate.gate.bias': (16,)}),
    ('HyperRouterGate', {'gate.embedding': (1, 256), 'gate.hypernet.0.weight': (256, 256),
                         'gate.hypernet.0.bias': (256,), 'gate.hypernet.2.weight': (16 * 257, 256),
                         'gate.hypernet.2.bias': (16 * 257,)}),
])
def test_state_dict_of_moe_model_matches_reference_layout(gate_name, gate_keys):
    experts = {'experts.htoh4.weight': (16, 512, 256), 'experts.htoh4.bias': (16, 512),
               'experts.h4toh.weight': (16, 256, 512), 'experts.h4toh.bias': (16, 256)}
    dense = {'CoreNet.0.weight': (512, 256), 'CoreNet.0.bias': (512,), 'CoreNet.3.weight': (256, 512),
             'CoreNet.3.bias': (256,)}
    model = MemTransformerLM(**dict(SMALL_ENWIK8, gate_name=gate_name, moe_index='0,2'))
    before = state_shapes(model)
    assert before == reference_keys(4, [0, 2], gate_keys, experts, dense)
    model.eval()
    with torch.no_grad():
        model(torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long))
    assert state_shapes(model) == before                                  # nothing appears after a forward
    MemTransformerLM(**dict(SMALL_ENWIK8, gate_name=gate_name, moe_index='0,2')).load_state_dict(
        model.state_dict(), strict=True)


@pytest.mark.parametrize('gate_name,expected', [
    ('smoe_dropout', dict(router_embedding=0, router=16_448, hypernetwork=0, transformer=19_505_356,
                          trainable=19_505_356, frozen=16_448)),
    ('hyper_router', dict(router_embedding=1_024, router=16_448, hypernetwork=4 * 1_122_576,
                          transformer=19_505_356, trainable=19_505_356 + 1_024, frozen=4 * 1_122_576)),
])
def test_param_breakdown_of_the_small_enwik8_model(gate_name, expected):
    counts = param_breakdown(MemTransformerLM(**dict(SMALL_ENWIK8, gate_name=gate_name, hyper_size=256)))
    assert {k: counts[k] for k in expected} == expected


def test_initialisation_follows_the_reference():
    model = MemTransformerLM(**dict(SMALL_ENWIK8, gate_name='smoe'))
    ln = model.layers[0].dec_attn.layer_norm
    experts = model.layers[1].pos_ff.experts
    assert abs(model.layers[0].dec_attn.qkv_net.weight.std().item() - 0.02) < 1e-3
    assert abs(experts.htoh4.weight.std().item() - 0.02) < 1e-3 and experts.htoh4.bias.abs().max() == 0
    assert abs(ln.weight.mean().item() - 1) < 0.01 and abs(ln.weight.std().item() - 0.02) < 0.005
    assert abs(model.r_w_bias.std().item() - 0.02) < 0.005
    assert abs(model.word_emb.emb_layers[0].weight.std().item() - 0.02) < 1e-3
    assert model.crit.out_layers[0].bias.abs().max() == 0


def test_bad_moe_index_and_top_k_are_clear_errors():
    with pytest.raises(ValueError, match=r'moe_index \[5\] outside the layers 0..1'):
        tiny_model(moe_index='0,5')
    with pytest.raises(ValueError, match='moe_top_k must be between 1 and moe_num_expert'):
        tiny_model(moe_top_k=5)
    with pytest.raises(ValueError, match='moe_top_k must be between 1 and moe_num_expert'):
        tiny_model(moe_top_k=0)


def train_losses(seed, tokens, gate_name):
    model = tiny_model(seed=seed, gate_name=gate_name, dropout=0.1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(seed)
    losses, mems = [], ()
    for _ in range(4):
        out = model(tokens[:-1], tokens[1:], *mems)
        loss, mems = out[0].mean(), out[1:]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize('gate_name', ['smoe', 'smoe_dropout', 'hyper_router'])
def test_same_seed_gives_bit_identical_training_losses(gate_name, tokens):
    first = train_losses(7, tokens, gate_name)
    assert first == train_losses(7, tokens, gate_name)
    assert first != train_losses(8, tokens, gate_name)
    assert first[-1] < first[0]
