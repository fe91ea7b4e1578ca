# Sourced by tools/bench/compare-llamacpp*.sh: llama.cpp's benchmark tools built from the source
# inside the llama-cpp-python sdist on PyPI, in the git-ignored folder $WORK (third_party_build/;
# its code is never committed):
#   pip download --no-deps --no-binary llama-cpp-python llama-cpp-python
# (the sdist, never a wheel; naming the package rather than :all: lets pip fetch the sdist's
# metadata build tools as wheels instead of compiling cmake and ninja from source first).
#
# llamacpp_build JOBS TARGET...: builds the targets (e.g. llama-bench llama-batched-bench
# llama-server) into $WORK/llama.cpp-build/bin unless they are all there. The build records the
# llama.cpp commit from the sdist's CHANGELOG (otherwise llama.cpp's build-info would report this
# repository's HEAD, as the sources sit inside our work tree). llama-server is built without its
# web UI (no npm run, no download of prebuilt assets) and without HTTPS (no OpenSSL). Sets
# LLAMACPP_BIN and LLAMACPP_SDIST (the sdist's file name).
llamacpp_build() {
  local jobs=$1 t missing=0
  shift
  LLAMACPP_BIN="$WORK/llama.cpp-build/bin"
  for t in "$@"; do [[ -x "$LLAMACPP_BIN/$t" ]] || missing=1; done
  if ((missing)); then
    mkdir -p "$WORK/sdist"
    if ! ls "$WORK"/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
      echo "== downloading the llama-cpp-python sdist" >&2
      pip download --no-deps --no-binary llama-cpp-python llama-cpp-python -d "$WORK/sdist" >&2
    fi
    local sdist src commit
    sdist=$(ls "$WORK"/sdist/llama_cpp_python-*.tar.gz | sort -V | tail -1)
    if [[ ! -d "$WORK/src" ]]; then
      mkdir -p "$WORK/src"
      tar -xzf "$sdist" -C "$WORK/src"
    fi
    src=$(ls -d "$WORK"/src/llama_cpp_python-*/vendor/llama.cpp | head -1)
    # the first "llama.cpp@<hash>" in the CHANGELOG is the one the sdist vendors
    commit=$(grep -m1 -o 'llama.cpp@[0-9a-f]*' "$src/../../CHANGELOG.md" 2>/dev/null | cut -d@ -f2 || true)
    echo "== building $* from $src (llama.cpp ${commit:-unknown})" >&2
    cmake -S "$src" -B "$WORK/llama.cpp-build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
      -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
      -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_TOOLS=ON ${commit:+-DLLAMA_BUILD_COMMIT=$commit} -DBUILD_SHARED_LIBS=OFF >&2
    cmake --build "$WORK/llama.cpp-build" --target "$@" -j "$jobs" >&2
  fi
  LLAMACPP_SDIST=$(ls "$WORK"/sdist/llama_cpp_python-*.tar.gz 2>/dev/null | sort -V | tail -1 | xargs -r basename)
}
