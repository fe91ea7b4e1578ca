#!/usr/bin/env bash
# Sets up a fresh machine, fetches the default model and builds + tests one CMake preset.
#
#   scripts/test.sh [PRESET] [-- EXTRA_CMAKE_CONFIGURE_ARGS...]
#
# PRESET is release (default), cpu-only, debug or cuda-emu (see CMakePresets.json). The model
# tests read the model path from GEMMA3_MODEL_270M, which is set to the fetched default model
# unless it is already set; tests whose model is missing are skipped, not failed.
#
# cuda-emu runs the CUDA suites on the CPU emulator (tools/cuda-emu, docs/cuda.md), once per
# scheduling policy in GEMMA3_CUDA_EMU_POLICIES (default "low-first high-first"), with
# GEMMA3_CUDA_EMU_SMALL=1 (the largest cases shrink) unless it is already set. It shares the
# debug build (build/debug: ASan + UBSan, the emulated CUDA backend compiled in) and builds only
# gemma3_cuda_tests there, so after `scripts/test.sh debug` it compiles nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

preset=release
if [[ $# -gt 0 && "$1" != -- ]]; then preset="$1"; shift; fi
if [[ $# -gt 0 ]]; then
  [[ "$1" == -- ]] || { echo "test.sh: error: usage: scripts/test.sh [PRESET] [-- CMAKE_ARGS...]" >&2; exit 2; }
  shift
fi

scripts/setup.sh
model="$(models/fetch.sh)"
export GEMMA3_MODEL_270M="${GEMMA3_MODEL_270M:-$model}"
echo "test.sh: GEMMA3_MODEL_270M=$GEMMA3_MODEL_270M"

configure_preset="$preset"
[[ "$preset" == cuda-emu ]] && configure_preset=debug
cmake --preset "$configure_preset" "$@"
cmake --build --preset "$preset"
if [[ "$preset" != cuda-emu ]]; then
  ctest --preset "$preset"
  exit 0
fi
export GEMMA3_CUDA_EMU_SMALL="${GEMMA3_CUDA_EMU_SMALL:-1}"
rc=0
for policy in ${GEMMA3_CUDA_EMU_POLICIES:-low-first high-first}; do
  echo "test.sh: GEMMA3_CUDA_EMU_POLICY=$policy GEMMA3_CUDA_EMU_SMALL=$GEMMA3_CUDA_EMU_SMALL"
  GEMMA3_CUDA_EMU_POLICY="$policy" ctest --preset "$preset" || rc=1
done
exit "$rc"
