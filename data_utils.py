"""Language-model corpora: vocabulary, ordered batching, caching, dataset preparation, synthetic data.

Every corpus is a folder holding train.txt, valid.txt and test.txt (see FORMATS):
- enwik8, text8: character level in the standard Transformer-XL prep format. Symbols are counted over
  train + valid + test, no <eos>; lines are split on whitespace, so newlines vanish (enwik8: 204
  symbols, text8: 27).
- wt103, wt2: word level, <eos> (id 0) appended to every line, case kept. Like the reference code, wt103
  counts train only and wt2 all three splits (WikiText-2 has no word outside train, so only the
  frequency ranks differ).
- synthetic: built in (no download), the enwik8 format; see `make_synthetic_corpus`.
Ids are frequency ranks after the special symbols (ties: first appearance).

Shapes: a split is a 1-D stream [N]; `LMOrderedIterator` lays it out as [n_step, B] and yields
time-major windows data [ext + T, B], target [T, B].

CLI: `python data_utils.py prep|synthetic|stats ...` (prep is what script/get_data.sh runs).

One file of just over 500 lines: preparing a corpus from its download and reading it back (with its cache) are
the two sides of one on-disk format (FORMATS), kept side by side; the synthetic generator is synthetic_corpus.py.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import zipfile
from array import array

import numpy as np
import torch

from synthetic_corpus import SyntheticConfig, chain_matrix, dialect_chain, entropy_rate_bits, sample_chain

DATASETS = ('enwik8', 'text8', 'wt103', 'wt2', 'synthetic')
WORD_DATASETS = ('wt103', 'wt2')
SPLITS = ('train', 'valid', 'test')
CACHE_VERSION = 1       # bump when the encoding or the cache layout changes
SYNTHETIC_VERSION = 1   # bump when the synthetic generator changes
BYTE_TOKENS = frozenset(str(b) for b in range(256))
FORMATS = {
    'enwik8': 'bytes written as decimal numbers 0-255 separated by spaces, byte 10 as a real newline '
              '(the standard Transformer-XL prep_enwik8 format)',
    'text8': "single characters separated by spaces, '_' standing for the space character "
             '(the standard Transformer-XL prep_text8 format)',
    'wt103': 'the WikiText-103 files wiki.{train,valid,test}.tokens, renamed and otherwise unchanged (UTF-8)',
    'wt2': 'the WikiText-2 files wiki.{train,valid,test}.tokens, renamed and otherwise unchanged (UTF-8)',
    'synthetic': 'the enwik8 format (decimal byte values separated by spaces) plus synthetic.json, '
                 'as written by make_synthetic_corpus',
}


class DataError(Exception):
    """A data folder is missing or malformed; the message says what was expected and how to fix it."""


def _data_error(datadir, dataset, problem, fix=None):
    """DataError whose one-paragraph message names the folder, the problem, the expected files and the fix."""
    if fix is None and dataset == 'synthetic':
        fix = ('delete the folder and it is regenerated on the next run (the real corpora come from '
               '`bash script/get_data.sh`, see README)')
    elif fix is None:
        fix = f'run `bash script/get_data.sh {dataset}` (see README), or point the data path at a prepared folder'
    return DataError(f"Cannot load the {dataset} corpus from the data folder '{datadir}': {problem}. "
                     f'Expected train.txt, valid.txt and test.txt there, in {FORMATS[dataset]}. Fix: {fix}.')


class Vocab:
    """Symbol <-> id. Unknown symbols map to <unk> when the vocabulary has it; otherwise they are an error."""

    def __init__(self, idx2sym):
        self.idx2sym = list(idx2sym)
        self.sym2idx = {sym: idx for idx, sym in enumerate(self.idx2sym)}
        if len(self.sym2idx) != len(self.idx2sym):
            raise ValueError('the vocabulary has duplicate symbols')
        self.unk_idx = self.sym2idx.get('<unk>')

    def __len__(self):
        return len(self.idx2sym)

    def get_idx(self, sym):
        idx = self.sym2idx.get(sym, self.unk_idx)
        if idx is None:
            raise KeyError(f'symbol {sym!r} is not in the vocabulary, which has no <unk> to map it to')
        return idx

    def encode_line(self, line, add_eos=False):
        """LongTensor of the ids of a whitespace-tokenised line, optionally followed by <eos>."""
        if add_eos and '<eos>' not in self.sym2idx:
            raise ValueError('add_eos=True but this vocabulary has no <eos> (character-level data has none)')
        syms = line.split() + (['<eos>'] if add_eos else [])
        return torch.tensor([self.get_idx(sym) for sym in syms], dtype=torch.long)


class LMOrderedIterator:
    """Time-major windows over a token stream cut into `bsz` contiguous columns (reference Transformer-XL).

    The stream [N] is trimmed to n_step * bsz tokens and laid out as [n_step, bsz], column b being the
    b-th contiguous stretch of the stream: consecutive windows continue every column, which is what
    lets the Transformer-XL memory of one window serve the next.
    """

    def __init__(self, data, bsz, bptt, device='cpu', ext_len=0):
        if bsz < 1 or bptt < 1 or ext_len < 0:
            raise ValueError(f'need bsz >= 1, bptt >= 1 and ext_len >= 0; got {bsz}, {bptt}, {ext_len}')
        if data.dim() != 1:
            raise ValueError(f'expected a 1-D token stream, got shape {tuple(data.shape)}')
        self.bsz, self.bptt, self.ext_len, self.device = bsz, bptt, ext_len, device
        self.n_step = data.size(0) // bsz
        if self.n_step < 2:
            raise ValueError(f'a split of {data.size(0)} tokens is too short for batch size {bsz}: '
                             f'one window needs at least {2 * bsz} tokens')
        data = data[:self.n_step * bsz]                                     # [n_step * B]
        self.data = data.view(bsz, -1).t().contiguous().to(device)          # [n_step, B]
        # The reference's count, shown in logs; a full pass yields len(self) windows, one fewer than
        # n_batch when bptt divides n_step - 1.
        self.n_batch = (self.n_step + bptt - 1) // bptt

    def __len__(self):
        return len(range(0, self.n_step - 1, self.bptt))

    def get_batch(self, i, bptt=None):
        """(data [ext + T, B], target [T, B], T) for the window starting at row i; target is data shifted by one."""
        if not 0 <= i < self.n_step - 1:
            raise IndexError(f'window start {i} outside [0, {self.n_step - 1})')
        seq_len = min(self.bptt if bptt is None else bptt, self.n_step - 1 - i)
        data = self.data[max(0, i - self.ext_len):i + seq_len]              # [ext + T, B]
        target = self.data[i + 1:i + 1 + seq_len]                           # [T, B]
        return data, target, seq_len

    def iter_from(self, batch_index):
        """The windows of a full pass from window number `batch_index` on (exact mid-epoch resume)."""
        if not 0 <= batch_index <= len(self):
            raise ValueError(f'batch index {batch_index} outside [0, {len(self)}]')
        return (self.get_batch(i) for i in range(batch_index * self.bptt, self.n_step - 1, self.bptt))

    def __iter__(self):
        return self.iter_from(0)


class Corpus:
    """A tokenised corpus: vocabulary, the three splits as 1-D LongTensors, and for synthetic data its bpc floor."""

    def __init__(self, dataset, vocab, train, valid, test, bpc_floor=None):
        self.dataset, self.vocab, self.bpc_floor = dataset, vocab, bpc_floor
        self.train, self.valid, self.test = train, valid, test

    def get_iterator(self, split, bsz, bptt, device='cpu', ext_len=0):
        if split not in SPLITS:
            raise ValueError(f'unknown split {split!r}; choose one of {", ".join(SPLITS)}')
        return LMOrderedIterator(getattr(self, split), bsz, bptt, device, ext_len)


def dataset_metric(dataset):
    """'bpc' (bits per character) for the character-level corpora, 'ppl' (perplexity) for word level."""
    if dataset not in DATASETS:
        raise ValueError(f'unknown dataset {dataset!r}; choose one of {", ".join(DATASETS)}')
    return 'ppl' if dataset in WORD_DATASETS else 'bpc'


def loss_to_metric(loss, dataset):
    """Mean NLL in nats -> bpc (loss / ln 2) or ppl (exp(loss))."""
    loss = float(loss)
    if dataset_metric(dataset) == 'bpc':
        return loss / math.log(2)
    return math.exp(loss) if loss < 700 else math.inf      # math.exp overflows past ~709


# ----------------------------------------------------------------------------- loading and caching

def get_lm_corpus(datadir, dataset, synthetic=None):
    """Load a corpus from `datadir`, through a cache rebuilt whenever a source file changes.

    The cache `<datadir>/cache.<dataset>.pt` holds the vocabulary and the encoded splits, keyed by the
    size and mtime_ns of the three files and CACHE_VERSION. For 'synthetic' the corpus is generated
    first when missing or when its synthetic.json records other settings; `synthetic` overrides
    fields of SyntheticConfig.
    """
    if dataset not in DATASETS:
        raise ValueError(f'unknown dataset {dataset!r}; choose one of {", ".join(DATASETS)}')
    if synthetic is not None and dataset != 'synthetic':
        raise ValueError(f'synthetic settings given for the {dataset} corpus')
    datadir = os.fspath(datadir)
    bpc_floor = None
    if dataset == 'synthetic':
        bpc_floor = ensure_synthetic_corpus(datadir, SyntheticConfig(**(synthetic or {})))['bpc_floor']
    fingerprint = _fingerprint(datadir, dataset)
    cache_path = os.path.join(datadir, f'cache.{dataset}.pt')
    cached = _load_cache(cache_path, fingerprint)
    if cached is None:
        print(f'Encoding the {dataset} corpus in {datadir} (cached for later runs)', flush=True)
        vocab, splits = _encode_corpus(datadir, dataset)
        _save_cache(cache_path, fingerprint, vocab, splits)
    else:
        vocab, splits = cached
    return Corpus(dataset, vocab, bpc_floor=bpc_floor, **splits)


def _fingerprint(datadir, dataset):
    """[version, dataset, [[file, size, mtime_ns] x 3]]; raises DataError for a missing folder or file."""
    if not os.path.isdir(datadir):
        raise _data_error(datadir, dataset, 'the folder does not exist')
    files = []
    for split in SPLITS:
        path = os.path.join(datadir, f'{split}.txt')
        if not os.path.isfile(path):
            raise _data_error(datadir, dataset, f'{split}.txt is missing')
        stat = os.stat(path)
        files.append([f'{split}.txt', stat.st_size, stat.st_mtime_ns])
    return [CACHE_VERSION, dataset, files]


def _load_cache(path, fingerprint):
    """(vocab, splits) from the cache when it exists and matches `fingerprint`, else None."""
    if not os.path.isfile(path):
        return None
    try:
        cache = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001  an unreadable or truncated cache is rebuilt, whatever the cause
        print(f'warning: ignoring the unreadable cache {path} ({err})', file=sys.stderr)
        return None
    if not isinstance(cache, dict) or cache.get('fingerprint') != fingerprint:
        return None
    return Vocab(cache['idx2sym']), {split: cache[split].long() for split in SPLITS}


def _save_cache(path, fingerprint, vocab, splits):
    """Write the cache atomically, in the smallest integer type that holds the ids; never fatal."""
    dtype = torch.uint8 if len(vocab) <= 256 else torch.int32
    payload = dict(fingerprint=fingerprint, idx2sym=vocab.idx2sym,
                   **{split: splits[split].to(dtype) for split in SPLITS})
    tmp = f'{path}.{os.getpid()}.tmp'          # one per process: concurrent runs never share it
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as err:
        print(f'warning: could not write the cache {path} ({err}); the corpus is re-encoded next time',
              file=sys.stderr)
        if os.path.exists(tmp):
            os.remove(tmp)


def _encode_corpus(datadir, dataset):
    """(Vocab, {split: LongTensor}) as the reference Transformer-XL Corpus builds them.

    Pass one encodes with provisional ids in first-appearance order (<eos> first for word level);
    the ids are then renumbered by frequency rank, ties keeping first appearance, which is the order
    of the reference's Counter.most_common.
    """
    table = {'<eos>': 0} if dataset in WORD_DATASETS else {}
    n_special = len(table)

    def new_symbol(sym):
        return table.setdefault(sym, len(table))

    counted = ('train',) if dataset == 'wt103' else SPLITS
    provisional = {}
    for split in counted:
        n_known = len(table)
        provisional[split] = _read_split(datadir, dataset, split, table, new_symbol)
        _check_symbols(datadir, dataset, split, list(table)[n_known:])
    counts = sum(np.bincount(ids, minlength=len(table)) for ids in provisional.values())
    order = np.concatenate([np.arange(n_special), n_special + np.argsort(-counts[n_special:], kind='stable')])
    remap = np.empty(len(table), dtype=np.int64)
    remap[order] = np.arange(len(table))
    symbols = list(table)
    vocab = Vocab([symbols[i] for i in order])
    splits = {split: torch.from_numpy(remap[ids]) for split, ids in provisional.items()}
    for split in SPLITS:
        if split not in splits:
            ids = _read_split(datadir, dataset, split, vocab.sym2idx, vocab.get_idx)
            splits[split] = torch.from_numpy(ids.astype(np.int64))
    return vocab, splits


def _read_split(datadir, dataset, split, table, missing):
    """int32 ids of one file; `missing(sym)` gives the id of a symbol not in `table` (or raises KeyError)."""
    path = os.path.join(datadir, f'{split}.txt')
    add_eos = dataset in WORD_DATASETS
    ids = array('i')
    try:
        with open(path, encoding='utf-8') as f:
            for line in f:
                syms = line.split()
                if add_eos:
                    syms.append('<eos>')
                try:
                    ids.extend(list(map(table.__getitem__, syms)))      # fast path: all symbols known
                except KeyError:
                    ids.extend([table[sym] if sym in table else missing(sym) for sym in syms])
    except UnicodeDecodeError as err:
        raise _data_error(datadir, dataset, f'{split}.txt is not UTF-8 text ({err})') from None
    except KeyError as err:
        raise _data_error(datadir, dataset, f'{split}.txt has a word missing from the vocabulary of '
                                            f'train.txt, and train.txt has no <unk> ({err.args[0]})') from None
    if not ids:
        raise _data_error(datadir, dataset, f'{split}.txt is empty (no tokens)')
    return np.frombuffer(ids, dtype=np.intc)


def _check_symbols(datadir, dataset, split, new_symbols):
    """DataError when a symbol first seen in this split does not fit the dataset's format."""
    if dataset in ('enwik8', 'synthetic'):
        bad = [sym for sym in new_symbols if sym not in BYTE_TOKENS]
    elif dataset == 'text8':
        bad = [sym for sym in new_symbols if len(sym) != 1]
    else:
        bad = []
    if bad:
        raise _data_error(datadir, dataset, f'{split}.txt has tokens that do not fit the format, '
                                            f'e.g. {bad[0][:40]!r}')


# ----------------------------------------------------------------------------- preparation (get_data.sh)

def split_standard(seq, n_test):
    """{'train': seq[:-2n], 'valid': seq[-2n:-n], 'test': seq[-n:]}: the standard enwik8 / text8 split."""
    if n_test < 1 or len(seq) <= 2 * n_test:
        raise ValueError(f'cannot hold out 2 x {n_test} symbols from a sequence of {len(seq)}')
    return {'train': seq[:-2 * n_test], 'valid': seq[-2 * n_test:-n_test], 'test': seq[-n_test:]}


def _enwik8_text(raw_bytes):
    """Each byte as its decimal value, separated by single spaces, byte 10 as a real newline."""
    table = [str(b) for b in range(256)]
    table[10] = '\n'
    return ' '.join(map(table.__getitem__, raw_bytes))


def prep_enwik8(raw_bytes, n_test=5_000_000):
    """Split and format enwik8 like the standard prep_enwik8.py of Transformer-XL / AWD-LSTM.

    The first len - 2 n_test bytes are train, the next n_test valid, the last n_test test; each part
    is written as `' '.join(str(c) if c != 10 else '\\n' for c in part)`.
    """
    return {split: _enwik8_text(part) for split, part in split_standard(bytes(raw_bytes), n_test).items()}


def prep_text8(raw_bytes, n_test=5_000_000):
    """Split and format text8 like the standard prep_text8.py of Transformer-XL.

    That script splits like enwik8 (last 2 n_test characters: valid then test), strips leading and
    trailing whitespace of each part (text8 starts with a space), writes ' ' as '_' and joins the
    characters with single spaces. text8 is ASCII, so characters and bytes coincide.
    """
    if not raw_bytes.isascii():
        raise ValueError('text8 must be ASCII text')
    parts = split_standard(raw_bytes.decode('ascii'), n_test)
    return {split: ' '.join(part.strip().replace(' ', '_')) for split, part in parts.items()}


def _zip_member(zf, basename):
    """The member of an open zip whose file name is `basename` (the only member as a fallback)."""
    names = [n for n in zf.namelist() if not n.endswith('/')]
    matches = [n for n in names if os.path.basename(n) == basename]
    if len(matches) == 1 or (not matches and len(names) == 1):
        return (matches or names)[0]
    raise ValueError(f'{zf.filename}: expected one member named {basename}, found {names[:10]}')


def _find_source(src, basename):
    """Path of `basename` given as the file itself, or inside the folder `src` (searched recursively)."""
    if not os.path.isdir(src):
        return src
    for root, _, files in sorted(os.walk(src)):
        if basename in files:
            return os.path.join(root, basename)
    raise ValueError(f'no {basename} under {src}')


def _read_source(src, basename):
    """Bytes of `basename` from a zip file, a folder holding it, or the file itself."""
    if zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as zf:
            return zf.read(_zip_member(zf, basename))
    with open(_find_source(src, basename), 'rb') as f:
        return f.read()


def _write_atomic(path, data):
    """Write str (UTF-8) or bytes through a temporary file, so an interrupted run leaves no partial file."""
    tmp = f'{path}.tmp'
    if isinstance(data, str):
        with open(tmp, 'w', encoding='utf-8', newline='\n') as f:
            f.write(data)
    else:
        with open(tmp, 'wb') as f:
            f.write(data)
    os.replace(tmp, path)


def prep_corpus(dataset, src, out_dir, n_test=5_000_000):
    """Write out_dir/{train,valid,test}.txt from a downloaded zip, an extracted file or a folder."""
    os.makedirs(out_dir, exist_ok=True)
    if dataset in WORD_DATASETS:
        if not (os.path.isdir(src) or zipfile.is_zipfile(src)):
            raise ValueError(f'{src}: expected the WikiText zip or the folder holding wiki.*.tokens')
        for split in SPLITS:
            data = _read_source(src, f'wiki.{split}.tokens')
            _write_atomic(os.path.join(out_dir, f'{split}.txt'), data)
        return
    prep = {'enwik8': prep_enwik8, 'text8': prep_text8}[dataset]
    raw = _read_source(src, dataset)
    texts = prep(raw, n_test)
    for split, part in split_standard(raw, n_test).items():
        _write_atomic(os.path.join(out_dir, f'{split}.txt.raw'), part)
        _write_atomic(os.path.join(out_dir, f'{split}.txt'), texts[split])


# ----------------------------------------------------------------------------- synthetic corpus

def make_synthetic_corpus(out_dir, **settings):
    """Write a synthetic corpus with a known entropy rate to out_dir; returns what synthetic.json holds.

    settings: fields of SyntheticConfig (seed, n_train, n_valid, n_test, n_dialects, alphabet_size,
    concentration, switch_prob). The text is made of "dialects", each with its own disjoint alphabet of
    bytes and its own peaked order-1 transition matrix (Dirichlet rows); it stays in a dialect for a
    Geometric(switch_prob) number of characters, then moves to another dialect chosen uniformly and
    starts from that dialect's start distribution. A router has real structure to exploit (which
    dialect is being spoken), and because the alphabets are disjoint the source is one Markov chain
    (chain_matrix), so its entropy rate, the best achievable bpc, is exact: `bpc_floor`. As a check,
    `test_bpc_true_model` is the bpc of the true chain on the test split. One stream of
    n_train + n_valid + n_test characters is cut into train, valid and test, written in the enwik8
    format. The same seed gives byte-identical files (for a given numpy version).
    """
    cfg = SyntheticConfig(**settings)
    rng = np.random.default_rng(cfg.seed)
    chain = dialect_chain(cfg, rng)
    n_valid_end = cfg.n_train + cfg.n_valid
    states = sample_chain(chain, n_valid_end + cfg.n_test, rng)                # [N]
    matrix = chain_matrix(chain)
    test_nll = -np.log2(matrix[states[n_valid_end - 1:-1], states[n_valid_end:]])
    raw = chain.alphabets.ravel()[states].astype(np.uint8).tobytes()
    os.makedirs(out_dir, exist_ok=True)
    bounds = {'train': (0, cfg.n_train), 'valid': (cfg.n_train, n_valid_end), 'test': (n_valid_end, None)}
    for split, (begin, end) in bounds.items():
        _write_atomic(os.path.join(out_dir, f'{split}.txt'), _enwik8_text(raw[begin:end]))
    info = {'format_version': SYNTHETIC_VERSION, 'settings': dataclasses.asdict(cfg),
            'alphabets': chain.alphabets.tolist(), 'bpc_floor': entropy_rate_bits(matrix),
            'test_bpc_true_model': float(test_nll.mean())}
    # Written last: a complete synthetic.json marks a complete corpus.
    _write_atomic(os.path.join(out_dir, 'synthetic.json'), json.dumps(info, indent=1) + '\n')
    return info


def ensure_synthetic_corpus(datadir, cfg):
    """The synthetic.json of the corpus in datadir, (re)generating it unless it matches cfg and the version.

    A folder holding text files but no synthetic.json is another corpus: it is never overwritten.
    """
    info_path = os.path.join(datadir, 'synthetic.json')
    if not os.path.exists(info_path) and any(os.path.exists(os.path.join(datadir, f'{split}.txt'))
                                             for split in SPLITS):
        raise _data_error(datadir, 'synthetic', 'it holds text files but no synthetic.json, so it looks like '
                                                'another corpus, which is left untouched',
                          fix='give the synthetic corpus a folder of its own (default data/synthetic)')
    try:
        with open(info_path, encoding='utf-8') as f:
            info = json.load(f)
        current = (info.get('format_version') == SYNTHETIC_VERSION
                   and info.get('settings') == dataclasses.asdict(cfg)
                   and all(os.path.isfile(os.path.join(datadir, f'{split}.txt')) for split in SPLITS))
    except (OSError, ValueError):
        current = False
    if current:
        return info
    print(f'Generating the synthetic corpus in {datadir}', flush=True)
    return make_synthetic_corpus(datadir, **dataclasses.asdict(cfg))


# ----------------------------------------------------------------------------- command line

def _parse_args(argv):
    parser = argparse.ArgumentParser(description='Prepare, generate or inspect language-model corpora.')
    commands = parser.add_subparsers(dest='command', required=True)
    prep = commands.add_parser('prep', help='write train/valid/test.txt from a downloaded corpus '
                                            '(run by script/get_data.sh)')
    prep.add_argument('--dataset', required=True, choices=('enwik8', 'text8', 'wt103', 'wt2'))
    prep.add_argument('--src', required=True, help='the downloaded zip, or the extracted file / folder')
    prep.add_argument('--out', required=True, help='folder to write train.txt, valid.txt, test.txt into')
    prep.add_argument('--n_test', type=int, default=5_000_000,
                      help='characters held out for each of valid and test (enwik8, text8)')
    synthetic = commands.add_parser('synthetic', help='generate the synthetic corpus and print its bpc floor')
    synthetic.add_argument('--out', default='data/synthetic', help='folder to write the corpus into')
    for field in dataclasses.fields(SyntheticConfig):
        synthetic.add_argument(f'--{field.name}', type=type(field.default), default=field.default,
                               help=f'(default {field.default})')
    stats = commands.add_parser('stats', help='load a prepared corpus (building its cache) and print its sizes')
    stats.add_argument('--dataset', required=True, choices=('enwik8', 'text8', 'wt103', 'wt2'))
    stats.add_argument('--data', required=True, help='the corpus folder')
    return parser.parse_args(argv)


def main(argv=None):
    args = _parse_args(argv)
    try:
        if args.command == 'prep':
            prep_corpus(args.dataset, args.src, args.out, args.n_test)
            print(f'{args.dataset}: wrote train.txt, valid.txt and test.txt to {args.out}')
        elif args.command == 'synthetic':
            settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)}
            info = make_synthetic_corpus(args.out, **settings)
            print(f"synthetic: wrote {args.out}; bpc floor {info['bpc_floor']:.4f}, "
                  f"true model on test {info['test_bpc_true_model']:.4f} bpc (details in synthetic.json)")
        else:
            corpus = get_lm_corpus(args.data, args.dataset)
            sizes = ', '.join(f'{split} {len(getattr(corpus, split)):,}' for split in SPLITS)
            print(f'{args.dataset}: vocabulary {len(corpus.vocab):,}, tokens: {sizes}')
    except (DataError, ValueError, OSError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
