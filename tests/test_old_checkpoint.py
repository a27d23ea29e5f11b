"""A checkpoint written before the router registry and the model config object still loads and gives the numbers
it gave then: tests/fixtures/old_hyper_router_run holds a 20-step HyperRouter run (hyper_size 8) made by the code of
commit 12876d3, with the validation bits per character eval.py printed for it then (expected_eval.json)."""
import json
import os
import shutil

import evaluation
from data_utils import get_lm_corpus
from mem_transformer import MemTransformerLM
from model_config import ModelConfig

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


def test_an_old_flat_model_config_reads_as_the_router_it_named():
    """The fixture's config.json holds the flat form (gate_name, hyper_size 8 and every other router's settings):
    it reads as HyperRouter with hyper_size 8, and the model it builds holds the checkpoint's weights exactly."""
    with open(os.path.join(FIXTURE, 'config.json')) as f:
        flat = json.load(f)['model_config']
    assert flat['gate_name'] == 'hyper_router' and flat['hyper_size'] == 8 and 'router' not in flat
    config = ModelConfig.from_dict(flat)
    assert config.router.to_dict() == {'name': 'hyper_router', 'settings': {'hyper_size': 8}}
    assert evaluation.method_name(flat) == 'HyperRouter'
    ckpt = evaluation.load_checkpoint(os.path.join(FIXTURE, 'model_best.pt'))
    model = MemTransformerLM(ModelConfig.from_dict(config.to_dict()))
    model.load_state_dict(ckpt['model'])          # strict: the same parameters and shapes
