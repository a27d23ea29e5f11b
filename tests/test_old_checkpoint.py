"""A checkpoint written before the router registry and the model config object still loads and gives the numbers
it gave then: tests/fixtures/old_hyper_router_run holds a 20-step HyperRouter run (hyper_size 8) made by the code of
commit 12876d3, with the validation bits per character eval.py printed for it then (expected_eval.json)."""
import json
import os
import shutil

import evaluation
from data_utils import get_lm_corpus

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'old_hyper_router_run')


def test_old_checkpoint_gives_the_numbers_recorded_by_the_old_code(tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(FIXTURE, run)
    with open(run / 'expected_eval.json') as f:
        expected = json.load(f)
    corpus = get_lm_corpus(str(tmp_path / 'synthetic'), 'synthetic')
    [entry] = evaluation.test_checkpoints(str(run), corpus, split='valid', ks=[1, 2, 4], max_eval_steps=3,
                                          log=lambda *_: None)
    assert entry['method'] == expected['method'] and entry['step'] == expected['step']
    assert {str(k): v for k, v in entry['results'].items()} == expected['valid_bpc']     # float for float
