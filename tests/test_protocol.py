"""The evaluation protocol, computed by hand and compared with what train.py and eval.py report.

The reference Transformer-XL protocol: the split cut into 10 contiguous columns, windows of
eval_tgt_len tokens read in order, each window attending to the memory of the previous ones, kept
mem_len + tgt_len - eval_tgt_len long (the context of training), and the test metric the
token-weighted mean NLL in bits (loss / ln 2). Here the batching, the windows, the memory trimming
and the mean are done in the test: the model is only asked for the losses of one window given a
memory, and it keeps every state it is given (its own trimming is not used).
"""
import glob
import json
import math
import os

import numpy as np
import pytest
import torch

import eval as eval_script
import evaluation
import train
from data_utils import get_lm_corpus
from hyper_router import set_top_k

BATCH = 10
TGT_LEN, MEM_LEN, EVAL_TGT_LEN = 8, 6, 4          # evaluation memory 6 + 8 - 4 = 10, not 6
# 27 rows of 10 columns: 26 predictions per column, six windows of 4 and a last one of 2 (token weighting matters)
N_TEST = 27 * BATCH + 3
RUN_ARGS = ['--dataset', 'enwik8', '--n_layer', '2', '--d_model', '16', '--n_head', '2', '--d_head', '8',
            '--d_inner', '12', '--dropout', '0', '--tgt_len', str(TGT_LEN), '--mem_len', str(MEM_LEN),
            '--eval_tgt_len', str(EVAL_TGT_LEN), '--batch_size', '4', '--moe', '--moe-num-expert', '4',
            '--moe-top-k', '2', '--gate_name', 'CustomNaiveGate', '--max_step', '6', '--eval-interval', '3',
            '--lr', '0.05', '--eval_ks', '1,2,4', '--log-interval', '3']


def write_enwik8_format(folder, seed=0):
    """A small corpus in the enwik8 format: bytes with a few long-range repeats, so the memory helps."""
    rng = np.random.default_rng(seed)
    motif = rng.integers(97, 109, size=23)
    sizes = {'train': 2000, 'valid': 400, 'test': N_TEST}
    os.makedirs(folder)
    for split, size in sizes.items():
        noise = rng.integers(97, 109, size=size)
        stream = np.where(rng.random(size) < 0.5, np.resize(motif, size), noise)
        with open(os.path.join(folder, f'{split}.txt'), 'w') as f:
            f.write(' '.join(str(b) for b in stream) + '\n')
    return str(folder)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """(run directory, corpus) of a 6-step MoE run whose end-of-training test evaluated the whole test split."""
    root = tmp_path_factory.mktemp('protocol')
    data = write_enwik8_format(root / 'enwik8')
    work = str(root / 'runs')
    train.main([*RUN_ARGS, '--data', data, '--work_dir', work])
    [run_dir] = glob.glob(f'{work}-enwik8/*')
    return run_dir, get_lm_corpus(data, 'enwik8')


def hand_bpc(model, stream, k, memory_len):
    """Token-weighted mean NLL in bits over `stream`, batched, windowed and remembered as the protocol says."""
    n_rows = len(stream) // BATCH
    columns = stream[:n_rows * BATCH].view(BATCH, n_rows).t()                   # [n_rows, 10]: column b = stretch b
    set_top_k(model, k)
    model.eval().reset_length(EVAL_TGT_LEN, 0, 10 ** 9)                         # keep every state it is given
    total_nll, n_tokens, mems = 0.0, 0, ()
    with torch.no_grad():
        for start in range(0, n_rows - 1, EVAL_TGT_LEN):
            end = min(start + EVAL_TGT_LEN, n_rows - 1)
            data, target = columns[start:end], columns[start + 1:end + 1]       # [T, 10]
            out = model(data, target, *mems)
            mems = [m[-memory_len:] for m in out[1:]]                          # the newest memory_len states
            total_nll += out[0].double().sum().item()
            n_tokens += out[0].numel()
    assert n_tokens == (n_rows - 1) * BATCH
    return total_nll / n_tokens / math.log(2)


def hand_results(run_dir, corpus, filename, memory_len=MEM_LEN + TGT_LEN - EVAL_TGT_LEN):
    ckpt = evaluation.load_checkpoint(os.path.join(run_dir, filename))
    model = evaluation.model_from_checkpoint(ckpt)
    return {str(k): hand_bpc(model, corpus.test, k, memory_len) for k in (1, 2, 4)}


def results_of(path):
    with open(path) as f:
        return {entry['checkpoint']: entry['results'] for entry in json.load(f)}


def test_end_of_training_test_and_eval_py_give_the_hand_computed_metric(run, tmp_path):
    run_dir, corpus = run
    out = str(tmp_path / 'eval.json')
    eval_script.main(['--run', run_dir, '--ks', '1,2,4', '--json', out])
    reported = {'results.json (train.py)': results_of(os.path.join(run_dir, 'results.json')),
                'eval.py': results_of(out)}
    for kind, filename in evaluation.CHECKPOINTS.items():
        expected = hand_results(run_dir, corpus, filename)
        for source, results in reported.items():
            assert results[kind] == pytest.approx(expected, rel=1e-9, abs=0), (source, kind)


def test_the_protocol_details_change_the_metric_so_the_comparison_can_see_them(run):
    """Each detail the hand computation follows moves the number by far more than the tolerance above."""
    run_dir, corpus = run
    expected = hand_results(run_dir, corpus, 'model_best.pt')
    training_memory = hand_results(run_dir, corpus, 'model_best.pt', memory_len=MEM_LEN)
    for k in expected:
        assert abs(training_memory[k] - expected[k]) > 1e-6 * expected[k]


def test_validation_keeps_the_checkpoint_with_the_hand_computed_validation_loss(run):
    """model_best.pt records its validation loss at k = --moe-top-k; the same protocol on the valid split."""
    run_dir, corpus = run
    ckpt = evaluation.load_checkpoint(os.path.join(run_dir, 'model_best.pt'))
    model = evaluation.model_from_checkpoint(ckpt)
    assert ckpt['val_loss'] == pytest.approx(hand_bpc(model, corpus.valid, 2, MEM_LEN + TGT_LEN - EVAL_TGT_LEN)
                                             * math.log(2), rel=1e-9)
