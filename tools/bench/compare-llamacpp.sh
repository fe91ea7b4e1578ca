#!/usr/bin/env bash
# Speed of gemma3 against llama.cpp's llama-bench on the same GGUF files, same machine, same
# thread count, the two engines run alternately (one repetition each, in turn) so background
# load hits both alike. Prints per-test mean t/s of both and the ratio gemma3 / llama.cpp.
#
# llama.cpp is built from the source inside the llama-cpp-python sdist on PyPI, in the
# git-ignored folder third_party_build/ (tools/bench/llamacpp-build.sh).
#
# usage: tools/bench/compare-llamacpp.sh [-t THREADS] [-r REPS] [-p N] [-n N] [-g GEMMA3_BIN] [MODEL.gguf ...]
#   default model: ~/.cache/gemma3/gemma-3-270m-q4_k_m.gguf, plus a Q4_0 and a BF16 270M-shaped
#   checkpoint (random weights) made with `gemma3 make-model` when that command exists
#   (skipped with a message otherwise).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK="$ROOT/third_party_build"
THREADS=2
REPS=5
NP=512
NG=128
GEMMA3=""
while getopts "t:r:p:n:g:" opt; do
  case $opt in
    t) THREADS=$OPTARG ;;
    r) REPS=$OPTARG ;;
    p) NP=$OPTARG ;;
    n) NG=$OPTARG ;;
    g) GEMMA3=$OPTARG ;;
    *) echo "usage: $0 [-t THREADS] [-r REPS] [-p N] [-n N] [-g GEMMA3_BIN] [MODEL.gguf ...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))

if [[ -z "$GEMMA3" ]]; then
  for b in "$ROOT"/build-fast/gemma3 "$ROOT"/build/gemma3; do [[ -x "$b" ]] && GEMMA3=$b && break; done
fi
[[ -x "$GEMMA3" ]] || { echo "gemma3 binary not found; build it or pass -g" >&2; exit 2; }

# ---- llama-bench from the llama-cpp-python sdist -------------------------------------------
source "$ROOT/tools/bench/llamacpp-build.sh"
llamacpp_build "$(nproc)" llama-bench
LLAMA_BENCH="$LLAMACPP_BIN/llama-bench"
LLAMA_VERSION=$LLAMACPP_SDIST

# ---- models -----------------------------------------------------------------------------------
MODELS=("$@")
if [[ ${#MODELS[@]} -eq 0 ]]; then
  BASE="$HOME/.cache/gemma3/gemma-3-270m-q4_k_m.gguf"
  [[ -f "$BASE" ]] || { echo "$BASE missing: run models/fetch.sh" >&2; exit 2; }
  MODELS=("$BASE")
  if "$GEMMA3" make-model --help >/dev/null 2>&1; then
    mkdir -p "$WORK/models"
    for ty in Q4_0 BF16; do
      out="$WORK/models/gemma-3-270m-$(echo $ty | tr 'A-Z' 'a-z').gguf"
      if [[ ! -f "$out" ]]; then
        # random weights with the 270M's real shapes: speed does not depend on the values
        "$GEMMA3" make-model --size 270m --type "$(echo $ty | tr 'A-Z' 'a-z')" -o "$out" >&2 ||
          { echo "make-model $ty failed; skipping it" >&2; rm -f "$out"; continue; }
      fi
      MODELS+=("$out")
    done
  else
    echo "note: 'gemma3 make-model' is not available: skipping the Q4_0 and BF16 comparisons" >&2
  fi
fi

# ---- alternate runs ---------------------------------------------------------------------------
RAW="$WORK/compare-$(date +%Y%m%d-%H%M%S).jsonl"
mkdir -p "$WORK"
echo "== gemma3: $GEMMA3; llama.cpp: $LLAMA_VERSION; threads $THREADS; $REPS rounds; raw -> $RAW" >&2
for model in "${MODELS[@]}"; do
  for round in $(seq 1 "$REPS"); do
    for test in pp tg; do
      if [[ $test == pp ]]; then args=(-p "$NP" -n 0); else args=(-p 0 -n "$NG"); fi
      [[ $test == pp && $NP -eq 0 ]] && continue
      [[ $test == tg && $NG -eq 0 ]] && continue
      ll=$("$LLAMA_BENCH" -m "$model" -t "$THREADS" "${args[@]}" -r 1 -o json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])')
      ours=$("$GEMMA3" bench -m "$model" --backend cpu -t "$THREADS" "${args[@]}" -r 1 -o json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])')
      echo "{\"model\": \"$(basename "$model")\", \"test\": \"$test\", \"round\": $round, \"llama\": $ll, \"gemma3\": $ours}" |
        tee -a "$RAW" >&2
    done
  done
done

python3 - "$RAW" "$NP" "$NG" "$THREADS" <<'EOF'
import json, statistics, sys
raw, np_, ng, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rows = [json.loads(l) for l in open(raw)]
keys = []
for r in rows:
    k = (r["model"], r["test"])
    if k not in keys: keys.append(k)
def ms(v): return f"{statistics.mean(v):8.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:6.2f}"
print(f"| model | test | threads | llama.cpp t/s | gemma3 t/s | gemma3 / llama.cpp |")
print(f"| ----- | ---- | ------: | ------------: | ---------: | -----------------: |")
for m, t in keys:
    ll = [r["llama"] for r in rows if (r["model"], r["test"]) == (m, t)]
    us = [r["gemma3"] for r in rows if (r["model"], r["test"]) == (m, t)]
    name = f"pp{np_}" if t == "pp" else f"tg{ng}"
    print(f"| {m} | {name} | {threads} | {ms(ll)} | {ms(us)} | {statistics.mean(us) / statistics.mean(ll):.2f}x |")
EOF
