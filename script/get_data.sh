#!/usr/bin/env bash
# Download and prepare the corpora of the paper into ${DATA_DIR:-data}/{enwik8,text8,wikitext-103,wikitext-2}.
#
#   bash script/get_data.sh                 # all four
#   bash script/get_data.sh enwik8 wt103    # only these
#
# A corpus whose train.txt, valid.txt and test.txt already exist is skipped; a downloaded zip is kept
# and reused. After preparing, the corpus is loaded once, which builds its cache and prints its
# vocabulary size (enwik8 204, text8 27, wt103 267,735).
# The default corpus, `synthetic`, needs nothing from here: train.py generates it on first use.
#
# Environment: DATA_DIR (default data), PYTHON (default python), and ENWIK8_URL, TEXT8_URL, WT103_URL,
# WT2_URL to override a download link.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${DATA_DIR:-data}"
PYTHON="${PYTHON:-python}"
ENWIK8_URL="${ENWIK8_URL:-http://mattmahoney.net/dc/enwik8.zip}"
TEXT8_URL="${TEXT8_URL:-http://mattmahoney.net/dc/text8.zip}"
# The original WikiText links (s3.amazonaws.com/research.metamind.io/wikitext/...) answer 403 since
# 2024. wikitext.smerity.com is the mirror of the WikiText author serving the same zips, as reported
# in several projects' issues; it could not be checked from where this script was written (no
# network), hence the overrides.
WT103_URL="${WT103_URL:-https://wikitext.smerity.com/wikitext-103-v1.zip}"
WT2_URL="${WT2_URL:-https://wikitext.smerity.com/wikitext-2-v1.zip}"

usage() {
  echo "usage: bash script/get_data.sh [enwik8] [text8] [wt103] [wt2]   (default: all four)"
  echo "environment: DATA_DIR=$DATA_DIR PYTHON=$PYTHON ENWIK8_URL TEXT8_URL WT103_URL WT2_URL"
}

source "$REPO_DIR/script/download.sh"

# prepare NAME FOLDER URL: download FOLDER's zip, then write FOLDER/{train,valid,test}.txt.
prepare() {
  local name="$1" dir="$DATA_DIR/$2" url="$3"
  local zip="$dir/${url##*/}"
  if [[ -f "$dir/train.txt" && -f "$dir/valid.txt" && -f "$dir/test.txt" ]]; then
    echo "$name: already prepared in $dir, skipping"
    return
  fi
  echo "$name: preparing in $dir"
  mkdir -p "$dir"
  download "$url" "$zip"
  "$PYTHON" "$REPO_DIR/data_utils.py" prep --dataset "$name" --src "$zip" --out "$dir"
  "$PYTHON" "$REPO_DIR/data_utils.py" stats --dataset "$name" --data "$dir"
}

main() {
  local names=("$@")
  if [[ $# -eq 0 ]]; then
    names=(enwik8 text8 wt103 wt2)
  fi
  local name
  for name in "${names[@]}"; do          # check every argument before downloading anything
    case "$name" in
      enwik8|text8|wt103|wt2) ;;
      -h|--help) usage; exit 0 ;;
      *) echo "error: unknown dataset '$name'" >&2; usage >&2; exit 2 ;;
    esac
  done
  for name in "${names[@]}"; do
    case "$name" in
      enwik8) prepare enwik8 enwik8 "$ENWIK8_URL" ;;
      text8) prepare text8 text8 "$TEXT8_URL" ;;
      wt103) prepare wt103 wikitext-103 "$WT103_URL" ;;
      wt2) prepare wt2 wikitext-2 "$WT2_URL" ;;
    esac
  done
}

main "$@"
