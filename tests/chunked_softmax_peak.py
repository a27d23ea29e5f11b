"""Peak memory of the plain softmax's loss, in a process of its own (run by tests/test_chunked_softmax.py).

    MALLOC_MMAP_THRESHOLD_=65536 python tests/chunked_softmax_peak.py [V N d]

Prints, for the loss in one piece (whole) and in chunks (chunked), how far the process's peak resident memory rose above its resident memory during the loss (train:
forward and backward; eval: forward without gradient), in MiB, and the size of one fp32 copy of the [N, V]
logits: one line `mode kind MiB logits-MiB` each. A first pass of the same loss warms up torch's one-off allocations (thread pools, kernels); Linux's
/proc/self/clear_refs then resets the peak (VmHWM) to the resident memory (VmRSS) before the measured pass.
MALLOC_MMAP_THRESHOLD_ makes glibc map every block above 64 KiB on its own and unmap it when freed, so that
the resident memory follows the live tensors (else a freed chunk stays resident and is reused unseen).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from adaptive_softmax import ProjectedAdaptiveLogSoftmax  # noqa: E402

CHUNK = 2 ** 20                       # logits per chunk in the chunked form (4 MiB in fp32)


def memory_mib(field):
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MiB."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':')) / 1024


def loss(crit, hidden, target, kind):
    with torch.set_grad_enabled(kind == 'train'):
        value = crit(hidden, target).mean()
        if kind == 'train':
            value.backward()


def measure(mode, kind, n_token, n_rows, d):
    torch.manual_seed(0)
    crit = ProjectedAdaptiveLogSoftmax(n_token, d, d, [], chunk_elements=CHUNK if mode == 'chunked' else 2 ** 62)
    hidden = torch.randn(n_rows, d, requires_grad=kind == 'train')
    target = torch.randint(n_token, (n_rows,))
    loss(crit, hidden, target, kind)
    hidden.grad = crit.out_layers[0].weight.grad = crit.out_layers[0].bias.grad = None
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')                                   # VmHWM := VmRSS
    before = memory_mib('VmRSS')
    loss(crit, hidden, target, kind)
    return memory_mib('VmHWM') - before


def main(n_token=16384, n_rows=2048, d=64):
    for mode in ('whole', 'chunked'):
        for kind in ('train', 'eval'):
            print(f'{mode} {kind} {measure(mode, kind, n_token, n_rows, d):.1f} {n_rows * n_token * 4 / 2 ** 20:.1f}')


if __name__ == '__main__':
    main(*map(int, sys.argv[1:]))
