"""The plain softmax's loss in chunks of rows (adaptive_softmax.py): the same numbers, a chunk's memory."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from adaptive_softmax import CHUNK_ELEMENTS, ProjectedAdaptiveLogSoftmax
from tests.conftest import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def naive_nll(hidden, weight, bias, target):
    """-log softmax(h W^T + b)[target], every row at once (the loss before chunking)."""
    return -F.log_softmax(F.linear(hidden, weight, bias), -1).gather(1, target[:, None]).squeeze(1)


def loss_and_grads(crit, hidden, target):
    hidden = hidden.detach().requires_grad_()
    nll = crit(hidden, target)
    (nll * torch.linspace(0.5, 1.5, nll.numel())).sum().backward()     # a different weight per row
    layer = crit.out_layers[0]
    grads = hidden.grad, layer.weight.grad, layer.bias.grad
    layer.weight.grad = layer.bias.grad = None
    return nll.detach(), grads


@pytest.mark.parametrize('n_rows, chunk_rows', [(40, 3), (41, 3), (7, 3), (1000, 64), (1003, 250)])
def test_chunked_loss_equals_the_whole_softmax_and_its_gradients(n_rows, chunk_rows):
    torch.manual_seed(0)
    n_token, d = 97, 16
    crit = ProjectedAdaptiveLogSoftmax(n_token, d, d, [], chunk_elements=chunk_rows * n_token)
    with torch.no_grad():
        crit.out_layers[0].bias.normal_()
    hidden, target = torch.randn(n_rows, d), torch.randint(n_token, (n_rows,))
    nll, (grad_hidden, grad_weight, grad_bias) = loss_and_grads(crit, hidden, target)
    reference = ProjectedAdaptiveLogSoftmax(n_token, d, d, [])
    reference.load_state_dict(crit.state_dict())
    ref_nll, ref_grads = loss_and_grads(reference, hidden, target)
    layer = crit.out_layers[0]
    assert torch.equal(ref_nll, naive_nll(hidden, layer.weight, layer.bias, target))   # the whole path is the naive
    # row-wise: the loss and the hidden state's gradient are computed per row as before; bit for bit where the
    # BLAS runs a chunk's rows as it runs the whole's (chunks of 64 rows and more here), else within a rounding
    if chunk_rows >= 64:
        assert torch.equal(nll, ref_nll) and torch.equal(grad_hidden, ref_grads[0])
    torch.testing.assert_close(nll, ref_nll, rtol=2e-7, atol=0)
    torch.testing.assert_close(grad_hidden, ref_grads[0], rtol=1e-6, atol=1e-7)
    # the weights' gradients are sums over the rows, now one per chunk added up: fp32 rounding of the order
    for grad, ref in ((grad_weight, ref_grads[1]), (grad_bias, ref_grads[2])):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_a_word_level_model_trains_and_evaluates_the_same_with_the_chunked_loss(tokens):
    def step(chunk_elements):
        model = tiny_model(gate_name='smoe')
        model.crit.chunk_elements = chunk_elements
        nll = model(tokens[:-1], tokens[1:])[0]
        nll.mean().backward()
        with torch.no_grad():
            evaluated = model.eval()(tokens[:-1], tokens[1:])[0]
        return nll.detach(), evaluated, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    whole, chunked = step(CHUNK_ELEMENTS), step(5 * 37)           # 36 rows of 37 words: 8 chunks of 4 or 5 rows
    torch.testing.assert_close(chunked[0], whole[0], rtol=2e-7, atol=0)
    torch.testing.assert_close(chunked[1], whole[1], rtol=2e-7, atol=0)
    assert chunked[2].keys() == whole[2].keys()
    for name in whole[2]:
        torch.testing.assert_close(chunked[2][name], whole[2][name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_character_level_batch_stays_one_piece_bit_for_bit():
    torch.manual_seed(0)
    crit = ProjectedAdaptiveLogSoftmax(204, 16, 16, [])                 # enwik8's 204 symbols, batch 22 x 512
    hidden, target = torch.randn(22 * 512, 16), torch.randint(204, (22 * 512,))
    assert 22 * 512 * 204 <= CHUNK_ELEMENTS
    layer = crit.out_layers[0]
    with torch.no_grad():
        assert torch.equal(crit(hidden, target), naive_nll(hidden, layer.weight, layer.bias, target))


@pytest.fixture(scope='module')
def measured_peaks():
    """{(mode, kind): (peak MiB, MiB of one fp32 copy of the logits)} from tests/chunked_softmax_peak.py."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, 'tests/chunked_softmax_peak.py'], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120, check=True)
    return {(mode, kind): (float(peak), float(logits))
            for mode, kind, peak, logits in (line.split() for line in result.stdout.splitlines())}


@pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs'), reason='measures the peak through Linux /proc')
@pytest.mark.parametrize('kind', ['train', 'eval'])
def test_the_chunked_loss_peaks_at_a_few_chunks_where_the_whole_one_holds_the_logits(measured_peaks, kind):
    # V 16384, 2048 rows: the logits are 128 MiB in fp32; a chunk is 2**20 of them, 4 MiB
    whole, logits = measured_peaks['whole', kind]
    chunked, _ = measured_peaks['chunked', kind]
    assert whole >= (2 if kind == 'train' else 1) * logits          # the measure sees the logits' copies
    assert chunked <= 5 * 4                                          # a few chunks (and the weights' gradient)
