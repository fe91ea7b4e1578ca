#!/usr/bin/env bash
# `gemma3 serve` against llama.cpp's `llama-server` under the same load (issue #18): the same
# GGUF, thread count and concurrency, the same client (tools/bench/loadgen.py: C closed-loop
# clients, streaming requests of exactly NTG output tokens each, temperature 0, ignore_eos).
# For each concurrency C the two servers run alternately, one round each in turn (the order
# swapped every round), so background load hits both alike. Prints per-C means of requests/s,
# output tokens/s and time to first token p50/p99, and the ratios: throughput as
# gemma3 / llama.cpp, TTFT as llama.cpp / gemma3; so on every column > 1 means gemma3 is better.
#
# llama-server is built from the same llama-cpp-python sdist as tools/bench/compare-llamacpp.sh
# and compare-llamacpp-batched.sh, in the same git-ignored folder and build dir
# (tools/bench/llamacpp-build.sh); it lives in that llama.cpp's tools/server. Each measurement
# is one server process:
#   llama-server -m MODEL -t T -tb T -np C -c C*CTX --host 127.0.0.1 --port P
#   gemma3 serve -m MODEL -t T -np C --ctx CTX --host 127.0.0.1 --port P
# -c C*CTX with -np C gives every llama-server slot CTX tokens (its KV is per slot, not unified,
# when -np is given). Continuous batching is llama-server's default (-cb); flash attention its
# default 'auto' (on for the CPU backend); -f off|on|auto passes -fa explicitly.
# Then, once /health answers 200:
#   loadgen.py -c C -r ceil(Q/C) (at least 2) -n NTG --endpoint ENDPOINT
# and the server is stopped. Every request carries a unique tag at the start of its prompt, so
# neither server answers a prompt from a prompt cache an earlier request filled.
# With few requests per run, TTFT p99 is close to the slowest request's TTFT.
#
# usage: tools/bench/compare-llamacpp-server.sh [-t THREADS] [-r REPS] [-C 1,8,32] [-n NTG]
#          [-q REQUESTS] [-x CTX] [-e chat|completions] [-f FA] [-P PORT] [-j JOBS]
#          [-g GEMMA3_BIN] [MODEL.gguf]
#   default model: ~/.cache/gemma3/gemma-3-270m-q4_k_m.gguf; default threads 2, REPS 2,
#   NTG 128, REQUESTS (per concurrency level and round) 32, CTX 1024, endpoint chat, PORT 18080
#   (each server start takes the next free port from there), JOBS (build parallelism) 2. Server logs go to third_party_build/server-logs/.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK="$ROOT/third_party_build"
THREADS=2
REPS=2
CLIST=1,8,32
NTG=128
REQUESTS=32
CTX=1024
ENDPOINT=chat
FA=""
PORT=18080
JOBS=2
GEMMA3=""
usage="usage: $0 [-t THREADS] [-r REPS] [-C 1,8,32] [-n NTG] [-q REQUESTS] [-x CTX] [-e chat|completions] [-f off|on|auto] [-P PORT] [-j JOBS] [-g GEMMA3_BIN] [MODEL.gguf]"
while getopts "t:r:C:n:q:x:e:f:P:j:g:" opt; do
  case $opt in
    t) THREADS=$OPTARG ;;
    r) REPS=$OPTARG ;;
    C) CLIST=$OPTARG ;;
    n) NTG=$OPTARG ;;
    q) REQUESTS=$OPTARG ;;
    x) CTX=$OPTARG ;;
    e) ENDPOINT=$OPTARG ;;
    f) FA=$OPTARG ;;
    P) PORT=$OPTARG ;;
    j) JOBS=$OPTARG ;;
    g) GEMMA3=$OPTARG ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -le 1 ]] || { echo "$usage" >&2; exit 2; }
[[ $ENDPOINT == chat || $ENDPOINT == completions ]] || { echo "$usage" >&2; exit 2; }
MODEL=${1:-$HOME/.cache/gemma3/gemma-3-270m-q4_k_m.gguf}
[[ -f "$MODEL" ]] || { echo "$MODEL missing: run models/fetch.sh" >&2; exit 2; }
IFS=, read -r -a CS <<<"$CLIST"
LOADGEN="$ROOT/tools/bench/loadgen.py"

if [[ -z "$GEMMA3" ]]; then
  for b in "$ROOT"/build/release/gemma3 "$ROOT"/build/srv/gemma3 "$ROOT"/build/lg/gemma3 \
    "$ROOT"/build-fast/gemma3 "$ROOT"/build/gemma3; do
    [[ -x "$b" ]] && GEMMA3=$b && break
  done
fi
[[ -x "$GEMMA3" ]] || { echo "gemma3 binary not found; build it or pass -g" >&2; exit 2; }
"$GEMMA3" serve --help >/dev/null 2>&1 ||
  { echo "$GEMMA3 has no working 'serve' command ($GEMMA3 serve --help failed)" >&2; exit 2; }

# ---- llama-server from the llama-cpp-python sdist ---------------------------------------------
source "$ROOT/tools/bench/llamacpp-build.sh"
llamacpp_build "$JOBS" llama-server
LLAMA_SERVER="$LLAMACPP_BIN/llama-server"
LLAMA_VERSION="$LLAMACPP_SDIST, $("$LLAMA_SERVER" --version 2>&1 | grep -m1 '^version' || echo 'version unknown')"

# A port for the next server: the first one from PORT + (starts so far mod 100) that a plain
# bind (no SO_REUSEADDR) takes. Each start takes a new port, as the previous server's closed
# connections sit in TIME_WAIT on its port for a minute, and a server that sets only
# SO_REUSEPORT (Debian's cpp-httplib) cannot bind it then.
STARTS=0
next_port() {
  local base=$((PORT + STARTS % 100))
  STARTS=$((STARTS + 1))
  python3 - "$base" <<'EOF'
import socket, sys
for p in range(int(sys.argv[1]), int(sys.argv[1]) + 200):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    print(p)
    sys.exit(0)
sys.exit("no free port from " + sys.argv[1])
EOF
}

# ---- one server process at a time -------------------------------------------------------------
mkdir -p "$WORK/server-logs"
SERVER_PID=""
LOADGEN_PID=""
stop_server() {
  if [[ -n "$SERVER_PID" ]]; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
# Background children and `wait` (not a foreground command), so that INT/TERM stop the load
# generator and the server at once instead of after the running measurement.
on_signal() {
  [[ -z "$LOADGEN_PID" ]] || kill "$LOADGEN_PID" 2>/dev/null || true
  stop_server
  exit 130
}
trap stop_server EXIT
trap on_signal INT TERM

start_server() {  # ENGINE C LOG: sets SERVER_PORT
  local engine=$1 c=$2 log=$3
  SERVER_PORT=$(next_port)
  if [[ $engine == llama ]]; then
    "$LLAMA_SERVER" -m "$MODEL" -t "$THREADS" -tb "$THREADS" -np "$c" -c $((c * CTX)) \
      ${FA:+-fa "$FA"} --host 127.0.0.1 --port "$SERVER_PORT" >"$log" 2>&1 &
  else
    "$GEMMA3" serve -m "$MODEL" -t "$THREADS" -np "$c" --ctx "$CTX" \
      --host 127.0.0.1 --port "$SERVER_PORT" >"$log" 2>&1 &
  fi
  SERVER_PID=$!
  local i
  for i in $(seq 1 600); do  # up to 120 s (sleep in the background: signals are not held up)
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "$engine server exited while starting (C=$c); its log $log:" >&2
      tail -20 "$log" >&2
      SERVER_PID=""
      return 1
    fi
    if python3 - "$SERVER_PORT" <<'EOF'
import http.client, sys
try:
    c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=2)
    c.request("GET", "/health")
    sys.exit(0 if c.getresponse().status == 200 else 1)
except OSError:
    sys.exit(1)
EOF
    then return 0; fi
    sleep 0.2 & wait $!
  done
  echo "$engine server not ready after 120 s (C=$c); its log $log" >&2
  return 1
}

# one measurement: prints loadgen's JSON summary line (with engine, round, load averages added);
# run in this shell (not a pipeline's subshell), so the EXIT trap sees SERVER_PID
measure() {  # ENGINE C ROUND
  local engine=$1 c=$2 round=$3 per log out rc=0
  per=$(((REQUESTS + c - 1) / c))
  ((per >= 2)) || per=2
  log="$WORK/server-logs/$STAMP-$engine-c$c-r$round.log"
  start_server "$engine" "$c" "$log" || return 1
  local load_before
  load_before=$(cut -d' ' -f1-3 /proc/loadavg)
  python3 "$LOADGEN" --url "http://127.0.0.1:$SERVER_PORT" -c "$c" -r "$per" -n "$NTG" \
    --endpoint "$ENDPOINT" --label "$engine" --json - >"$WORK/.loadgen-$$.json" \
    2> >(sed "s/^/    /" >&2) &
  LOADGEN_PID=$!
  wait "$LOADGEN_PID" || rc=$?
  LOADGEN_PID=""
  out=$(cat "$WORK/.loadgen-$$.json")
  rm -f "$WORK/.loadgen-$$.json"
  stop_server
  if ((rc == 1)); then  # some requests failed: kept in the row (errors, error_samples)
    echo "loadgen against $engine (C=$c): some requests failed; server log $log" >&2
  elif ((rc != 0)) || [[ -z "$out" ]]; then
    echo "loadgen against $engine (C=$c) failed (exit $rc); server log $log" >&2
    return 1
  fi
  LG_OUT=$out python3 - "$engine" "$round" "$load_before" "$(cut -d' ' -f1-3 /proc/loadavg)" \
    "$(basename "$MODEL")" "$THREADS" <<'EOF'
import json, os, sys
engine, rnd, lb, la, model, threads = sys.argv[1:7]
r = json.loads(os.environ["LG_OUT"].strip().splitlines()[-1])
r.update({"engine": engine, "round": int(rnd), "loadavg_before": lb, "loadavg_after": la,
          "model_file": model, "threads": int(threads)})
print(json.dumps(r))
EOF
}

# ---- alternate runs ---------------------------------------------------------------------------
mkdir -p "$WORK"
STAMP=$(date +%Y%m%d-%H%M%S)
RAW="$WORK/compare-server-$STAMP.jsonl"
echo "== gemma3: $GEMMA3; llama.cpp: $LLAMA_VERSION; model $(basename "$MODEL"); threads $THREADS;" \
  "C in {$CLIST}; $NTG output tokens per request, >= $REQUESTS requests per C and round;" \
  "endpoint $ENDPOINT; ctx $CTX per sequence; fa ${FA:-default(auto)}; $REPS rounds; raw -> $RAW" >&2
echo "== load before: $(uptime)" >&2
for round in $(seq 1 "$REPS"); do
  for c in "${CS[@]}"; do
    if ((round % 2)); then order="llama gemma3"; else order="gemma3 llama"; fi
    for engine in $order; do
      echo "-- round $round, C=$c, $engine" >&2
      measure "$engine" "$c" "$round" >>"$RAW"
    done
  done
done
echo "== load after: $(uptime)" >&2

python3 - "$RAW" <<'EOF'
import json, os, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cs = []
for r in rows:
    if r["clients"] not in cs: cs.append(r["clients"])
def col(engine, c, k): return [r[k] for r in rows if r["engine"] == engine and r["clients"] == c]
def m(v): return statistics.mean(v)
r0 = rows[0]
print(f"model {r0['model_file']}, threads {r0['threads']}, endpoint {r0['endpoint']}, "
      f"{r0['max_tokens']} output tokens per request (ignore_eos), "
      f"{len(set(r['round'] for r in rows))} rounds; means over rounds")
print("throughput ratios are gemma3 / llama.cpp; TTFT ratios are llama.cpp / gemma3 (> 1: gemma3 faster)")
print("| C | requests | llama req/s | gemma3 req/s | req/s ratio | llama tok/s | gemma3 tok/s | tok/s ratio "
      "| llama TTFT p50 ms | gemma3 TTFT p50 ms | TTFT p50 ratio | llama TTFT p99 ms | gemma3 TTFT p99 ms | TTFT p99 ratio |")
print("| -: | -: | -: | -: | -: | -: | -: | -: | -: | -: | -: | -: | -: | -: |")
for c in cs:
    lr, gr = m(col("llama", c, "req_per_s")), m(col("gemma3", c, "req_per_s"))
    lt, gt = m(col("llama", c, "out_tok_per_s")), m(col("gemma3", c, "out_tok_per_s"))
    l50, g50 = m(col("llama", c, "ttft_p50_ms")), m(col("gemma3", c, "ttft_p50_ms"))
    l99, g99 = m(col("llama", c, "ttft_p99_ms")), m(col("gemma3", c, "ttft_p99_ms"))
    n = col("llama", c, "requests")[0]
    print(f"| {c} | {n} | {lr:.3f} | {gr:.3f} | {gr / lr:.2f}x | {lt:.1f} | {gt:.1f} | {gt / lt:.2f}x "
          f"| {l50:.0f} | {g50:.0f} | {l50 / g50:.2f}x | {l99:.0f} | {g99:.0f} | {l99 / g99:.2f}x |")
spread = {}
for r in rows:
    spread.setdefault((r["engine"], r["clients"]), []).append(r["out_tok_per_s"])
print("output tok/s per round: " + "; ".join(
    f"{e} C={c}: " + ", ".join(f"{v:.1f}" for v in vs) for (e, c), vs in spread.items()))
loads = [float(r[k].split()[0]) for r in rows for k in ("loadavg_before", "loadavg_after")]
errors = sum(r["errors"] for r in rows)
print(f"1-minute load average around the measurements: {min(loads):.2f} to {max(loads):.2f} "
      f"({os.cpu_count()} CPUs); failed requests: {errors}")
EOF
