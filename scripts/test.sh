#!/usr/bin/env bash
# Sets up a fresh machine, fetches the default model and builds + tests one CMake preset.
#
#   scripts/test.sh [PRESET] [-- EXTRA_CMAKE_CONFIGURE_ARGS...]
#
# PRESET is release (default), cpu-only or debug (see CMakePresets.json). The model tests read
# the model path from GEMMA3_MODEL_270M, which is set to the fetched default model unless it is
# already set; tests whose model is missing are skipped, not failed.
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

cmake --preset "$preset" "$@"
cmake --build --preset "$preset"
ctest --preset "$preset"
