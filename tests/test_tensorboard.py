"""What a run shows in TensorBoard, read back with TensorBoard's own readers: the HParams row (settings and the test
metric at each k, as results.json), the --valid_ks curves (as a direct evaluation of the same weights), the Text
tab, and no chart without data."""
import glob
import json
import math
import os
import shutil

import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator, plugin_event_multiplexer
from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
from tensorboard.context import RequestContext
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util

import eval as eval_script
import evaluation
import train
from data_utils import get_lm_corpus
from hyper_router import set_top_k
from tests.conftest import TINY_MOE_ARGS

RUN = ['--max_step', '6', '--eval-interval', '3', '--log-interval', '3', '--eval_ks', '1,2,4']
DYNAMIC_K = ['--gate_name', 'HyperRouterGate', '--dynamic_moe', '--moe-top-k-min', '1', '--moe-top-k-max', '4']
CAPACITY = ['--capacity_factor', '1.0', '--eval_capacity_factor', '1.0']


def train_run(work, synthetic_dir, *flags):
    train.main(['--data', synthetic_dir, '--work_dir', str(work), *TINY_MOE_ARGS, *flags])
    return sorted(glob.glob(f'{work}-synthetic/*'))[-1]


def read_events(run_dir):
    return plugin_event_accumulator.EventAccumulator(run_dir).Reload()


def scalar_points(events, tag):
    """[(step, value)] of a scalar as TensorBoard read it."""
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in events.Tensors(tag)]


def text(events, tag):
    return [tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in events.Tensors(f'{tag}/text_summary')]


def hparams_row(events):
    """(hparam columns {name: value}, metric column tags, session status) of the run's HParams session."""
    content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    experiment = hparams_metadata.parse_experiment_plugin_data(content[hparams_metadata.EXPERIMENT_TAG])
    start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    end = content.get(hparams_metadata.SESSION_END_INFO_TAG)
    values = {name: value.string_value if value.HasField('string_value') else value.number_value
              for name, value in start.hparams.items()}
    assert {h.name for h in experiment.hparam_infos} == set(values)      # a column for each
    status = hparams_metadata.parse_session_end_info_plugin_data(end).status if end else None
    return values, [m.name.tag for m in experiment.metric_infos], status


def read_results(run_dir, name='results.json'):
    with open(os.path.join(run_dir, name)) as f:
        return {e['checkpoint']: e for e in json.load(f)}


def settings(method, gate, k, experts, checkpoint):
    """The HParams columns of the runs here, written out."""
    return {'method': method, 'gate': gate, 'k': k, 'experts': experts, 'layers': 2, 'd_model': 16, 'dropout': 0.1,
            'lr': 0.00025, 'steps': 6, 'batch': 4, 'dataset': 'synthetic', 'seed': '1111', 'checkpoint': checkpoint,
            'precision': 'fp32'}


@pytest.fixture(scope='module')
def fixed_k_run(tmp_path_factory, synthetic_dir):
    """SMoE at k = 2, dropless, --valid_ks 1,2,4, stopped at step 3 and resumed; (run dir, checkpoint of step 3)."""
    root = tmp_path_factory.mktemp('fixed')
    flags = [*RUN, '--valid_ks', '1,2,4']
    run_dir = train_run(root / 'runs', synthetic_dir, *flags, '--stop_step', '3')
    step3 = str(root / 'step3.pt')
    shutil.copy(os.path.join(run_dir, evaluation.LAST_CHECKPOINT), step3)
    train.main(['--data', synthetic_dir, *TINY_MOE_ARGS, *flags, '--restart', '--restart_dir', run_dir])
    return run_dir, step3


@pytest.fixture(scope='module')
def dynamic_k_run(tmp_path_factory, synthetic_dir):
    """HyperRouter with k from 1 to 4 and a capacity, whose best-with-all-experts checkpoint stays at its first
    validation (step 2) while the one at the training k moves on: the HParams row must show the former."""
    validate = train.Trainer.validate

    def validate_keeping_the_first_dense(self):
        validate(self)
        self.best['best_dense'] = -math.inf
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.Trainer, 'validate', validate_keeping_the_first_dense)
        return train_run(tmp_path_factory.mktemp('dynamic') / 'runs', synthetic_dir, *RUN, '--eval-interval', '2',
                         *DYNAMIC_K, *CAPACITY)


def test_a_runs_hparams_row_holds_its_settings_and_the_test_of_its_training_k_checkpoint(fixed_k_run):
    run_dir, _ = fixed_k_run
    events = read_events(run_dir)
    values, metrics, status = hparams_row(events)
    assert values == settings('SMoE', 'smoe', '2', 4, 'best')
    assert metrics == ['test/bpc/k1', 'test/bpc/k2', 'test/bpc/k4']
    assert status == 1                                           # STATUS_SUCCESS: the final test is done
    content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.EXPERIMENT_TAG]
    shown = {h.name for h in hparams_metadata.parse_experiment_plugin_data(content).hparam_infos if h.differs}
    assert shown == {'method', 'gate', 'k', 'seed', 'checkpoint'}     # the five the HParams tab shows at first
    best = read_results(run_dir)['best']
    for k in ('1', '2', '4'):
        assert scalar_points(events, f'test/bpc/k{k}') == [(best['step'], pytest.approx(best['results'][k], rel=1e-6))]


def test_a_dynamic_k_run_shows_the_test_of_its_all_experts_checkpoint_from_its_step(dynamic_k_run):
    events = read_events(dynamic_k_run)
    values, metrics, _ = hparams_row(events)
    assert values == settings('HyperRouter', 'hyper_router', '1-3 linear_increase', 4, 'best_dense')  # k 3 at step 6
    results = read_results(dynamic_k_run)
    dense, best = results['best_dense'], results['best']
    assert (dense['step'], best['step']) == (2, 6) and dense['results'] != best['results']
    for k in ('1', '2', '4'):
        assert scalar_points(events, f'test/bpc/k{k}') == [(2, pytest.approx(dense['results'][k], rel=1e-6))]


def test_a_dense_runs_one_value_is_in_the_last_k_column(tmp_path, synthetic_dir):
    dense_flags = [f for f in TINY_MOE_ARGS if f not in ('--moe',)]
    dense_flags = dense_flags[:dense_flags.index('--moe-num-expert')]          # the tiny model without --moe
    work = tmp_path / 'runs'
    train.main(['--data', synthetic_dir, '--work_dir', str(work), *dense_flags, *RUN])
    run_dir = glob.glob(f'{work}-synthetic/*')[0]
    events = read_events(run_dir)
    values, metrics, _ = hparams_row(events)
    assert values == settings('Dense+Dropout', 'dense', 'all', 0, 'best')
    assert metrics == ['test/bpc/k1', 'test/bpc/k2', 'test/bpc/k4']
    entry = read_results(run_dir)['best']                      # a dense run keeps one checkpoint
    assert [t for t in events.Tags()['tensors'] if t.startswith('test/')] == ['test/bpc/k4']
    assert scalar_points(events, 'test/bpc/k4') == [(entry['step'], pytest.approx(entry['results']['dense'], rel=1e-6))]


def direct_valid_bpc(checkpoint_path, synthetic_dir, k):
    """The validation bpc of a checkpoint's weights at k, evaluated here (the run's protocol, batch 10)."""
    ckpt = evaluation.load_checkpoint(checkpoint_path)
    model = evaluation.model_from_checkpoint(ckpt)
    set_top_k(model, k)
    args = ckpt['args']
    windows = get_lm_corpus(synthetic_dir, 'synthetic').get_iterator('valid', 10, args['eval_tgt_len'],
                                                                     ext_len=args['ext_len'])
    return evaluation.evaluate(model, windows, args, args['max_eval_steps']) / math.log(2)


def test_valid_ks_curves_hold_a_direct_evaluation_at_each_k_and_validation(fixed_k_run, synthetic_dir):
    run_dir, step3 = fixed_k_run
    events = read_events(run_dir)
    step6 = os.path.join(run_dir, evaluation.LAST_CHECKPOINT)
    for k in (1, 2, 4):
        expected = [(3, direct_valid_bpc(step3, synthetic_dir, k)), (6, direct_valid_bpc(step6, synthetic_dir, k))]
        assert scalar_points(events, f'valid/bpc/k{k}') == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]
    assert direct_valid_bpc(step6, synthetic_dir, 1) != direct_valid_bpc(step6, synthetic_dir, 4)


def test_valid_ks_leaves_a_thor_run_as_without_it(tmp_path, synthetic_dir):
    """THOR routes at random in evaluation too: the extra validations must move neither the training's RNG nor
    the standard validation's draws."""
    thor = [*RUN, '--gate_name', 'thor', '--moe-top-k', '1']
    plain = train_run(tmp_path / 'a', synthetic_dir, *thor)
    with_ks = train_run(tmp_path / 'b', synthetic_dir, *thor, '--valid_ks', '1,2')

    def records(run_dir):
        """metrics.jsonl without the speed, the --valid_ks values and the test (compared in results.json)."""
        with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
            rows = [{k: v for k, v in json.loads(line).items() if k != 'tokens_per_s' and '/k' not in k} for line in f]
        return [row for row in rows if len(row) > 2]
    assert records(with_ks) == records(plain)
    assert read_results(with_ks) == read_results(plain)


def test_dropped_fraction_charts_appear_only_with_a_capacity_and_load_histograms_name_their_layer(
        fixed_k_run, dynamic_k_run):
    dropless, capped = read_events(fixed_k_run[0]), read_events(dynamic_k_run)
    assert not [t for t in dropless.Tags()['tensors'] if 'dropped' in t]
    assert {'router/dropped/layer0', 'router/dropped/layer1', 'router/train_dropped/layer0'} <= set(
        capped.Tags()['tensors'])
    for events in (dropless, capped):
        assert {'router/load/layer0', 'router/load/layer1'} <= set(events.Tags()['tensors'])


def test_the_text_tab_holds_the_command_lines_and_the_config(fixed_k_run):
    run_dir, _ = fixed_k_run
    events = read_events(run_dir)
    first, resumed = text(events, 'run/command')
    assert first.strip().startswith('python train.py --data') and '--stop_step 3' in first
    assert '--restart --restart_dir' in resumed
    assert [e.step for e in events.Tensors('run/command/text_summary')] == [0, 3]
    [config_text] = text(events, 'run/config')
    with open(os.path.join(run_dir, 'config.json')) as f:
        assert json.loads(config_text.strip('`\n')) == json.load(f)


def last_scalars(logdir):
    """{run: {tag: value}} as TensorBoard's HParams plugin reads a metric column: each scalar's last value."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer().AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    provider = MultiplexerDataProvider(multiplexer, logdir)
    found = provider.read_last_scalars(RequestContext(), experiment_id='', plugin_name='scalars')
    return {run: {tag: datum.value for tag, datum in tags.items()} for run, tags in found.items()}


def test_eval_run_adds_a_full_test_to_the_hparams_row_and_nothing_else(tmp_path, synthetic_dir, capsys):
    """The run tests 2 windows (--max_eval_steps 2): a test of those windows (or of the whole split) at every k of
    the row adds its numbers to the row; one of fewer windows or fewer k goes under a tag of its own, says so, and
    leaves the row as it was."""
    run_dir = train_run(tmp_path / 'runs', synthetic_dir, *RUN)
    full = read_results(run_dir)['best']
    eval_script.main(['--run', run_dir, '--max_eval_steps', '2', '--ks', '1,2,4'])      # the run's own test again
    assert read_results(run_dir, 'eval_test.json')['best']['results'] == full['results']
    assert len(scalar_points(read_events(run_dir), 'test/bpc/k1')) == 2                 # the run's, then eval.py's
    capsys.readouterr()
    for partial, tag in ((['--max_eval_steps', '1', '--ks', '1,2,4'], 'eval_test_max_eval_steps_1/bpc/k1'),
                         (['--max_eval_steps', '2', '--ks', '1,4'], 'eval_test_ks_1-4/bpc/k1')):
        eval_script.main(['--run', run_dir, *partial])
        assert 'not written to the HParams row (test/bpc/k<k>)' in capsys.readouterr().out
        [row] = last_scalars(os.path.dirname(run_dir)).values()
        assert row[tag] == pytest.approx(read_results(run_dir, 'eval_test.json')['best']['results']['1'], rel=1e-6)
        assert {k: row[f'test/bpc/k{k}'] for k in ('1', '2', '4')} == pytest.approx(full['results'], rel=1e-6)
        assert len(scalar_points(read_events(run_dir), 'test/bpc/k1')) == 2
    assert row['eval_test_max_eval_steps_1/bpc/k1'] != pytest.approx(full['results']['1'], rel=1e-6)
    eval_script.main(['--run', run_dir, '--split', 'valid', '--max_eval_steps', '1', '--ks', '1,2,4'])
    [row] = last_scalars(os.path.dirname(run_dir)).values()
    assert row['eval_valid_max_eval_steps_1/bpc/k1'] == pytest.approx(
        read_results(run_dir, 'eval_valid.json')['best']['results']['1'], rel=1e-6)
    assert row['test/bpc/k1'] == pytest.approx(full['results']['1'], rel=1e-6)     # the test column stays
    values, metrics, _ = hparams_row(read_events(run_dir))
    assert values['checkpoint'] == 'best' and metrics == ['test/bpc/k1', 'test/bpc/k2', 'test/bpc/k4']


def test_each_validation_curve_has_a_tag_of_its_own(fixed_k_run):
    """An MoE run validates twice at each validation step (all experts, k = --moe-top-k): two curves, two tags, one
    point per step each, holding what metrics.jsonl says of each."""
    run_dir, _ = fixed_k_run
    events = read_events(run_dir)
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        records = [json.loads(line) for line in f if '"valid"' in line and '"experts"' in line]
    for experts, tag in (('all', 'valid/all_experts/bpc'), ('top_k', 'valid/k2/bpc')):
        expected = [(r['step'], pytest.approx(r['bpc'], rel=1e-6)) for r in records if r['experts'] == experts]
        assert scalar_points(events, tag) == expected and [s for s, _ in expected] == [3, 6]
    assert 'valid/bpc' not in events.Tags()['tensors']


def test_valid_ks_needs_moe_and_a_k_within_the_experts(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(['--dataset', 'synthetic', '--valid_ks', '1,2'])
    assert '--valid_ks needs --moe' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(['--dataset', 'synthetic', '--moe', '--moe-num-expert', '4', '--valid_ks', '8,16'])
    assert 'no k is at most --moe-num-expert 4' in capsys.readouterr().err
