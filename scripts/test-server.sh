#!/usr/bin/env bash
# The HTTP server's end-to-end tests (issue #18): tests/server/test_openai.py drives `gemma3 serve`
# with OpenAI's Python client (the `openai` package from PyPI, in a virtual environment kept in
# the build folder; nothing is installed system-wide) and curl, on the default 270M model and
# the tiny vision model in tests/data.
#
#   scripts/test-server.sh [BUILD_DIR] [-- unittest args]   (default BUILD_DIR: build/release)
#
# The model path comes from GEMMA3_MODEL_270M, else models/fetch.sh --fast (downloads it when
# missing). The in-process server tests (Server.*, OpenAi*) are in the ctest suites.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

build=build/release
if [[ $# -gt 0 && "$1" != -- ]]; then build="$1"; shift; fi
[[ "${1:-}" == -- ]] && shift
bin="$build/gemma3"
[[ -x "$bin" ]] || { echo "test-server.sh: error: no $bin; build it first (scripts/test.sh release)" >&2; exit 1; }
model="${GEMMA3_MODEL_270M:-$(models/fetch.sh --fast)}"
[[ -f "$model" ]] || { echo "test-server.sh: error: model $model missing (models/fetch.sh)" >&2; exit 1; }
command -v curl >/dev/null || { echo "test-server.sh: error: curl not found (scripts/setup.sh installs it)" >&2; exit 1; }

# The client version is pinned so that a new release cannot change what the tests see.
openai_version=3.57.0
venv="$build/server-venv"
if ! "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$openai_version')" 2>/dev/null; then
  echo "test-server.sh: installing openai==$openai_version in $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "openai==$openai_version"
fi
echo "test-server.sh: $("$venv/bin/python" -c 'import openai; print("openai", openai.__version__)'), $bin, $model"
exec "$venv/bin/python" tests/server/test_openai.py --gemma3 "$bin" --model "$model" --vision tests/data/tiny-vision -v "$@"
