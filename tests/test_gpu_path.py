"""The GPU path, made right before its first run (issue 19): what a CPU can check of it.

The torch bound, fp32 sums and products under bf16 autocast, the attention backend pinned for BD's
gradient, no host read in a training step, the engine chosen per GPU capability, fused Adam and DDP
without a gradient all-reduce per batch chunk.
"""
import importlib

import pytest
import torch

import moe_engine
import torch_version


def test_an_older_torch_stops_at_import_with_one_line(monkeypatch):
    monkeypatch.setattr(torch, '__version__', '2.3.1+cu121')
    with pytest.raises(SystemExit) as stop:
        importlib.reload(moe_engine)
    assert str(stop.value) == "error: this code needs torch >= 2.7 (found 2.3.1+cu121): pip install 'torch>=2.7'"


@pytest.mark.parametrize('version', ['2.7.0', '2.7.1+cu126', '2.10.0a0+git1234', '3.0.0'])
def test_the_bound_and_newer_torch_pass(version):
    torch_version.check_torch(version)
