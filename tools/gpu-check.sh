#!/usr/bin/env bash
# The checks a session with a lent GPU runs, in one go, under 8 minutes.
#
# The GPU machine has the same CUDA 13 toolkit, a newer glibc, 16 cores and no network, and it
# gets a copy of the working tree plus the git-ignored paths a session carries. So the binaries
# are built here and carried in gpu-carry/:
#
#   1. build:     cmake -S . -B build-cuda -G Ninja -DGEMMA3_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
#                   -DCMAKE_CUDA20_STANDARD_COMPILE_OPTION=-std=c++20 \
#                   -DCMAKE_CUDA20_EXTENSION_COMPILE_OPTION=-std=c++20   (CMake 3.25 lacks nvcc's C++20 flag)
#                 cmake --build build-cuda -j2
#   2. assemble:  tools/gpu-check.sh --assemble [build-cuda]
#                 -> gpu-carry/bin/{gemma3,gemma3_tests} and gpu-carry/lib/ with the shared libs
#                    ldd shows that are not part of the base system (sentencepiece, protobuf-lite,
#                    fmt, ...); CUDA's own libs (cudart, cublas, cublasLt) come from the GPU
#                    machine's /usr/local/cuda/lib64. Keep gpu-carry under 64 MiB.
#   3. run there: tools/gpu-check.sh            (the device tool, with carry: ["gpu-carry"])
#
# Output: nvidia-smi -L, the CUDA test results, the decode attention timings (split-KV, 4K to
# 128K keys), and one table of model benchmarks when
# `gemma3 make-model` and `gemma3 bench` exist in the carried binary.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
carry="$root/gpu-carry"

if [[ "${1:-}" == "--assemble" ]]; then
  build="${2:-$root/build-cuda}"
  rm -rf "$carry" && mkdir -p "$carry/bin" "$carry/lib"
  for b in gemma3 gemma3_tests; do
    [[ -x "$build/$b" ]] || { echo "missing $build/$b: build first" >&2; exit 1; }
    cp "$build/$b" "$carry/bin/"
    strip --strip-debug "$carry/bin/$b" 2>/dev/null || true
  done
  # Shared libs outside the base system and outside CUDA: copy them (real file, soname name).
  ldd "$build/gemma3_tests" "$build/gemma3" | awk '/=> \//{print $1, $3}' | sort -u |
    grep -E 'sentencepiece|protobuf|libfmt|gtest|gmock|absl' | while read -r soname path; do
      cp -L "$path" "$carry/lib/$soname"
    done
  du -sh "$carry" && ls -l "$carry/bin" "$carry/lib"
  exit 0
fi

start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
export LD_LIBRARY_PATH="$carry/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export GEMMA3_SOURCE_DIR="$root"  # test data: tests/data of this copy of the tree
bin="$carry/bin"

echo "== GPU"
nvidia-smi -L || echo "nvidia-smi failed"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true

echo "== libraries"
missing=$(ldd "$bin/gemma3_tests" 2>&1 | grep 'not found' || true)
if [[ -n "$missing" ]]; then echo "unresolved libraries:"; echo "$missing"; fi

echo "== CUDA tests ($(elapsed) s)"
# Includes attention over 100K-128K keys checked against the CPU reference (a few seconds of
# host time each), device sampling, fp8 weight upload, the decode attention timing, and the
# vision ops (tests/test_cuda_vision_ops.cpp).
test_log=$(mktemp)
timeout 300 "$bin/gemma3_tests" --gtest_filter='BlockDecode*:AttentionPlan*:CudaOps*:CudaVisionOps*' --gtest_color=no >"$test_log" 2>&1
tests_rc=$?
grep -v '^timing:' "$test_log" | tail -n 60
echo "tests exit code: $tests_rc"

# Random-weight models, if this build has make-model and bench (their options may change:
# failures are printed, not fatal). bench prints a markdown table; its rows are kept.
rows=()
if "$bin/gemma3" make-model --help >/dev/null 2>&1 && "$bin/gemma3" bench --help >/dev/null 2>&1; then
  echo "== benchmarks ($(elapsed) s)"
  tmp=$(mktemp -d)
  # size type backend [extra bench flags]; the 4B also gets the vision tower (-i: one image's
  # encode time) and a depth run (tg at 32K context: split-KV decode).
  for spec in "270m bf16 cuda" "270m bf16 cpu" "270m q4_0 cuda" "1b q4_k cuda" "4b q4_0 cuda -i -d 0,32768"; do
    read -r size type be extra <<<"$spec"
    # A spec may take 200 s (make-model + bench): start none after 300 s, so that the whole
    # script stays under the device tool's 600 s per command.
    if (( $(elapsed) > 300 )); then rows+=("$size $type $be: skipped (time budget)"); continue; fi
    model="$tmp/$size-$type.gguf"
    vision=()
    if [[ "$extra" == *-i* ]]; then vision=(--vision); fi
    if [[ ! -f "$model" ]] &&
      ! timeout 100 "$bin/gemma3" make-model --size "$size" --type "$type" "${vision[@]}" -o "$model" -q >"$tmp/log" 2>&1; then
      rows+=("$size $type: make-model failed: $(tail -n 1 "$tmp/log")")
      rm -f "$model"
      continue
    fi
    mmproj=()
    if [[ ${#vision[@]} -gt 0 ]]; then mmproj=(--mmproj "$tmp/$size-$type.mmproj.gguf"); fi
    # shellcheck disable=SC2086  # extra holds several flags
    if timeout 150 "$bin/gemma3" bench -m "$model" "${mmproj[@]}" --backend "$be" -p 512 -n 64 -r 2 $extra >"$tmp/log" 2>&1; then
      while IFS= read -r line; do rows+=("$size $type $be $line"); done < <(grep '^|' "$tmp/log" | grep -v -e '---' -e 'model *|')
    else
      rows+=("$size $type $be: bench failed: $(grep -v '^\s*$' "$tmp/log" | tail -n 1)")
    fi
  done
  rm -rf "$tmp"
else
  echo "== benchmarks skipped: this gemma3 has no make-model/bench command"
fi

echo "== summary ($(elapsed) s)"
echo "CUDA tests: $([[ $tests_rc == 0 ]] && echo passed || echo "FAILED (exit $tests_rc)")"
# A skipped GPU suite exits 0 too: say so, with the reason (e.g. a driver older than CUDA 13's
# runtime gives cudaErrorInsufficientDriver, and nothing ran on the GPU at all).
skipped=$(grep -c '^\[  SKIPPED \] Cuda.* ms)$' "$test_log" || true)
if (( skipped > 0 )); then
  echo "WARNING: $skipped CUDA tests SKIPPED: $(grep -m1 -o 'no CUDA backend here.*\|no tiny-vision fixture.*' "$test_log")"
fi
grep '^timing:' "$test_log" || true
rm -f "$test_log"
for r in "${rows[@]}"; do echo "$r"; done
exit "$tests_rc"
