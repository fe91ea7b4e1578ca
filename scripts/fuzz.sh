#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang with -fsanitize=fuzzer,address,undefined) in a
# separate CMake build and runs each one for a bounded time on a scratch copy of its committed
# seed corpus (fuzz/corpus/<target>, which also holds every crash input found so far).
#
#   scripts/fuzz.sh [--time SECONDS] [--build-dir DIR] [--merge] [--list] [TARGET...]
#
#   --time S       seconds per target (default 60; FUZZ_TIME in the environment also sets it)
#   --build-dir D  CMake build directory (default build/fuzz)
#   --merge        after a clean run, merge the inputs that added coverage into fuzz/corpus/<target>
#                  (libFuzzer -merge=1 keeps only inputs that add coverage); review before committing
#   --list         print the target names and exit
#   TARGET         run only these (default: all of fuzz_gguf fuzz_safetensors fuzz_hf_config
#                  fuzz_tokenizer fuzz_chat_template fuzz_image fuzz_openai_request)
#
# Fails (exit 1) on any finding: a crash, sanitizer report, leak, timeout (> 25 s for one
# input) or out-of-memory (> 2 GB RSS). The crashing input is kept under the printed artifacts
# folder; reproduce with `build/fuzz/fuzz/<target> <input>`. Prints, per target, the executions
# run and the corpus size before and after. A longer local run: `scripts/fuzz.sh --time 3600`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

all_targets=(fuzz_gguf fuzz_safetensors fuzz_hf_config fuzz_tokenizer fuzz_chat_template fuzz_image
             fuzz_openai_request)
seconds="${FUZZ_TIME:-60}"
build=build/fuzz
merge=0
targets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --time) seconds="${2:?--time needs a value}"; shift 2 ;;
    --build-dir) build="${2:?--build-dir needs a value}"; shift 2 ;;
    --merge) merge=1; shift ;;
    --list) printf '%s\n' "${all_targets[@]}"; exit 0 ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fuzz.sh: error: unknown option '$1' (try --help)" >&2; exit 2 ;;
    *)
      [[ " ${all_targets[*]} " == *" $1 "* ]] || { echo "fuzz.sh: error: unknown target '$1' (--list)" >&2; exit 2; }
      targets+=("$1"); shift ;;
  esac
done
((${#targets[@]})) || targets=("${all_targets[@]}")
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || { echo "fuzz.sh: error: --time must be a positive integer" >&2; exit 2; }

cxx="${FUZZ_CXX:-clang++}"
if ! command -v "$cxx" >/dev/null 2>&1; then
  echo "fuzz.sh: error: $cxx not found; scripts/setup.sh installs clang and libclang-rt-14-dev (libFuzzer)" >&2
  exit 1
fi

echo "fuzz.sh: building ${targets[*]} in $build with $("$cxx" --version | head -n 1)"
cmake -S . -B "$build" -G Ninja -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DGEMMA3_CUDA=OFF -DGEMMA3_BUILD_TESTS=OFF -DGEMMA3_FUZZ=ON >/dev/null
cmake --build "$build" --target "${targets[@]}"

work="$(mktemp -d "${TMPDIR:-/tmp}/gemma3-fuzz.XXXXXX")"
echo "fuzz.sh: ${seconds}s per target; logs, scratch corpora and artifacts in $work"
export ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=1:abort_on_error=0:symbolize=1"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-}:halt_on_error=1:print_stacktrace=1"

failed=()
rows=()
for t in "${targets[@]}"; do
  seeds="fuzz/corpus/${t#fuzz_}"
  corpus="$work/$t.corpus"
  mkdir -p "$corpus" "$work/$t.artifacts"
  cp "$seeds"/* "$corpus"/
  n0=$(find "$corpus" -type f | wc -l)
  dict=()
  [[ -f "fuzz/dict/${t#fuzz_}.dict" ]] && dict=(-dict="fuzz/dict/${t#fuzz_}.dict")
  log="$work/$t.log"
  echo
  echo "--- $t: $n0 seed inputs, ${seconds}s ---"
  rc=0
  "$build/fuzz/$t" "$corpus" "${dict[@]}" -max_total_time="$seconds" -timeout=25 -rss_limit_mb=2048 \
    -max_len=16384 -print_final_stats=1 -artifact_prefix="$work/$t.artifacts/" >"$log" 2>&1 || rc=$?
  execs=$(awk '/^stat::number_of_executed_units:/ {v = $2} END {print v}' "$log")
  rate=$(awk '/^stat::average_exec_per_sec:/ {v = $2} END {print v}' "$log")
  n1=$(find "$corpus" -type f | wc -l)
  kb=$(( $(find "$corpus" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}') / 1024 ))
  grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)' "$log" | sed 's/^/  /' || true
  if ((rc != 0)); then
    failed+=("$t")
    result="FINDING (exit $rc)"
    echo "  $t: FINDING: libFuzzer exited with $rc; the last lines of $log:"
    tail -n 60 "$log" | sed 's/^/  | /'
    for a in "$work/$t.artifacts"/*; do
      [[ -e "$a" ]] && echo "  input saved: $a  (reproduce: $build/fuzz/$t $a)"
    done
  else
    result=ok
    if ((merge)); then
      "$build/fuzz/$t" -merge=1 "$seeds" "$corpus" "${dict[@]}" -max_len=16384 >"$work/$t.merge.log" 2>&1
      echo "  merged into $seeds: $(find "$seeds" -type f | wc -l) files now"
    fi
  fi
  rows+=("$(printf '%-20s %-18s %12s %8s %7s %7s %8s' "$t" "$result" "${execs:-?}" "${rate:-?}" "$n0" "$n1" "${kb}K")")
done

echo
echo "=== fuzz summary (${seconds}s per target) ==="
printf '%-20s %-18s %12s %8s %7s %7s %8s\n' target result execs exec/s seeds corpus size
printf '%s\n' "${rows[@]}"
if ((${#failed[@]})); then
  echo "fuzz.sh: FAILED: findings in ${failed[*]} (inputs under $work/*.artifacts)"
  exit 1
fi
echo "fuzz.sh: OK: no findings"
