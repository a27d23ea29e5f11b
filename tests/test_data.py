"""Data pipeline: prep formats, vocabularies, the ordered iterator, the cache, the synthetic corpus, errors."""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import data_utils
from data_utils import (
    DataError,
    LMOrderedIterator,
    Vocab,
    dataset_metric,
    get_lm_corpus,
    loss_to_metric,
    main,
    make_synthetic_corpus,
    prep_corpus,
    prep_enwik8,
    prep_text8,
)
from synthetic_corpus import SyntheticConfig, chain_matrix, dialect_chain, entropy_rate_bits, sample_chain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {'seed': 3, 'n_train': 6000, 'n_valid': 800, 'n_test': 800}


def write_splits(folder, train, valid, test):
    os.makedirs(folder, exist_ok=True)
    for split, text in (('train', train), ('valid', valid), ('test', test)):
        with open(os.path.join(folder, f'{split}.txt'), 'w', encoding='utf-8') as f:
            f.write(text)
    return str(folder)


def read(path, mode='r'):
    with open(path, mode) as f:
        return f.read()


# ----------------------------------------------------------------------------- prep

def test_prep_enwik8_splits_off_the_last_two_blocks_and_writes_decimals_with_real_newlines():
    raw = b'A\nB' + b'\x00\xff\n' + b'xyz'
    assert prep_enwik8(raw, n_test=3) == {'train': '65 \n 66', 'valid': '0 255 \n', 'test': '120 121 122'}


def test_prep_enwik8_rejects_input_too_short_to_split():
    with pytest.raises(ValueError):
        prep_enwik8(b'abcdef', n_test=3)


def test_prep_text8_follows_the_standard_script_strip_then_underscores():
    # " the cat " | "sat" | " on": each part stripped, ' ' written '_', characters joined by spaces
    assert prep_text8(b' the cat sat on', n_test=3) == {'train': 't h e _ c a t', 'valid': 's a t', 'test': 'o n'}


def test_enwik8_prepared_from_a_zip_loads_with_the_distinct_non_newline_bytes_as_vocabulary(tmp_path):
    rng = np.random.default_rng(0)
    raw = bytes(rng.choice([10, 32, 97, 98, 99, 200, 0], size=400, p=[.1, .2, .3, .2, .1, .05, .05]).tolist())
    src = tmp_path / 'enwik8.zip'
    with zipfile.ZipFile(src, 'w') as zf:
        zf.writestr('enwik8', raw)
    out = tmp_path / 'enwik8'
    assert main(['prep', '--dataset', 'enwik8', '--src', str(src), '--out', str(out), '--n_test', '50']) == 0
    assert read(out / 'test.txt.raw', 'rb') == raw[-50:]
    corpus = get_lm_corpus(out, 'enwik8')
    assert set(corpus.vocab.idx2sym) == {str(b) for b in set(raw) - {10}}
    decoded = bytes(int(corpus.vocab.idx2sym[i]) for i in torch.cat([corpus.train, corpus.valid, corpus.test]))
    assert decoded == raw.replace(b'\n', b'')
    counts = [raw.count(int(sym)) for sym in corpus.vocab.idx2sym]
    assert counts == sorted(counts, reverse=True)                       # ids are frequency ranks
    assert corpus.bpc_floor is None and dataset_metric('enwik8') == 'bpc'


def test_text8_prepared_from_an_extracted_file_loads_character_tokens(tmp_path):
    src = tmp_path / 'text8'
    src.write_bytes(b' anarchism originated as a term of abuse first used against')
    out = tmp_path / 'prepped'
    assert main(['prep', '--dataset', 'text8', '--src', str(src), '--out', str(out), '--n_test', '10']) == 0
    corpus = get_lm_corpus(out, 'text8')
    assert set(corpus.vocab.idx2sym) == set('abcdefghimnorstu_')
    assert corpus.vocab.idx2sym[:2] == ['_', 'a']                       # 9 and 8 occurrences
    assert len(corpus.train) == len('anarchism originated as a term of abus')  # leading space stripped


# The standard split (Transformer-XL's prep_enwik8.py / prep_text8.py): the last 2 x 5M symbols held out,
# valid then test, so enwik8's 100M bytes give 90M / 5M / 5M.
ENWIK8_SIZE, HELD_OUT = 100_000_000, 5_000_000


def patterned_bytes(n):
    """n bytes that say where they come from (position mod 251), so a split is checked by content."""
    return (bytes(range(251)) * (n // 251 + 1))[:n]


@pytest.fixture
def in_memory_prep(monkeypatch):
    """prep_corpus without the disk: the source is read from memory, the written files are recorded by name."""
    written = {}
    source = {}
    monkeypatch.setattr(data_utils, '_read_source', lambda src, basename: source['raw'])
    monkeypatch.setattr(data_utils, '_write_atomic', lambda path, data: written.update({os.path.basename(path): data}))
    monkeypatch.setattr(data_utils, '_enwik8_text', lambda part: f'{len(part)} bytes')     # formatting: tested above
    return source, written


def assert_standard_split(written, raw):
    assert written['train.txt.raw'] == raw[:-2 * HELD_OUT]
    assert written['valid.txt.raw'] == raw[-2 * HELD_OUT:-HELD_OUT]
    assert written['test.txt.raw'] == raw[-HELD_OUT:]


def test_get_data_prepares_enwik8_as_90m_5m_5m_bytes(in_memory_prep, tmp_path):
    source, written = in_memory_prep
    source['raw'] = raw = patterned_bytes(ENWIK8_SIZE)
    assert main(['prep', '--dataset', 'enwik8', '--src', 'enwik8.zip', '--out', str(tmp_path)]) == 0   # as get_data.sh
    assert {name: len(data) for name, data in written.items() if name.endswith('.raw')} == \
        {'train.txt.raw': 90_000_000, 'valid.txt.raw': 5_000_000, 'test.txt.raw': 5_000_000}
    assert_standard_split(written, raw)
    assert written['valid.txt'] == '5000000 bytes'


def test_the_enwik8_prep_functions_hold_out_5m_by_default(in_memory_prep, tmp_path):
    source, written = in_memory_prep
    source['raw'] = raw = patterned_bytes(ENWIK8_SIZE)
    prep_corpus('enwik8', 'enwik8.zip', str(tmp_path))
    assert_standard_split(written, raw)
    assert prep_enwik8(raw) == {'train': '90000000 bytes', 'valid': '5000000 bytes', 'test': '5000000 bytes'}


def test_get_data_prepares_text8_holding_out_5m_characters_each_for_valid_and_test(in_memory_prep, tmp_path):
    source, written = in_memory_prep
    source['raw'] = raw = b'ab' * (HELD_OUT + 7)                 # shorter than text8's 100M; the held-out parts are not
    assert main(['prep', '--dataset', 'text8', '--src', 'text8.zip', '--out', str(tmp_path)]) == 0
    assert_standard_split(written, raw)
    assert written['test.txt'] == ' '.join(raw[-HELD_OUT:].decode())
    assert prep_text8(raw)['valid'] == written['valid.txt']


def test_the_vocabulary_of_an_enwik8_format_corpus_has_its_symbols_ranked_by_frequency(tmp_path):
    # 'banana' | 'cab' | 'a', byte 0, byte 255, each split ending in a newline (which vanishes).
    # Counts over all three splits: 97 (a) 5; 98 (b) 2 and 110 (n) 2, b seen first; 99 (c), 0, 255 once each.
    folder = write_splits(tmp_path, '98 97 110 97 110 97\n', '99 97 98\n', '97 0 255\n')
    corpus = get_lm_corpus(folder, 'enwik8')
    assert corpus.vocab.idx2sym == ['97', '98', '110', '99', '0', '255']
    assert corpus.train.tolist() == [1, 0, 2, 0, 2, 0]
    assert corpus.valid.tolist() == [3, 0, 1]
    assert corpus.test.tolist() == [0, 4, 5]
    assert corpus.vocab.get_idx('255') == 5 and corpus.vocab.unk_idx is None


def test_wikitext_zip_and_folder_are_copied_unchanged(tmp_path):
    texts = {split: f' = Title {split} = \n\n the {split} text .\n' for split in ('train', 'valid', 'test')}
    src = tmp_path / 'wikitext-2-v1.zip'
    with zipfile.ZipFile(src, 'w') as zf:
        for split, text in texts.items():
            zf.writestr(f'wikitext-2/wiki.{split}.tokens', text)
    for source in (src, tmp_path / 'extracted'):
        if source != src:
            zipfile.ZipFile(src).extractall(source)
        out = tmp_path / f'out-{source.name}'
        assert main(['prep', '--dataset', 'wt2', '--src', str(source), '--out', str(out)]) == 0
        for split, text in texts.items():
            assert read(out / f'{split}.txt', 'rb') == text.encode()


# ----------------------------------------------------------------------------- word level

def test_word_level_vocab_comes_from_train_with_eos_first_and_frequency_rank_ids(tmp_path):
    folder = write_splits(tmp_path, 'a b b\nc The the b\n', 'a c\n\n', 'b the\n')
    corpus = get_lm_corpus(folder, 'wt103')
    # counts in train: b 3, then a, c, The, the once each (ties keep first appearance); case is kept
    assert corpus.vocab.idx2sym == ['<eos>', 'b', 'a', 'c', 'The', 'the']
    assert corpus.train.tolist() == [2, 1, 1, 0, 3, 4, 5, 1, 0]
    assert corpus.valid.tolist() == [2, 3, 0, 0]                        # an empty line is just <eos>
    assert corpus.test.tolist() == [1, 5, 0]
    assert corpus.train.dtype == torch.long
    assert corpus.vocab.encode_line('the b', add_eos=True).tolist() == [5, 1, 0]
    assert dataset_metric('wt103') == 'ppl'


def test_ties_in_frequency_keep_the_order_of_first_appearance(tmp_path):
    words = [f'w{i}' for i in np.random.default_rng(0).permutation(300)]
    corpus = get_lm_corpus(write_splits(tmp_path, ' '.join(words + ['w7']), 'w1', 'w2'), 'wt103')
    assert corpus.vocab.idx2sym == ['<eos>', 'w7'] + [w for w in words if w != 'w7']


def test_wt103_unknown_words_map_to_unk_and_valid_only_words_stay_out_of_the_vocab(tmp_path):
    folder = write_splits(tmp_path, 'x <unk> y\n', 'x zebra\n', 'y\n')
    corpus = get_lm_corpus(folder, 'wt103')
    assert 'zebra' not in corpus.vocab.sym2idx and len(corpus.vocab) == 4
    assert corpus.valid.tolist() == [corpus.vocab.get_idx('x'), corpus.vocab.get_idx('<unk>'), 0]
    assert corpus.vocab.get_idx('never-seen') == corpus.vocab.sym2idx['<unk>']


def test_wt2_counts_all_three_splits_like_the_reference_code(tmp_path):
    folder = write_splits(tmp_path, 'x y y\n', 'x x zebra\n', 'x\n')
    assert get_lm_corpus(folder, 'wt2').vocab.idx2sym == ['<eos>', 'x', 'y', 'zebra']


def test_word_level_unknown_word_without_unk_is_a_data_error(tmp_path):
    folder = write_splits(tmp_path, 'x y\n', 'x zebra\n', 'y\n')
    with pytest.raises(DataError, match='valid.txt'):
        get_lm_corpus(folder, 'wt103')
    with pytest.raises(KeyError):
        Vocab(['<eos>', 'x']).get_idx('zebra')


# ----------------------------------------------------------------------------- iterator

def test_iterator_cuts_the_stream_into_contiguous_columns_and_time_major_windows():
    it = LMOrderedIterator(torch.arange(23), bsz=2, bptt=4)
    assert it.n_step == 11 and it.data.shape == (11, 2)
    batches = list(it)
    assert [seq_len for _, _, seq_len in batches] == [4, 4, 2]          # the last window is short
    data, target, _ = batches[0]
    assert data.tolist() == [[0, 11], [1, 12], [2, 13], [3, 14]]
    assert target.tolist() == [[1, 12], [2, 13], [3, 14], [4, 15]]
    data, target, _ = batches[2]
    assert data.tolist() == [[8, 19], [9, 20]] and target.tolist() == [[9, 20], [10, 21]]
    assert len(it) == 3 == it.n_batch


def test_iterator_targets_cover_every_column_once():
    it = LMOrderedIterator(torch.arange(100), bsz=3, bptt=7)
    targets = torch.cat([target for _, target, _ in it])                 # [n_step - 1, B]
    assert torch.equal(targets, it.data[1:])


def test_iterator_ext_len_prepends_context_without_moving_targets():
    it = LMOrderedIterator(torch.arange(23), bsz=2, bptt=4, ext_len=3)
    data, target, _ = it.get_batch(4)
    assert data[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7] and target[:, 0].tolist() == [5, 6, 7, 8]
    data, _, _ = it.get_batch(0)
    assert data[:, 0].tolist() == [0, 1, 2, 3]                           # no context before the start


def test_iter_from_equals_the_tail_of_a_full_pass():
    it = LMOrderedIterator(torch.arange(1000), bsz=4, bptt=9)
    full = list(it)
    for start in (0, 1, 5, len(it)):
        tail = list(it.iter_from(start))
        assert len(tail) == len(full) - start
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(tail, full[start:]))
    with pytest.raises(ValueError):
        it.iter_from(len(it) + 1)


def test_len_counts_yielded_windows_when_bptt_divides_n_step_minus_one():
    it = LMOrderedIterator(torch.arange(18), bsz=2, bptt=4)              # n_step 9: windows at 0 and 4
    assert len(list(it)) == len(it) == 2 and it.n_batch == 3


@pytest.mark.parametrize('n, bsz, bptt', [(20, 0, 4), (20, 2, 0), (3, 2, 4)])
def test_iterator_rejects_bad_sizes_and_too_short_splits(n, bsz, bptt):
    with pytest.raises(ValueError):
        LMOrderedIterator(torch.arange(n), bsz=bsz, bptt=bptt)


def test_corpus_iterator_uses_the_named_split(tmp_path):
    corpus = get_lm_corpus(write_splits(tmp_path, 'a b c d e f\n', 'a b c\n', 'a b\n'), 'wt2')
    data, target, _ = next(iter(corpus.get_iterator('valid', bsz=1, bptt=10)))
    assert data[:, 0].tolist() == corpus.valid[:-1].tolist() and target[:, 0].tolist() == corpus.valid[1:].tolist()
    with pytest.raises(ValueError):
        corpus.get_iterator('dev', 1, 10)


# ----------------------------------------------------------------------------- cache

def test_cache_is_reused_then_rebuilt_when_a_source_file_changes(tmp_path, capsys):
    folder = write_splits(tmp_path, '1 2 3 2\n', '1 2\n', '3 1\n')
    first = get_lm_corpus(folder, 'enwik8')
    assert 'Encoding' in capsys.readouterr().out
    cache = torch.load(tmp_path / 'cache.enwik8.pt', weights_only=True)
    assert cache['idx2sym'] == first.vocab.idx2sym
    again = get_lm_corpus(folder, 'enwik8')
    assert 'Encoding' not in capsys.readouterr().out
    assert torch.equal(again.train, first.train) and again.train.dtype == torch.long

    (tmp_path / 'train.txt').write_text('3 3 3 2 2 1\n')                 # other size
    changed = get_lm_corpus(folder, 'enwik8')
    assert 'Encoding' in capsys.readouterr().out
    assert changed.vocab.idx2sym == ['3', '2', '1'] and changed.train.tolist() == [0, 0, 0, 1, 1, 2]

    stat = os.stat(tmp_path / 'valid.txt')
    (tmp_path / 'valid.txt').write_text('2 1\n')                         # same size: mtime tells
    os.utime(tmp_path / 'valid.txt', ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert get_lm_corpus(folder, 'enwik8').valid.tolist() == [1, 2]


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_corpus_is_deterministic_per_seed(tmp_path):
    make_synthetic_corpus(tmp_path / 'a', **SMALL)
    make_synthetic_corpus(tmp_path / 'b', **SMALL)
    make_synthetic_corpus(tmp_path / 'c', **dict(SMALL, seed=4))
    for name in ('train.txt', 'valid.txt', 'test.txt', 'synthetic.json'):
        assert read(tmp_path / 'a' / name, 'rb') == read(tmp_path / 'b' / name, 'rb')
    assert read(tmp_path / 'a' / 'train.txt', 'rb') != read(tmp_path / 'c' / 'train.txt', 'rb')


def test_synthetic_alphabets_are_disjoint_and_the_files_use_only_them(tmp_path):
    info = make_synthetic_corpus(tmp_path, **SMALL)
    alphabets = [set(a) for a in info['alphabets']]
    union = set().union(*alphabets)
    assert len(union) == sum(map(len, alphabets)) and 10 not in union
    used = {int(tok) for split in ('train', 'valid', 'test') for tok in read(tmp_path / f'{split}.txt').split()}
    assert used <= union
    assert len(read(tmp_path / 'valid.txt').split()) == SMALL['n_valid']


def test_synthetic_corpus_loads_through_the_enwik8_path_without_regenerating(tmp_path, capsys):
    make_synthetic_corpus(tmp_path, **SMALL)
    capsys.readouterr()
    corpus = get_lm_corpus(tmp_path, 'synthetic', synthetic=SMALL)
    assert 'Generating' not in capsys.readouterr().out
    as_enwik8 = get_lm_corpus(tmp_path, 'enwik8')
    assert corpus.vocab.idx2sym == as_enwik8.vocab.idx2sym and torch.equal(corpus.test, as_enwik8.test)
    assert len(corpus.train) == SMALL['n_train']
    assert corpus.bpc_floor == json.loads(read(tmp_path / 'synthetic.json'))['bpc_floor']
    assert dataset_metric('synthetic') == 'bpc'


def test_synthetic_corpus_is_regenerated_when_its_settings_differ(tmp_path, capsys):
    make_synthetic_corpus(tmp_path, **SMALL)
    corpus = get_lm_corpus(tmp_path, 'synthetic', synthetic=dict(SMALL, n_train=3000))
    assert 'Generating' in capsys.readouterr().out
    assert len(corpus.train) == 3000
    assert json.loads(read(tmp_path / 'synthetic.json'))['settings']['n_train'] == 3000


def test_synthetic_never_overwrites_a_folder_holding_another_corpus(tmp_path):
    folder = write_splits(tmp_path, '1 2\n', '1\n', '2\n')
    with pytest.raises(DataError, match='synthetic.json'):
        get_lm_corpus(folder, 'synthetic', synthetic=SMALL)
    assert read(tmp_path / 'train.txt') == '1 2\n'


def test_default_synthetic_corpus_is_generated_on_first_load(tmp_path):
    corpus = get_lm_corpus(tmp_path / 'synthetic', 'synthetic')
    defaults = SyntheticConfig()
    assert len(corpus.train) == defaults.n_train and len(corpus.test) == defaults.n_test
    assert len(corpus.vocab) == defaults.n_dialects * defaults.alphabet_size
    info = json.loads(read(tmp_path / 'synthetic' / 'synthetic.json'))
    assert abs(info['test_bpc_true_model'] - info['bpc_floor']) < 0.04
    assert 0.5 < corpus.bpc_floor < 2.0


def brute_force_entropy_rate(chain):
    """Entropy rate from the generative description, element by element, pi by power iteration."""
    n_dialects, size = chain.start.shape
    p = chain.switch_prob
    n = n_dialects * size
    matrix = [[0.0] * n for _ in range(n)]
    for s in range(n):
        for t in range(n):
            d, e = divmod(s, size)[0], divmod(t, size)[0]
            if d == e:
                matrix[s][t] = (1 - p) * chain.trans[d][s % size][t % size]
            else:
                matrix[s][t] = p / (n_dialects - 1) * chain.start[e][t % size]
    pi = [1.0 / n] * n
    for _ in range(5000):
        pi = [sum(pi[s] * matrix[s][t] for s in range(n)) for t in range(n)]
    return -sum(pi[s] * q * math.log2(q) for s in range(n) for q in matrix[s] if q > 0), np.array(matrix)


def test_bpc_floor_equals_a_brute_force_entropy_rate_and_the_sampler_follows_the_chain():
    cfg = SyntheticConfig(n_dialects=3, alphabet_size=2, concentration=0.7, switch_prob=0.1)
    rng = np.random.default_rng(7)
    chain = dialect_chain(cfg, rng)
    expected, matrix = brute_force_entropy_rate(chain)
    assert entropy_rate_bits(chain_matrix(chain)) == pytest.approx(expected, abs=1e-9)
    assert np.allclose(chain_matrix(chain), matrix)

    states = sample_chain(chain, 400_000, rng)
    counts = np.zeros_like(matrix)
    np.add.at(counts, (states[:-1], states[1:]), 1)
    empirical = counts / counts.sum(1, keepdims=True)
    assert np.abs(empirical - matrix).max() < 0.01
    assert -np.log2(matrix[states[:-1], states[1:]]).mean() == pytest.approx(expected, abs=0.01)


def stationary_entropy_rate(chain):
    """Entropy rate of the dialect chain in bits, its transition matrix built from the generative description
    with numpy and its stationary distribution found by power iteration (not by solving the linear system)."""
    n_dialects, size = chain.start.shape
    p = chain.switch_prob
    dialect = np.repeat(np.arange(n_dialects), size)                            # [V]: dialect of each state
    same = dialect[:, None] == dialect[None, :]                                 # [V, V]
    within = np.zeros((n_dialects * size, n_dialects * size))
    for d in range(n_dialects):
        within[d * size:(d + 1) * size, d * size:(d + 1) * size] = chain.trans[d]
    switch = np.tile(chain.start.reshape(1, -1), (n_dialects * size, 1)) * p / (n_dialects - 1)
    matrix = np.where(same, (1 - p) * within, switch)
    pi = np.full(len(matrix), 1 / len(matrix))
    for _ in range(20000):
        pi = pi @ matrix
    logs = np.log2(np.where(matrix > 0, matrix, 1.0))
    return -(pi[:, None] * matrix * logs).sum()


def test_the_default_synthetic_corpus_has_the_floor_the_readme_prints(tmp_path):
    info = make_synthetic_corpus(tmp_path / 'synthetic')                       # the defaults, as train.py uses them
    chain = dialect_chain(SyntheticConfig(), np.random.default_rng(SyntheticConfig().seed))
    assert round(info['bpc_floor'], 3) == 1.040
    assert info['bpc_floor'] == pytest.approx(stationary_entropy_rate(chain), abs=1e-9)


def test_synthetic_config_rejects_an_alphabet_larger_than_a_byte():
    with pytest.raises(ValueError):
        SyntheticConfig(n_dialects=16, alphabet_size=16)
    assert dataclasses.asdict(SyntheticConfig())['seed'] == SyntheticConfig.seed


# ----------------------------------------------------------------------------- errors and metrics

def assert_helpful(err, folder):
    message = str(err.value)
    assert str(folder) in message and 'script/get_data.sh' in message and '\n' not in message


def test_missing_folder_is_a_data_error_naming_it_and_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        get_lm_corpus(tmp_path / 'nowhere', 'enwik8')
    assert_helpful(err, tmp_path / 'nowhere')


def test_missing_file_is_a_data_error(tmp_path):
    folder = write_splits(tmp_path, '1 2\n', '1\n', '2\n')
    os.remove(tmp_path / 'test.txt')
    with pytest.raises(DataError, match='test.txt is missing') as err:
        get_lm_corpus(folder, 'wt103')
    assert_helpful(err, folder)


@pytest.mark.parametrize('dataset, train', [('enwik8', '1 2 300\n'), ('enwik8', '1 a 2\n'), ('text8', 'a bc\n'),
                                            ('enwik8', ''), ('wt2', '')])
def test_malformed_or_empty_file_is_a_data_error(tmp_path, dataset, train):
    folder = write_splits(tmp_path, train, '1\n', '2\n')
    with pytest.raises(DataError, match='train.txt') as err:
        get_lm_corpus(folder, dataset)
    assert_helpful(err, folder)


def test_cli_prints_a_data_error_without_a_traceback(tmp_path, capsys):
    assert main(['stats', '--dataset', 'enwik8', '--data', str(tmp_path / 'nowhere')]) == 1
    assert 'script/get_data.sh' in capsys.readouterr().err


def test_unknown_dataset_is_a_value_error_listing_the_choices(tmp_path):
    with pytest.raises(ValueError, match='wt103'):
        get_lm_corpus(tmp_path, 'ptb')
    with pytest.raises(ValueError):
        dataset_metric('ptb')


def test_loss_converts_to_bits_per_character_or_perplexity():
    assert loss_to_metric(math.log(2) * 1.5, 'enwik8') == pytest.approx(1.5)
    assert loss_to_metric(math.log(30.0), 'wt103') == pytest.approx(30.0)
    assert loss_to_metric(torch.tensor(1e4), 'wt2') == math.inf


# ----------------------------------------------------------------------------- get_data.sh

def run_get_data(tmp_path, *args, **env):
    env = dict(os.environ, DATA_DIR=str(tmp_path), PYTHON=sys.executable, **env)
    return subprocess.run(['bash', os.path.join(REPO, 'script', 'get_data.sh'), *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_get_data_script_parses_and_rejects_unknown_datasets_before_downloading(tmp_path):
    assert subprocess.run(['bash', '-n', os.path.join(REPO, 'script', 'get_data.sh')], check=False).returncode == 0
    result = run_get_data(tmp_path, 'wt2', 'ptb')
    assert result.returncode == 2 and "unknown dataset 'ptb'" in result.stderr
    assert not (tmp_path / 'wikitext-2').exists()


def test_get_data_script_skips_prepared_corpora(tmp_path):
    write_splits(tmp_path / 'enwik8', '1\n', '1\n', '1\n')
    result = run_get_data(tmp_path, 'enwik8', ENWIK8_URL='http://127.0.0.1:9/unreachable.zip')
    assert result.returncode == 0 and 'skipping' in result.stdout


@pytest.mark.skipif(shutil.which('curl') is None, reason='needs curl for a file:// download')
def test_get_data_script_downloads_prepares_and_loads_wikitext_from_a_local_url(tmp_path):
    texts = {'train': ' = title = \n the end .\n', 'valid': ' the end .\n', 'test': ' = title = \n'}
    src = tmp_path / 'wikitext-2-v1.zip'
    with zipfile.ZipFile(src, 'w') as zf:
        for split, text in texts.items():
            zf.writestr(f'wikitext-2/wiki.{split}.tokens', text)
    result = run_get_data(tmp_path / 'data', 'wt2', WT2_URL=src.as_uri())
    assert result.returncode == 0, result.stderr
    assert 'vocabulary 6' in result.stdout                               # <eos> = title the end .
    assert read(tmp_path / 'data' / 'wikitext-2' / 'valid.txt') == texts['valid']
