#!/usr/bin/env bash
# The CUDA backend as a module (docs/cuda.md, "The CUDA module"), in a build with the CUDA
# toolkit: the CLI links no CUDA library, the module exports its entry point only, a CPU run
# loads no CUDA library, and `--backend cuda` finds the module beside the program (or says
# clearly why it cannot). Runs with or without a GPU.
# usage: tests/cuda_module_check.sh BUILD_DIR
set -u
build=$1
root=$(cd "$(dirname "$0")/.." && pwd)
cli="$build/gemma3"
module="$build/libgemma3-cuda.so"
tiny="$root/tests/data/tiny"
fails=0
fail() {
  echo "FAIL: $*"
  fails=$((fails + 1))
}

[[ -x "$cli" ]] || { echo "FAIL: no $cli"; exit 1; }
[[ -f "$module" ]] || { echo "FAIL: no $module"; exit 1; }

# 1. Link time: the CLI needs no CUDA library; the module does.
if ldd "$cli" | grep -E 'libcudart|libcublas|libcuda\.'; then fail "the CLI links CUDA libraries"; fi
ldd "$module" | grep -q libcudart || fail "the module does not link libcudart (ldd: $(ldd "$module" | tr '\n' ' '))"

# 2. The module exports gemma3_cuda_module and nothing else of ours (its copies of the core code
#    are local, so they cannot interpose on libgemma3's).
exported=$(nm -D --defined-only "$module" | awk '{print $3}' | grep -v '^_\(init\|fini\)$' | sort | tr '\n' ' ')
[[ "$exported" == "gemma3_cuda_module " ]] || fail "the module exports: $exported"

# 3. A CPU run loads no CUDA library (LD_DEBUG lists every object the loader opens).
out=$(LD_DEBUG=files "$cli" run -m "$tiny" --backend cpu -n 2 --raw -p Hello 2>&1)
[[ $? == 0 ]] || fail "run --backend cpu failed: $(echo "$out" | grep -v 'file=' | tail -n 3)"
if echo "$out" | grep -E 'file=[^ ]*(libcudart|libcublas|libgemma3-cuda)' | head -n 3 | grep .; then
  fail "run --backend cpu loaded CUDA libraries"
fi

# 4. --backend cuda loads the module from beside the program: without a GPU the error is the
#    module's own (about the driver or device); with one, the run succeeds.
out=$("$cli" run -m "$tiny" --backend cuda -n 2 --raw -p Hello 2>&1)
rc=$?
if [[ $rc != 0 ]]; then
  echo "$out" | grep -q 'CUDA backend: no' ||
    fail "run --backend cuda without a GPU: expected the module's device error, got: $(echo "$out" | tail -n 2)"
fi
echo "--backend cuda: exit $rc: $(echo "$out" | tail -n 1)"

# 5. A missing module, and a library that is not one, are named in the error.
out=$(GEMMA3_CUDA_MODULE=/nonexistent/libgemma3-cuda.so "$cli" run -m "$tiny" --backend cuda -n 2 --raw -p Hi 2>&1)
[[ $? != 0 ]] || fail "a missing module: the run succeeded"
echo "$out" | grep -q 'libgemma3-cuda.so was not found (looked for /nonexistent/libgemma3-cuda.so' ||
  fail "a missing module: $(echo "$out" | tail -n 1)"
other=$(ldd "$cli" | awk '/libstdc\+\+/ {print $3}')
out=$(GEMMA3_CUDA_MODULE="$other" "$cli" run -m "$tiny" --backend cuda -n 2 --raw -p Hi 2>&1)
echo "$out" | grep -q 'is not a gemma3 CUDA backend module' || fail "a foreign library: $(echo "$out" | tail -n 1)"

((fails == 0)) && echo "cuda_module_check: all checks passed"
exit $((fails > 0))
