#!/usr/bin/env bash
# Shows that the CUDA emulator stage (scripts/test.sh cuda-emu) fails when a kernel is wrong.
# Plants one bug at a time in kernels/kv_attention.cu of a scratch copy of the working tree,
# rebuilds the emulated test binary there and runs Cuda/BackendOps.Attention/cuda, which must
# fail for the expected reason:
#
#   barrier        decode_attention_kernel's barrier between the softmax step and the value
#                  step deleted: wrong outputs under low-first and high-first (the first or last
#                  warp accumulates V with scores not yet turned into weights, or with other
#                  rows' stale rescale factors); round-robin is informational
#   smem-dynamic   the decode kernel's dynamic shared queries (rows x head_dim floats) written
#                  one float past their end (i <= nr * hd): ASan heap-buffer-overflow there
#   smem-static    the decode kernel's static per-row key ranges (kAttentionDecodeRows) written
#                  one past their end (threadIdx.x <= kDecRows): UBSan index out of bounds or
#                  ASan global-buffer-overflow at that line
#   shuffle        the decode kernel's score reduction (group_sum) done by lanes 0-15 only:
#                  the emulator reports a divergent warp, or lanes exchange the wrong values
#                  and the outputs differ
#
#   tools/cuda-emu/mutation-check.sh [SCRATCH_DIR]
#
# SCRATCH_DIR (default: a new directory under ${TMPDIR:-/tmp}, removed afterwards unless
# KEEP=1) receives the copy (src/) and its debug-preset build (build/); an existing one is reused,
# so a second run only rebuilds. One full sanitized build of the library and gemma3_cuda_tests, then
# one kernel rebuild and test run per mutation; JOBS (default 2) build jobs. The baseline (no
# mutation) must pass. Prints one line per case and exits 1 if any bug went unnoticed. Too slow
# for every CI run (a full extra build); docs/cuda.md records its results.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
scratch="${1:-}"
if [[ -z "$scratch" ]]; then
  scratch="$(mktemp -d "${TMPDIR:-/tmp}/gemma3-mutation.XXXXXX")"
  [[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$scratch"' EXIT
fi
src="$scratch/src" build="$scratch/build" logs="$scratch/logs"
mkdir -p "$src" "$logs"

echo "mutation-check: copying the working tree to $src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard |
  tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$src" -xf -
kernel="$src/kernels/kv_attention.cu"
cp "$kernel" "$scratch/kv_attention.cu.orig"

build_tests() {
  if [[ ! -f "$build/build.ninja" ]]; then
    (cd "$src" && cmake --preset debug -B "$build" >"$logs/configure.log" 2>&1) ||
      { echo "mutation-check: error: configure failed, see $logs/configure.log" >&2; exit 2; }
  fi
  cmake --build "$build" --target gemma3_cuda_tests -j "${JOBS:-2}" >"$logs/build-$1.log" 2>&1 ||
    { echo "mutation-check: error: build failed ($1), see $logs/build-$1.log" >&2; exit 2; }
}

# mutate NAME SED_SCRIPT: applies the sed script to a fresh copy of kv_attention.cu; it must
# change exactly one line (the kernel moved on otherwise: update the script here).
mutate() {
  cp "$scratch/kv_attention.cu.orig" "$kernel"
  [[ -z "$2" ]] && return 0
  sed -i "$2" "$kernel"
  local changed
  changed=$(diff "$scratch/kv_attention.cu.orig" "$kernel" | grep -c '^[<>]')
  if [[ "$changed" -lt 1 || "$changed" -gt 2 ]]; then
    echo "mutation-check: error: mutation $1 changed $changed diff lines of kernels/kv_attention.cu" \
         "(expected one line): update tools/cuda-emu/mutation-check.sh" >&2
    exit 2
  fi
}

failures=0
summary=()
# run NAME POLICY WANT PATTERN: runs the test; WANT is pass or fail, PATTERN (grep -E) must
# appear in the output of a failing run.
run() {
  local name="$1" policy="$2" want="$3" pattern="$4" log="$logs/$1-$2.log" rc t0=$SECONDS
  # In a subshell, so that bash's own "Aborted" line goes to the log too.
  (GEMMA3_CUDA_EMU_SMALL=1 GEMMA3_CUDA_EMU_POLICY="$policy" \
    ASAN_OPTIONS="detect_stack_use_after_return=0" UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
    timeout 1200 "$build/gemma3_cuda_tests" --gtest_filter=Cuda/BackendOps.Attention/cuda) >"$log" 2>&1
  rc=$?
  local got=pass evidence=""
  if ((rc != 0)); then
    got=fail
    evidence="$(grep -m 1 -E "$pattern" "$log" | sed -E 's/ on address 0x[0-9a-f]+.*//' | cut -c 1-150)"
    # ASan: where (the first frame's file:line); a gtest failure: which case.
    local at
    at="$(grep -m 1 -E '^ +#0 ' "$log" | grep -oE '[A-Za-z0-9_]+\.cu:[0-9]+' | head -n 1)"
    [[ -z "$at" ]] && at="$(grep -m 1 -E ' i [0-9]+$' "$log" | cut -c 1-60)"
    [[ -n "$evidence" && -n "$at" ]] && evidence="$evidence ($at)"
  fi
  local verdict
  if [[ "$want" == pass && "$got" == pass ]]; then
    verdict="ok (passes)"
  elif [[ "$want" == fail && "$got" == fail && -n "$evidence" ]]; then
    verdict="caught: $evidence"
  elif [[ "$want" == any ]]; then
    verdict="$got (informational)${evidence:+: $evidence}"
  else
    verdict="UNEXPECTED: $got (exit $rc), want $want; see $log"
    failures=$((failures + 1))
  fi
  summary+=("$(printf '%-13s %-12s %4ds  %s' "$name" "$policy" $((SECONDS - t0)) "$verdict")")
  echo "${summary[-1]}"
}

mutate baseline ""
build_tests baseline
run baseline low-first pass ""

mutate barrier '/__syncthreads();  \/\/ p_s holds the weights, alpha_s the rescale factors/d'
build_tests barrier
run barrier low-first fail 'The difference between'
run barrier high-first fail 'The difference between'
run barrier round-robin any 'The difference between'

mutate smem-dynamic 's/for (int i = threadIdx.x; i < nr \* hd; i += kDecThreads) {  \/\/ load the queries/for (int i = threadIdx.x; i <= nr * hd; i += kDecThreads) {  \/\/ load the queries/'
build_tests smem-dynamic
run smem-dynamic low-first fail 'AddressSanitizer: heap-buffer-overflow'

mutate smem-static 's/if (threadIdx.x < kDecRows) {  \/\/ row ranges/if (threadIdx.x <= kDecRows) {  \/\/ row ranges/'
build_tests smem-static
run smem-static low-first fail 'runtime error: index 8 out of bounds|AddressSanitizer: global-buffer-overflow'

mutate shuffle 's/^        dot\[r\] = group_sum(dot\[r\], lk);$/        if (lane < 16) dot[r] = group_sum(dot[r], lk);/'
build_tests shuffle
run shuffle low-first fail 'cuda-emu: error: divergent warp|The difference between'

mutate restore ""  # leave the scratch copy as the working tree had it
echo
echo "=== mutation-check: kernels/kv_attention.cu, Cuda/BackendOps.Attention/cuda (logs: $logs) ==="
printf '%s\n' "${summary[@]}"
if ((failures)); then
  echo "mutation-check: FAILED: $failures case(s) did not behave as expected"
  exit 1
fi
echo "mutation-check: OK: every planted bug fails the emulated suite"
