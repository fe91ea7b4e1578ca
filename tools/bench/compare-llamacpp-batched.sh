#!/usr/bin/env bash
# Batched decoding of gemma3 against llama.cpp's llama-batched-bench (issue #17): aggregate
# prefill and decode throughput with N sequences in parallel, on the same GGUF file, same
# machine, same thread count, the two engines run alternately (one repetition each, in turn)
# so background load hits both alike. Prints per-N mean t/s of both and the ratios
# gemma3 / llama.cpp.
#
# llama.cpp is built from the same llama-cpp-python sdist as tools/bench/compare-llamacpp.sh,
# in the same git-ignored folder and build dir (tools/bench/llamacpp-build.sh);
# llama-batched-bench lives in that llama.cpp's tools/batched-bench.
#
# Each llama.cpp measurement is one process:
#   llama-batched-bench -m MODEL -t T -tb T -c N*(NPP+NTG) -npp NPP -ntg NTG -npl N [-fa FA]
# S_PP = N*NPP / prefill time, S_TG = N*NTG / decode time (aggregate over the N sequences).
# Flash attention: llama.cpp's default is 'auto', which turns it on for the CPU backend (the
# same default llama-bench gets in compare-llamacpp.sh); -f off|on|auto passes -fa explicitly.
#
# usage: tools/bench/compare-llamacpp-batched.sh [-t THREADS] [-r REPS] [-N 1,8,32] [-p NPP]
#          [-n NTG] [-f FA] [-j JOBS] [-g GEMMA3_BIN] [MODEL.gguf]
#   default model: ~/.cache/gemma3/gemma-3-270m-q4_k_m.gguf; default threads 2, REPS 3,
#   NPP 128, NTG 128, JOBS (build parallelism) 2.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK="$ROOT/third_party_build"
THREADS=2
REPS=3
NLIST=1,8,32
NPP=128
NTG=128
FA=""
JOBS=2
GEMMA3=""
usage="usage: $0 [-t THREADS] [-r REPS] [-N 1,8,32] [-p NPP] [-n NTG] [-f off|on|auto] [-j JOBS] [-g GEMMA3_BIN] [MODEL.gguf]"
while getopts "t:r:N:p:n:f:j:g:" opt; do
  case $opt in
    t) THREADS=$OPTARG ;;
    r) REPS=$OPTARG ;;
    N) NLIST=$OPTARG ;;
    p) NPP=$OPTARG ;;
    n) NTG=$OPTARG ;;
    f) FA=$OPTARG ;;
    j) JOBS=$OPTARG ;;
    g) GEMMA3=$OPTARG ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -le 1 ]] || { echo "$usage" >&2; exit 2; }
MODEL=${1:-$HOME/.cache/gemma3/gemma-3-270m-q4_k_m.gguf}
[[ -f "$MODEL" ]] || { echo "$MODEL missing: run models/fetch.sh" >&2; exit 2; }
IFS=, read -r -a NS <<<"$NLIST"

if [[ -z "$GEMMA3" ]]; then
  for b in "$ROOT"/build-fast/gemma3 "$ROOT"/build/gemma3; do [[ -x "$b" ]] && GEMMA3=$b && break; done
fi
[[ -x "$GEMMA3" ]] || { echo "gemma3 binary not found; build it or pass -g" >&2; exit 2; }

# ---- llama-batched-bench (and llama-bench) from the llama-cpp-python sdist ---------------------
source "$ROOT/tools/bench/llamacpp-build.sh"
llamacpp_build "$JOBS" llama-bench llama-batched-bench
LLAMA_BATCHED="$LLAMACPP_BIN/llama-batched-bench"
LLAMA_VERSION="$LLAMACPP_SDIST, $("$LLAMA_BATCHED" --version 2>&1 | grep -m1 '^version' || echo 'version unknown')"

# ---- one measurement of each engine: prints "PP_TPS TG_TPS" -----------------------------------
llama_batched() {  # N
  local n=$1 out
  out=$("$LLAMA_BATCHED" -m "$MODEL" -t "$THREADS" -tb "$THREADS" -c $((n * (NPP + NTG))) \
    -npp "$NPP" -ntg "$NTG" -npl "$n" ${FA:+-fa "$FA"} --output-format jsonl 2>/dev/null) ||
    { echo "llama-batched-bench failed for N=$n" >&2; return 1; }
  grep '^{' <<<"$out" | tail -1 | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["speed_pp"], r["speed_tg"])'
}

# ===== gemma3_parallel: the gemma3 side ========================================================
# Runs `gemma3 bench --parallel N` once and prints "PP_TPS TG_TPS" (aggregate over the N
# sequences). Expects a line of the form
#   parallel N: pp 123.4 t/s, tg 56.7 t/s
gemma3_parallel() {  # N
  local n=$1 out
  out=$("$GEMMA3" bench --parallel "$n" -p "$NPP" -n "$NTG" -r 1 -t "$THREADS" -m "$MODEL" --backend cpu 2>&1) ||
    { echo "gemma3 bench --parallel $n failed:" >&2; echo "$out" >&2; return 1; }
  python3 -c '
import re, sys
n, text = sys.argv[1], sys.stdin.read()
m = re.search(r"parallel\s+" + n + r"\s*:\s*pp\s+([0-9.eE+-]+)\s*t/s\s*,\s*tg\s+([0-9.eE+-]+)\s*t/s", text)
if not m:
    sys.exit("no \"parallel " + n + ": pp T t/s, tg T t/s\" line in gemma3 output:\n" + text)
print(m.group(1), m.group(2))
' "$n" <<<"$out"
}
# ===============================================================================================

# ---- alternate runs ---------------------------------------------------------------------------
mkdir -p "$WORK"
RAW="$WORK/compare-batched-$(date +%Y%m%d-%H%M%S).jsonl"
echo "== gemma3: $GEMMA3; llama.cpp: $LLAMA_VERSION; model $(basename "$MODEL"); threads $THREADS;" \
  "npp $NPP, ntg $NTG, N in {$NLIST}; fa ${FA:-default(auto)}; $REPS rounds; raw -> $RAW" >&2
# one discarded warm-up of each (page cache, CPU clocks): the first process is often far slower
llama_batched 1 >/dev/null
gemma3_parallel 1 >/dev/null
for round in $(seq 1 "$REPS"); do
  for n in "${NS[@]}"; do
    ll=$(llama_batched "$n")
    us=$(gemma3_parallel "$n")
    read -r ll_pp ll_tg <<<"$ll"
    read -r us_pp us_tg <<<"$us"
    echo "{\"model\": \"$(basename "$MODEL")\", \"n\": $n, \"round\": $round, \"llama_pp\": $ll_pp, \"llama_tg\": $ll_tg, \"gemma3_pp\": $us_pp, \"gemma3_tg\": $us_tg}" |
      tee -a "$RAW" >&2
  done
done

python3 - "$RAW" "$NPP" "$NTG" "$THREADS" <<'EOF'
import json, statistics, sys
raw, npp, ntg, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rows = [json.loads(l) for l in open(raw)]
ns = []
for r in rows:
    if r["n"] not in ns: ns.append(r["n"])
def col(n, k): return [r[k] for r in rows if r["n"] == n]
def ms(v): return f"{statistics.mean(v):8.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:6.2f}"
print(f"model {rows[0]['model']}, threads {threads}, prompt {npp} + {ntg} generated tokens per sequence; aggregate t/s")
print("| N | llama.cpp S_PP | llama.cpp S_TG | gemma3 pp | gemma3 tg | pp gemma3 / llama.cpp | tg gemma3 / llama.cpp |")
print("| -: | ------------: | -------------: | --------: | --------: | --------------------: | --------------------: |")
for n in ns:
    lp, lt, up, ut = (col(n, k) for k in ("llama_pp", "llama_tg", "gemma3_pp", "gemma3_tg"))
    print(f"| {n} | {ms(lp)} | {ms(lt)} | {ms(up)} | {ms(ut)} | "
          f"{statistics.mean(up) / statistics.mean(lp):.2f}x | {statistics.mean(ut) / statistics.mean(lt):.2f}x |")
EOF
