#!/usr/bin/env bash
# From a fresh Debian machine to generated text: installs the build dependencies, fetches the
# default model (Gemma 3 270M, Q4_K_M), builds the release preset and runs one prompt.
#
#   scripts/quickstart.sh ["PROMPT"]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

prompt="${1:-The capital of France is}"

scripts/setup.sh
model="$(models/fetch.sh)"
cmake --preset release >/dev/null
cmake --build --preset release --target gemma3_cli  # the CLI only; the tests are not needed here
echo "quickstart.sh: build/release/gemma3 run -m $model -p \"$prompt\" -n 32" >&2
exec build/release/gemma3 run -m "$model" -p "$prompt" -n 32
