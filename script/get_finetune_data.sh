#!/usr/bin/env bash
# Download the fine-tuning datasets of paper Table 3 and convert them into
# ${FT_DATA:-data/finetune}/<task>/{train,dev,test}.tsv (`text<TAB>label`, see finetune_data.py).
#
#   bash script/get_finetune_data.sh                     # sst2 sst5 imdb banking77
#   bash script/get_finetune_data.sh sst2 banking77      # only these
#
# Sources (each overridable by its variable, e.g. a mirror or a file:// URL):
#   sst2       SST2_URL       GLUE SST-2 zip: train.tsv, dev.tsv. GLUE's test labels are not public, so only
#                             train.tsv and dev.tsv are written and the dev set (872 sentences) is reported.
#   sst5       SST5_URL       folder of {train,dev,test}.jsonl of SetFit/sst5 on the Hugging Face hub (the
#                             standard sentence-level SST-5 splits, 8,544 / 1,101 / 2,210), pinned to a commit.
#   imdb       IMDB_URL       aclImdb_v1.tar.gz (Maas et al. 2011): train 25,000, test 25,000; no dev split.
#   banking77  BANKING77_URL  folder of PolyAI's banking_data/{train,test}.csv: train 10,003, test 3,080.
# A task whose train.tsv exists is skipped; downloads are kept in <task>/raw and reused.
# Paths are relative to the repository root (as FT_DATA of the script/table2 scripts).
#
# Environment: FT_DATA (default data/finetune), PYTHON (default python), SST2_URL, SST5_URL, IMDB_URL,
# BANKING77_URL.
set -euo pipefail
shopt -s inherit_errexit      # a failure inside $(fetch ...) stops the script too
cd "$(dirname "${BASH_SOURCE[0]}")/.."
FT_DATA="${FT_DATA:-data/finetune}"
PYTHON="${PYTHON:-python}"
SST2_URL="${SST2_URL:-https://dl.fbaipublicfiles.com/glue/data/SST-2.zip}"
SST5_URL="${SST5_URL:-https://huggingface.co/datasets/SetFit/sst5/resolve/e51bdcd8cd3a30da231967c1a249ba59361279a3}"
IMDB_URL="${IMDB_URL:-https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz}"
BANKING77_URL="${BANKING77_URL:-https://raw.githubusercontent.com/PolyAI-LDN/task-specific-datasets/master/banking_data}"
TASKS=(sst2 sst5 imdb banking77)

usage() {
  echo "usage: bash script/get_finetune_data.sh [sst2] [sst5] [imdb] [banking77]   (default: all four)"
  echo "environment: FT_DATA=$FT_DATA PYTHON=$PYTHON SST2_URL SST5_URL IMDB_URL BANKING77_URL"
}

source script/download.sh

# fetch TASK RAW: download TASK's native files into RAW; prints the folder the converter reads.
fetch() {
  local task="$1" raw="$2" name
  case "$task" in
    sst2)
      download "$SST2_URL" "$raw/SST-2.zip" >&2
      "$PYTHON" -m zipfile -e "$raw/SST-2.zip" "$raw/" >&2
      echo "$raw/SST-2" ;;
    sst5)
      for name in train dev test; do download "$SST5_URL/$name.jsonl" "$raw/$name.jsonl" >&2; done
      echo "$raw" ;;
    imdb)
      download "$IMDB_URL" "$raw/aclImdb_v1.tar.gz" >&2
      [[ -d "$raw/aclImdb" ]] || tar -xzf "$raw/aclImdb_v1.tar.gz" -C "$raw"
      echo "$raw/aclImdb" ;;
    banking77)
      for name in train test; do download "$BANKING77_URL/$name.csv" "$raw/$name.csv" >&2; done
      echo "$raw" ;;
  esac
}

prepare() {
  local task="$1" dir="$FT_DATA/$1"
  if [[ -f "$dir/train.tsv" ]]; then
    echo "$task: already prepared in $dir, skipping"
    return
  fi
  echo "$task: preparing in $dir"
  local src
  src="$(fetch "$task" "$dir/raw")"
  "$PYTHON" finetune_data.py convert --task "$task" --src "$src" --out "$dir"
  "$PYTHON" finetune_data.py stats --data "$dir"
}

main() {
  local names=("$@") name
  if [[ $# -eq 0 ]]; then
    names=("${TASKS[@]}")
  fi
  for name in "${names[@]}"; do          # check every argument before downloading anything
    case "$name" in
      sst2|sst5|imdb|banking77) ;;
      -h|--help) usage; exit 0 ;;
      *) echo "error: unknown task '$name'" >&2; usage >&2; exit 2 ;;
    esac
  done
  for name in "${names[@]}"; do
    prepare "$name"
  done
}

main "$@"
