# Sourced by get_data.sh and get_finetune_data.sh.

# download URL FILE: fetch into FILE.part and rename it when complete, so a broken download is redone.
download() {
  local url="$1" file="$2"
  if [[ -s "$file" ]]; then
    echo "- $file already downloaded"
    return
  fi
  echo "- downloading $url"
  mkdir -p "$(dirname "$file")"
  if command -v curl >/dev/null 2>&1; then
    curl -fL --retry 3 -o "$file.part" "$url" || download_failed "$url"
  elif command -v wget >/dev/null 2>&1; then
    wget -O "$file.part" "$url" || download_failed "$url"
  else
    echo "error: neither curl nor wget is installed" >&2
    exit 1
  fi
  mv "$file.part" "$file"
}

download_failed() {
  echo "error: could not download $1. Check the network, or point the script's URL variable (see its" \
       "header) at a mirror or a file:// URL of a local copy." >&2
  exit 1
}
