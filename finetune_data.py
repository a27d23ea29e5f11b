"""Text-classification data for fine-tuning (paper Table 3): the on-disk format, its converters, byte encoding.

Format: a task folder holds `train.tsv` (required), `dev.tsv` and `test.tsv` (optional), one example a
line, `text<TAB>label`, UTF-8, no header, no quoting. The text has no tab or newline (the converters
collapse every run of whitespace into one space); the label is any string without whitespace. The
label vocabulary is built from train.tsv (sorted; numerically when every label is an integer), and a
dev/test label never seen in train is an error, as is a malformed line.

Converters (run by script/get_finetune_data.sh) from the datasets' native formats:
- sst2: GLUE SST-2 (`train.tsv`, `dev.tsv` with header `sentence<TAB>label`). GLUE's test.tsv has no
  labels, so only train.tsv and dev.tsv are written and the dev set is the one reported.
- sst5: SetFit/sst5 on the Hugging Face hub (`train.jsonl`, `dev.jsonl`, `test.jsonl`, one
  {"text", "label" 0-4, "label_text"} object a line): the standard SST-5 sentence-level splits.
- imdb: the aclImdb folders `train/{neg,pos}/*.txt` and `test/{neg,pos}/*.txt` (`train/unsup` is not
  used); the `<br />` tags of the reviews become spaces.
- banking77: PolyAI's `train.csv` and `test.csv` with header `text,category`.

Encoding: the pretrained character-level model reads UTF-8 bytes, so `ByteEncoder` maps a text to the
ids of the checkpoint's own vocabulary, whose symbols are the decimal strings of byte values ('0'..'255').
This module does not need torch (get_finetune_data.sh runs it on its own).

CLI: `python finetune_data.py convert --task sst2 --src DIR --out DIR` and `stats --data DIR`.
"""
import argparse
import csv
import json
import os
import sys
from typing import NamedTuple

import numpy as np

TASKS = {'sst2': 'SST-2', 'sst5': 'SST-5', 'imdb': 'IMDB', 'banking77': 'BANKING77'}
SPLITS = ('train', 'dev', 'test')
SPACE_BYTE = '32'
# The symbols of a byte-level vocabulary (data_utils.BYTE_TOKENS; not imported, so that the converters
# run without loading torch).
BYTE_SYMBOLS = frozenset(str(b) for b in range(256))


class FinetuneDataError(Exception):
    """Missing or malformed fine-tuning data; the message names the file (and line) and the fix."""


# ----------------------------------------------------------------------------- the tsv format

def clean_text(text):
    """Collapse every run of whitespace (tabs and newlines included) into one space; strip the ends."""
    return ' '.join(text.split())


def write_tsv(path, rows):
    """Write [(text, label)] as `text<TAB>label` lines, through a temporary file."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w', encoding='utf-8', newline='\n') as f:
        for text, label in rows:
            text, label = clean_text(text), str(label)
            if not text or label.split() != [label]:
                raise FinetuneDataError(f'{path}: cannot write example {text[:60]!r} with label {label!r}: '
                                        'the text must be non-empty and the label one word')
            f.write(f'{text}\t{label}\n')
    os.replace(tmp, path)


def read_tsv(path):
    """[(text, label)] of a tsv file of our format; FinetuneDataError naming the line of a malformed one."""
    rows = []
    with open(path, encoding='utf-8', newline='\n') as f:
        try:
            lines = f.read().split('\n')
        except UnicodeDecodeError as err:
            raise FinetuneDataError(f'{path} is not UTF-8 text ({err})') from err
    if lines and lines[-1] == '':
        lines.pop()                                      # the newline ending the last line
    for number, line in enumerate(lines, 1):
        fields = line.rstrip('\r').split('\t')
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise FinetuneDataError(f'{path}:{number}: expected `text<TAB>label` with a non-empty text and label '
                                    f'and exactly one tab, got {line[:80]!r}')
        rows.append((fields[0], fields[1].strip()))
    if not rows:
        raise FinetuneDataError(f'{path} holds no example')
    return rows


def label_vocabulary(train_rows):
    """The sorted labels of the train split (numerically when they are all integers)."""
    labels = {label for _, label in train_rows}
    if all(label.lstrip('-').isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


class TaskData(NamedTuple):
    splits: dict        # split name -> [(text, label)]
    labels: list        # label vocabulary, from train


def load_task(datadir):
    """The splits present in datadir (train required) and the label vocabulary of train."""
    train_path = os.path.join(datadir, 'train.tsv')
    if not os.path.isfile(train_path):
        raise FinetuneDataError(f"no train.tsv in the fine-tuning data folder '{datadir}'. Expected train.tsv "
                                '(and dev.tsv / test.tsv) of `text<TAB>label` lines; run `bash '
                                'script/get_finetune_data.sh TASK` (see README) or point --data at such a folder')
    splits = {split: read_tsv(os.path.join(datadir, f'{split}.tsv')) for split in SPLITS
              if os.path.isfile(os.path.join(datadir, f'{split}.tsv'))}
    labels = label_vocabulary(splits['train'])
    known = set(labels)
    for split, rows in splits.items():
        for number, (_, label) in enumerate(rows, 1):
            if label not in known:
                raise FinetuneDataError(f'{os.path.join(datadir, split + ".tsv")}:{number}: label {label!r} never '
                                        f'occurs in train.tsv, whose labels are {labels[:20]}')
    return TaskData(splits, labels)


# ----------------------------------------------------------------------------- converters

def _require(path, what):
    if not os.path.exists(path):
        raise FinetuneDataError(f'{path} not found: expected {what}')
    return path


def convert_sst2(src):
    """GLUE SST-2 folder -> {'train', 'dev'} (GLUE's test split is unlabelled)."""
    out = {}
    for split in ('train', 'dev'):
        path = _require(os.path.join(src, f'{split}.tsv'), 'the GLUE SST-2 folder (train.tsv, dev.tsv)')
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
        if not lines or lines[0].split('\t') != ['sentence', 'label']:
            raise FinetuneDataError(f'{path}: expected the GLUE header `sentence<TAB>label`')
        rows = [line.split('\t') for line in lines[1:] if line]
        bad = [row for row in rows if len(row) != 2]
        if bad:
            raise FinetuneDataError(f'{path}: malformed line {"<TAB>".join(bad[0])[:80]!r}')
        out[split] = [(text, label) for text, label in rows]
    return out


def convert_sst5(src):
    """SetFit/sst5 jsonl files -> {'train', 'dev', 'test'}, labels 0 (very negative) .. 4 (very positive)."""
    out = {}
    for split in SPLITS:
        path = _require(os.path.join(src, f'{split}.jsonl'), 'the SetFit/sst5 files train/dev/test.jsonl')
        with open(path, encoding='utf-8') as f:
            records = [json.loads(line) for line in f if line.strip()]
        out[split] = [(r['text'], int(r['label'])) for r in records]
    return out


def convert_imdb(src):
    """aclImdb folder (or the folder holding it) -> {'train', 'test'}, labels neg / pos."""
    root = os.path.join(src, 'aclImdb') if os.path.isdir(os.path.join(src, 'aclImdb')) else src
    out = {}
    for split in ('train', 'test'):
        rows = []
        for label in ('neg', 'pos'):
            folder = _require(os.path.join(root, split, label), 'the aclImdb review folders {train,test}/{neg,pos}')
            for name in sorted(os.listdir(folder)):
                if name.endswith('.txt'):
                    with open(os.path.join(folder, name), encoding='utf-8') as f:
                        rows.append((f.read().replace('<br />', ' '), label))
        out[split] = rows
    return out


def convert_banking77(src):
    """PolyAI BANKING77 csv files -> {'train', 'test'}, the 77 intent names as labels."""
    out = {}
    for split in ('train', 'test'):
        path = _require(os.path.join(src, f'{split}.csv'), 'the BANKING77 files train.csv and test.csv')
        with open(path, encoding='utf-8', newline='') as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != ['text', 'category']:
                raise FinetuneDataError(f'{path}: expected the header `text,category`, got {reader.fieldnames}')
            out[split] = [(row['text'], row['category']) for row in reader]
    return out


CONVERTERS = {'sst2': convert_sst2, 'sst5': convert_sst5, 'imdb': convert_imdb, 'banking77': convert_banking77}


def convert(task, src, out_dir):
    """Write out_dir/<split>.tsv from the native files in src; returns {split: number of examples}."""
    if task not in CONVERTERS:
        raise FinetuneDataError(f'unknown task {task!r}; choose one of {", ".join(CONVERTERS)}')
    splits = CONVERTERS[task](src)
    os.makedirs(out_dir, exist_ok=True)
    for split, rows in splits.items():
        write_tsv(os.path.join(out_dir, f'{split}.tsv'), rows)
    return {split: len(rows) for split, rows in splits.items()}


# ----------------------------------------------------------------------------- encoding

class ByteEncoder:
    """Text -> ids of a byte-level vocabulary (enwik8, synthetic: symbols '0'..'255', frequency-ranked).

    The text is encoded as UTF-8 and cut to its first max_len bytes (a multi-byte character may be cut;
    the model reads bytes anyway). A byte the vocabulary lacks (enwik8 has 204 of the 256, without the
    newline and most control bytes) maps to `fallback_id`: the id of the space byte when the vocabulary
    has it (the cleaned texts only lose whitespace that way), else id 0, the most frequent symbol.
    """

    def __init__(self, idx2sym):
        foreign = [sym for sym in idx2sym if sym not in BYTE_SYMBOLS]
        if foreign:
            raise FinetuneDataError(
                f'the checkpoint vocabulary is not byte-level (it has {len(idx2sym)} symbols such as '
                f'{foreign[:5]}): fine-tuning reads text as UTF-8 bytes, so it needs a character-level model '
                'pretrained on enwik8 (or the synthetic corpus), not a word-level or text8 one')
        self.idx2sym = list(idx2sym)
        sym2idx = {sym: idx for idx, sym in enumerate(idx2sym)}
        self.fallback_id = sym2idx.get(SPACE_BYTE, 0)
        self.known = np.array([str(b) in sym2idx for b in range(256)])
        self.table = np.array([sym2idx.get(str(b), self.fallback_id) for b in range(256)], dtype=np.int64)

    def bytes_of(self, text, max_len):
        return np.frombuffer(text.encode('utf-8')[:max_len], dtype=np.uint8)

    def encode(self, text, max_len):
        """int64 array [n <= max_len] of the ids of the text's first max_len bytes."""
        return self.table[self.bytes_of(text, max_len)]

    def unknown_fraction(self, texts, max_len):
        """Fraction of the (kept) bytes of `texts` that fall back to fallback_id."""
        counts = [(int((~self.known[b]).sum()), len(b)) for b in (self.bytes_of(t, max_len) for t in texts)]
        return sum(c for c, _ in counts) / max(sum(n for _, n in counts), 1)


class Example(NamedTuple):
    ids: np.ndarray     # [n] token ids
    label: int          # index into the label vocabulary


def encode_rows(rows, labels, encoder, max_len):
    index = {label: i for i, label in enumerate(labels)}
    return [Example(encoder.encode(text, max_len), index[label]) for text, label in rows]


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(description='Convert or inspect fine-tuning data (see the module docstring).')
    commands = parser.add_subparsers(dest='command', required=True)
    conv = commands.add_parser('convert', help='native files -> train/dev/test.tsv (run by get_finetune_data.sh)')
    conv.add_argument('--task', required=True, choices=list(CONVERTERS))
    conv.add_argument('--src', required=True, help='folder of the downloaded (extracted) native files')
    conv.add_argument('--out', required=True, help='folder to write the tsv files into')
    stats = commands.add_parser('stats', help='check a task folder and print its sizes and labels')
    stats.add_argument('--data', required=True, help='the task folder')
    args = parser.parse_args(argv)
    try:
        if args.command == 'convert':
            sizes = convert(args.task, args.src, args.out)
            print(f'{args.task}: wrote ' + ', '.join(f'{s}.tsv ({n:,})' for s, n in sizes.items()) + f' to {args.out}')
        else:
            data = load_task(args.data)
            sizes = ', '.join(f'{split} {len(rows):,}' for split, rows in data.splits.items())
            print(f'{args.data}: {sizes}; {len(data.labels)} labels: {" ".join(data.labels[:10])}'
                  + (' ...' if len(data.labels) > 10 else ''))
    except (FinetuneDataError, OSError, ValueError, KeyError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
