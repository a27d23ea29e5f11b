"""Fine-tuning (paper Table 3) on tiny generated tasks, from tiny models pretrained here on the synthetic corpus."""
import csv
import glob
import json
import os
import signal
import shutil
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import torch

import finetune
import train
from finetune_data import ByteEncoder, Example, FinetuneDataError, convert, load_task, read_tsv, write_tsv
from tests.conftest import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = ['--n_layer', '2', '--d_model', '16', '--n_head', '2', '--d_head', '8', '--d_inner', '16', '--tgt_len', '16',
            '--mem_len', '16', '--eval_tgt_len', '8', '--batch_size', '4', '--max_eval_steps', '2', '--max_step', '2',
            '--eval-interval', '2']
MOE = ['--moe', '--moe-num-expert', '4']
METHOD_FLAGS = {'hyper_router': [*MOE, '--gate_name', 'HyperRouterGate'],
                'smoe_dropout': [*MOE, '--gate_name', 'CustomNaiveGate', '--freeze_gate'],
                'smoe': [*MOE, '--gate_name', 'CustomNaiveGate'],
                'dense': []}
# Two classes written in disjoint alphabets of the synthetic corpus (bytes 33-48 and 49-64).
ALPHABETS = {'a': [chr(c) for c in range(33, 49)], 'b': [chr(c) for c in range(49, 65)]}


@pytest.fixture(scope='session')
def pretrained(tmp_path_factory):
    """method -> run directory of a tiny model pretrained for 2 steps on the synthetic corpus (made on first use)."""
    root = tmp_path_factory.mktemp('pretrained')
    runs = {}

    def get(method):
        if method not in runs:
            work = str(root / method)
            train.main(['--dataset', 'synthetic', '--data', str(root / 'synthetic'), '--work_dir', work, *PRETRAIN,
                        *METHOD_FLAGS[method]])
            runs[method] = glob.glob(f'{work}-synthetic/*')[0]
        return runs[method]
    return get


def toy_rows(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = 'ab'[rng.integers(2)]
        rows.append((''.join(rng.choice(ALPHABETS[label], size=rng.integers(3, 24))), label))
    return rows


@pytest.fixture(scope='session')
def toy_task(tmp_path_factory):
    folder = tmp_path_factory.mktemp('toy')
    for split, n, seed in (('train', 96, 0), ('dev', 24, 1), ('test', 48, 2)):
        write_tsv(str(folder / f'{split}.tsv'), toy_rows(n, seed))
    return str(folder)


def run_finetune(pretrained_run, data, tmp_path, *extra, method=None):
    work = str(tmp_path / 'ft')
    finetune.main(['--pretrained', pretrained_run, '--task', 'toy', '--data', data, '--work_dir', work,
                   '--batch_size', '8', '--eval_batch_size', '16', '--log-interval', '1',
                   *(['--method', method] if method else []), *extra])
    return sorted(glob.glob(f'{work}-toy/*'))[-1]


def load(path):
    return torch.load(path, weights_only=True)


def metrics(run_dir, split):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['split'] == split]


# ----------------------------------------------------------------------------- fine-tuning runs

def test_fine_tuning_learns_a_separable_task_and_is_tested_at_every_k(pretrained, toy_task, tmp_path, capsys):
    run_dir = run_finetune(pretrained('hyper_router'), toy_task, tmp_path, '--lr', '0.01', '--epochs', '3',
                           method='hyper_router')
    assert {'config.json', 'train.log', 'metrics.jsonl', 'checkpoint_last.pt', 'model_final.pt', 'results.json',
            'src'} <= set(os.listdir(run_dir))
    with open(os.path.join(run_dir, 'results.json')) as f:
        [entry] = json.load(f)
    assert {k: entry[k] for k in ('dataset', 'metric', 'split', 'gate', 'method', 'checkpoint', 'step')} == {
        'dataset': 'toy', 'metric': 'accuracy', 'split': 'test', 'gate': 'hyper_router', 'method': 'HyperRouter',
        'checkpoint': 'final', 'step': 36}
    assert set(entry['results']) == {'1', '2', '4'}                     # the k <= E = 4 of 1, 2, 4, 8, 16
    assert all(acc > 85 for acc in entry['results'].values()), entry['results']     # chance is about 50
    assert [r['epoch'] for r in metrics(run_dir, 'valid')] == [1, 2, 3]
    assert all(r['top_k'] == 4 for r in metrics(run_dir, 'train'))      # dense fine-tuning: every expert
    out = capsys.readouterr().out
    assert 'Table 3 (accuracy %)' in out and 'HyperRouter (k=4)' in out and 'HyperRouter (k=2)' in out

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    scalars = set(EventAccumulator(run_dir).Reload().Tags()['scalars'])
    assert {'train/loss', 'train/accuracy', 'train/lr', 'valid/accuracy', 'test/accuracy/k4'} <= scalars

    finetune.main(['--table', run_dir])
    first_row = capsys.readouterr().out.split('\n')[1].split()
    assert first_row == ['HyperRouter', '(k=2)', f'{entry["results"]["2"]:.2f}']


def test_tensorboard_shows_the_hparams_row_the_test_per_k_and_dev_accuracy_at_valid_ks(pretrained, toy_task, tmp_path):
    """Read with TensorBoard's reader. The last epoch ends at the last step, so its dev accuracy at each k
    (--valid_ks) is that of the final model, which the final test (--eval_split dev) measures on its own path."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata
    from tensorboard.util import tensor_util
    run_dir = run_finetune(pretrained('hyper_router'), toy_task, tmp_path, '--max_step', '12', '--eval_split', 'dev',
                           '--valid_ks', '1,2,4')
    with open(os.path.join(run_dir, 'results.json')) as f:
        [entry] = json.load(f)
    events = EventAccumulator(run_dir).Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    hparams = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG]).hparams
    assert {name: hparams[name].string_value or hparams[name].number_value for name in
            ('method', 'gate', 'k', 'experts', 'dataset', 'steps', 'checkpoint')} == {
        'method': 'HyperRouter', 'gate': 'hyper_router', 'k': 'all', 'experts': 4, 'dataset': 'toy', 'steps': 12,
        'checkpoint': 'final'}
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos] == ['dev/accuracy/k1', 'dev/accuracy/k2', 'dev/accuracy/k4']

    def points(tag):
        return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in events.Tensors(tag)]
    for k, accuracy in entry['results'].items():
        assert points(f'dev/accuracy/k{k}') == [(12, pytest.approx(accuracy, rel=1e-6))]
        assert points(f'valid/accuracy/k{k}') == [(12, pytest.approx(accuracy, rel=1e-6))]
    [command] = [tensor_util.make_ndarray(e.tensor_proto).item().decode()
                 for e in events.Tensors('run/command/text_summary')]
    assert command.strip().startswith('python finetune.py --pretrained') and '--valid_ks 1,2,4' in command


def test_a_dense_model_is_tested_once_with_no_k(pretrained, toy_task, tmp_path):
    run_dir = run_finetune(pretrained('dense'), toy_task, tmp_path, '--max_step', '3', '--eval_split', 'dev',
                           method='dense')
    with open(os.path.join(run_dir, 'results.json')) as f:
        [entry] = json.load(f)
    assert entry['method'] == 'Dense+Dropout' and entry['gate'] == 'dense' and entry['split'] == 'dev'
    assert list(entry['results']) == ['dense']


@pytest.mark.parametrize('method,frozen,trained', [
    ('hyper_router', 'pos_ff.gate.hypernet.', 'pos_ff.gate.embedding'),
    ('smoe_dropout', 'pos_ff.gate.gate.', None),
    ('smoe', None, 'pos_ff.gate.gate.'),
])
def test_frozen_router_parts_stay_frozen_and_the_rest_learns(method, frozen, trained, pretrained, toy_task, tmp_path):
    run = pretrained(method)
    backbone = finetune.load_pretrained(run, method).backbone
    for name, p in backbone.named_parameters():
        assert p.requires_grad == (frozen is None or frozen not in name), name
    run_dir = run_finetune(run, toy_task, tmp_path, '--max_step', '4', '--lr', '0.01', method=method)
    before = load(os.path.join(run, 'model_best_dense.pt'))['model']
    after = load(os.path.join(run_dir, 'model_final.pt'))['model']
    changed = {name for name, value in before.items() if not torch.equal(value, after['backbone.' + name])}
    router = {name for name in before if '.gate.' in name}
    if frozen:
        assert not {name for name in changed if frozen in name}
    if trained:
        assert {name for name in router if trained in name} <= changed
    else:
        assert not changed & router
    assert {'layers.0.dec_attn.qkv_net.weight', 'layers.1.pos_ff.experts.htoh4.weight',
            'word_emb.emb_layers.0.weight'} <= changed
    assert 'head.weight' in after and after['head.weight'].shape == (2, 16)


def test_resuming_gives_the_same_run_as_never_stopping(pretrained, toy_task, tmp_path):
    common = ['--max_step', '17', '--lr', '0.01', '--dropout', '0.2', '--save_interval', '5']   # 12 steps per epoch
    run = pretrained('smoe_dropout')
    whole = run_finetune(run, toy_task, tmp_path / 'a', *common)
    split = run_finetune(run, toy_task, tmp_path / 'b', *common, '--stop_step', '7')
    assert not os.path.exists(os.path.join(split, 'results.json'))
    assert load(os.path.join(split, 'checkpoint_last.pt'))['step'] == 7
    run_finetune(run, toy_task, tmp_path / 'b', *common, '--restart', '--restart_dir', split)

    def drop_speed(rows):
        return [{k: v for k, v in r.items() if k != 'examples_per_s'} for r in rows]
    for kind in ('train', 'valid', 'test'):
        assert drop_speed(metrics(split, kind)) == drop_speed(metrics(whole, kind)), kind
    final = [load(os.path.join(d, 'model_final.pt'))['model'] for d in (whole, split)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    with pytest.raises(SystemExit, match='--batch_size 8 .run. vs 4'):
        run_finetune(run, toy_task, tmp_path / 'b', *common, '--restart', '--restart_dir', split, '--batch_size', '4')



def test_sigterm_saves_the_step_and_exits_143(pretrained, toy_task, tmp_path, monkeypatch):
    """SIGTERM mid-run: the checkpoint holds the last finished step and main returns 128 + 15, as train.py."""
    step_once = finetune.FineTuner.train_step

    def step_then_signal(self, indices):
        out = step_once(self, indices)
        if self.step == 2:                       # this call is step 3: the signal arrives during it
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(finetune.FineTuner, 'train_step', step_then_signal)
    work = str(tmp_path / 'ft')
    status = finetune.main(['--pretrained', pretrained('smoe'), '--task', 'toy', '--data', toy_task,
                            '--work_dir', work, '--batch_size', '8', '--max_step', '10'])
    assert status == 128 + signal.SIGTERM
    [run_dir] = glob.glob(f'{work}-toy/*')
    assert load(os.path.join(run_dir, 'checkpoint_last.pt'))['step'] == 3
    assert not os.path.exists(os.path.join(run_dir, 'results.json'))

# ----------------------------------------------------------------------------- checkpoints that do not fit

def edited_checkpoint(path, tmp_path, edit):
    ckpt = load(os.path.join(path, 'model_best_dense.pt'))
    edit(ckpt)
    out = str(tmp_path / 'edited.pt')
    torch.save(ckpt, out)
    return out


@pytest.mark.parametrize('case,message', [
    ('other method', r'--method smoe fine-tunes a SMoE model, but .* holds a HyperRouter model'),
    ('other architecture', 'do not fit the model its model_config describes'),
    ('word-level vocabulary', 'vocabulary is not byte-level'),
    ('fine-tuning checkpoint', 'is a fine-tuning checkpoint of finetune.py; expected a pretraining checkpoint'),
    ('pickled module', 'is not a checkpoint written by this code'),
    ('empty run directory', 'holds neither model_best_dense.pt nor model_best.pt'),
])
def test_a_checkpoint_that_does_not_fit_is_a_clear_error(case, message, pretrained, toy_task, tmp_path):
    run = pretrained('hyper_router')
    method = 'hyper_router'
    if case == 'other method':
        path, method = run, 'smoe'
    elif case == 'other architecture':
        path = edited_checkpoint(run, tmp_path, lambda c: c['model_config'].update(n_layer=3))
    elif case == 'word-level vocabulary':
        path = edited_checkpoint(run, tmp_path, lambda c: c.update(vocab=['<eos>', 'the'] + c['vocab'][2:]))
    elif case == 'fine-tuning checkpoint':
        path = os.path.join(run_finetune(run, toy_task, tmp_path, '--max_step', '1'), 'model_final.pt')
    elif case == 'pickled module':
        path = str(tmp_path / 'module.pt')
        torch.save(torch.nn.Linear(2, 2), path)
    else:
        path = str(tmp_path)
    with pytest.raises(finetune.FinetuneError, match=message):
        finetune.load_pretrained(path, method)
    with pytest.raises(SystemExit, match='error: .*' + message):
        run_finetune(path, toy_task, tmp_path / 'cli', method=method)


# ----------------------------------------------------------------------------- model and encoding

@pytest.mark.parametrize('pool', ['mean', 'last'])
def test_padding_and_batch_neighbours_do_not_change_a_prediction(pool):
    model = finetune.TextClassifier(tiny_model(dropout=0.0, moe_top_k=4), 3, pool).eval()
    short, long = Example(np.array([1, 2, 3]), 0), Example(np.arange(4, 14), 1)
    alone = model(*finetune.collate([short], 0)[:2])
    data, lengths, _ = finetune.collate([short, long], 36)
    assert data.shape == (10, 2) and data[3:, 0].eq(36).all()
    torch.testing.assert_close(model(data, lengths)[0], alone[0])
    hidden = model.backbone.forward_hidden(finetune.collate([short], 0)[0])[0]        # [3, 1, d]
    expected = hidden.mean(0) if pool == 'mean' else hidden[-1]
    torch.testing.assert_close(alone, model.head(expected))


def test_text_is_read_as_utf8_bytes_with_a_fallback_for_bytes_outside_the_vocabulary():
    vocab = ['101', '32', '104', '195', '169']                           # e, space, h, and the two bytes of é
    encoder = ByteEncoder(vocab)
    assert encoder.fallback_id == 1                                       # the space byte
    assert encoder.encode('hé e', 512).tolist() == [2, 3, 4, 1, 0]
    assert encoder.encode('hex', 512).tolist() == [2, 0, 1]               # 'x' is not in the vocabulary
    assert encoder.encode('hé e', 2).tolist() == [2, 3]                   # the first max_len bytes
    assert encoder.unknown_fraction(['hex'], 512) == pytest.approx(1 / 3)
    assert ByteEncoder(['101', '104']).fallback_id == 0                   # no space: the most frequent symbol
    with pytest.raises(FinetuneDataError, match='not byte-level'):
        ByteEncoder(['<eos>', 'the', 'a'])


# ----------------------------------------------------------------------------- the tsv format

def write(path, text):
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)


@pytest.mark.parametrize('content,message', [
    ('good text\tpos\nno tab here\n', r'train.tsv:2: expected `text<TAB>label`'),
    ('one\ttwo\tthree\n', r'train.tsv:1: expected'),
    ('\tpos\n', r'train.tsv:1: expected'),
])
def test_a_malformed_line_is_an_error_naming_the_line(content, message, tmp_path):
    write(tmp_path / 'train.tsv', content)
    with pytest.raises(FinetuneDataError, match=message):
        load_task(str(tmp_path))


def test_labels_come_from_train_and_an_unseen_one_is_an_error(tmp_path):
    write(tmp_path / 'train.tsv', 'a\t10\nb\t2\nc\t1\n')
    data = load_task(str(tmp_path))
    assert data.labels == ['1', '2', '10'] and data.splits['train'][0] == ('a', '10')
    write(tmp_path / 'test.tsv', 'd\t2\ne\t3\n')
    with pytest.raises(FinetuneDataError, match=r"test.tsv:2: label '3' never occurs in train.tsv"):
        load_task(str(tmp_path))
    with pytest.raises(FinetuneDataError, match='get_finetune_data.sh'):
        load_task(str(tmp_path / 'missing'))


def test_write_tsv_makes_one_line_per_example(tmp_path):
    write_tsv(str(tmp_path / 'x.tsv'), [('a\tb\nc  d', 'pos'), ('café', 3)])
    assert read_tsv(str(tmp_path / 'x.tsv')) == [('a b c d', 'pos'), ('café', '3')]


# ----------------------------------------------------------------------------- converters and download script

def native_files(root):
    """Small files in each dataset's native format under root/<task>; returns {task: folder}."""
    sst2 = root / 'sst2' / 'SST-2'
    sst2.mkdir(parents=True)
    write(sst2 / 'train.tsv', 'sentence\tlabel\nit \'s a charming journey \t1\na dull mess \t0\n')
    write(sst2 / 'dev.tsv', 'sentence\tlabel\nunflinchingly bleak \t0\n')
    write(sst2 / 'test.tsv', 'index\tsentence\n0\tuh , no labels here\n')
    sst5 = root / 'sst5'
    sst5.mkdir()
    for split, items in (('train', [('great', 4), ('awful', 0), ('meh', 2), ('poor', 1), ('good', 3)]),
                         ('dev', [('fine', 3)]),
                         ('test', [('bad', 1), ('ok', 2)])):
        write(sst5 / f'{split}.jsonl', ''.join(json.dumps({'text': t, 'label': y, 'label_text': 'x'}) + '\n'
                                               for t, y in items))
    for split, n in (('train', 2), ('test', 1)):
        for label in ('neg', 'pos'):
            folder = root / 'imdb' / 'aclImdb' / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                write(folder / f'{i}_7.txt', f'A {label} review.<br /><br />Second\tline {i}')
    (root / 'imdb' / 'aclImdb' / 'train' / 'unsup').mkdir()
    banking = root / 'banking77'
    banking.mkdir()
    for split, items in (('train', [('I lost my card, help', 'lost_or_stolen_card'), ('top up?', 'top_up_failed')]),
                         ('test', [('where is my "card"', 'lost_or_stolen_card')])):
        with open(banking / f'{split}.csv', 'w', newline='', encoding='utf-8') as f:
            writer = csv.writer(f)
            writer.writerow(['text', 'category'])
            writer.writerows(items)
    return {task: str(root / task) for task in ('sst2', 'sst5', 'imdb', 'banking77')}


EXPECTED = {
    'sst2': {'train': [("it 's a charming journey", '1'), ('a dull mess', '0')], 'dev': [('unflinchingly bleak', '0')]},
    'sst5': {'train': [('great', '4'), ('awful', '0'), ('meh', '2'), ('poor', '1'), ('good', '3')],
             'dev': [('fine', '3')],
             'test': [('bad', '1'), ('ok', '2')]},
    'imdb': {'train': [('A neg review. Second line 0', 'neg'), ('A neg review. Second line 1', 'neg'),
                       ('A pos review. Second line 0', 'pos'), ('A pos review. Second line 1', 'pos')],
             'test': [('A neg review. Second line 0', 'neg'), ('A pos review. Second line 0', 'pos')]},
    'banking77': {'train': [('I lost my card, help', 'lost_or_stolen_card'), ('top up?', 'top_up_failed')],
                  'test': [('where is my "card"', 'lost_or_stolen_card')]},
}


@pytest.mark.parametrize('task', list(EXPECTED))
def test_converters_read_each_native_format(task, tmp_path):
    src = native_files(tmp_path / 'native')[task]
    src = os.path.join(src, 'SST-2') if task == 'sst2' else src
    sizes = convert(task, src, str(tmp_path / 'out'))
    assert sizes == {split: len(rows) for split, rows in EXPECTED[task].items()}
    assert load_task(str(tmp_path / 'out')).splits == EXPECTED[task]


def test_get_finetune_data_sh_downloads_and_converts_every_task(tmp_path):
    if shutil.which('curl') is None:
        pytest.skip('the offline download test reads file:// URLs with curl')
    native = native_files(tmp_path / 'native')
    archives = tmp_path / 'served'
    archives.mkdir()
    with zipfile.ZipFile(archives / 'SST-2.zip', 'w') as zf:
        for name in ('train.tsv', 'dev.tsv', 'test.tsv'):
            zf.write(os.path.join(native['sst2'], 'SST-2', name), f'SST-2/{name}')
    with tarfile.open(archives / 'aclImdb_v1.tar.gz', 'w:gz') as tf:
        tf.add(os.path.join(native['imdb'], 'aclImdb'), 'aclImdb')
    out = tmp_path / 'ft'
    env = dict(os.environ, FT_DATA=str(out), PYTHON=sys.executable, SST2_URL=f'file://{archives}/SST-2.zip',
               SST5_URL=f'file://{native["sst5"]}', IMDB_URL=f'file://{archives}/aclImdb_v1.tar.gz',
               BANKING77_URL=f'file://{native["banking77"]}')
    script = os.path.join(REPO, 'script', 'get_finetune_data.sh')
    result = subprocess.run(['bash', script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for task, splits in EXPECTED.items():
        assert load_task(str(out / task)).splits == splits
    assert 'labels: lost_or_stolen_card top_up_failed' in result.stdout
    again = subprocess.run(['bash', script, 'sst2'], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and 'already prepared' in again.stdout
    bad = subprocess.run(['bash', script, 'sst2', 'mnli'], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown task 'mnli'" in bad.stderr


def test_get_finetune_data_sh_stops_with_a_clear_error_when_a_download_fails(tmp_path):
    if shutil.which('curl') is None:
        pytest.skip('the offline download test reads file:// URLs with curl')
    env = dict(os.environ, FT_DATA=str(tmp_path / 'ft'), PYTHON=sys.executable,
               SST2_URL=f'file://{tmp_path}/missing/SST-2.zip')
    script = os.path.join(REPO, 'script', 'get_finetune_data.sh')
    result = subprocess.run(['bash', script, 'sst2'], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f'error: could not download file://{tmp_path}/missing/SST-2.zip' in result.stderr
    assert 'Traceback' not in result.stderr and not (tmp_path / 'ft' / 'sst2' / 'train.tsv').exists()


# ----------------------------------------------------------------------------- the table2 scripts

TABLE_A2 = {'sst2': (16, 3, 'dev'), 'sst5': (16, 3, 'test'), 'imdb': (4, 3, 'test'), 'banking77': (16, 15, 'test')}
SCRIPT_METHODS = {'dense_model': 'dense', 'smoe_dropout': 'smoe_dropout', 'hyper_router': 'hyper_router',
                  'smoe': 'smoe'}
SCRIPTS = [f'script/table2/{task}/{name}.sh' for task in TABLE_A2 for name in SCRIPT_METHODS]


@pytest.fixture(scope='module')
def table2_data(toy_task, tmp_path_factory):
    """FT_DATA for the table2 scripts: the toy task as each of their datasets."""
    root = tmp_path_factory.mktemp('table2')
    for task in TABLE_A2:
        shutil.copytree(toy_task, root / 'ft' / task)
    return str(root / 'ft')


def check_table2_run(script, work, out):
    """The run of `script` under `work` fine-tuned with the paper's Table A2 settings, was tested at every k of
    its method and printed Table 3."""
    [run_dir] = glob.glob(f'{work}-*/*')
    task, method = script.split('/')[2], SCRIPT_METHODS[os.path.basename(script)[:-3]]
    batch_size, epochs, split = TABLE_A2[task]
    with open(os.path.join(run_dir, 'results.json')) as f:
        [entry] = json.load(f)
    with open(os.path.join(run_dir, 'config.json')) as f:
        args = json.load(f)['args']
    assert entry['dataset'] == task and entry['split'] == split and entry['metric'] == 'accuracy'
    assert entry['method'] in finetune.METHODS[method][0]
    assert set(entry['results']) == ({'dense'} if method == 'dense' else {'1', '2', '4'})
    assert (args['lr'], args['batch_size'], args['epochs'], args['max_len'], args['max_step']) == (
        1e-4, batch_size, epochs, 512, 2)
    assert 'Table 3 (accuracy %)' in out


@pytest.mark.parametrize('script', SCRIPTS)
def test_table2_script_runs_end_to_end(script, pretrained, table2_data, script_command, tmp_path, capsys):
    # the command the script starts, run in this process (test_a_table2_script_runs_as_a_user_starts_it: one in
    # its own), on its method's tiny checkpoint
    work = str(tmp_path / 'ft')
    checkpoint = pretrained(SCRIPT_METHODS[os.path.basename(script)[:-3]])
    program, *flags = script_command(script, checkpoint, '--max_step', '2', '--work_dir', work, FT_DATA=table2_data)
    assert program == 'finetune.py'
    assert finetune.main(flags) is None
    check_table2_run(script, work, capsys.readouterr().out)


def test_a_table2_script_runs_as_a_user_starts_it(pretrained, table2_data, tmp_path):
    script, work = 'script/table2/sst5/hyper_router.sh', str(tmp_path / 'ft')
    env = dict(os.environ, FT_DATA=table2_data, PYTHON=sys.executable, OMP_NUM_THREADS='1')
    result = subprocess.run(['bash', script, pretrained('hyper_router'), '--max_step', '2', '--work_dir', work],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_table2_run(script, work, result.stdout)


def test_a_table2_script_without_a_checkpoint_prints_its_usage():
    result = subprocess.run(['bash', 'script/table2/sst2/hyper_router.sh', '--max_step', '2'], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and 'usage: bash script/table2/sst2/hyper_router.sh PRETRAINED' in result.stderr
