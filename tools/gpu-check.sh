#!/usr/bin/env bash
# The first GPU contact (issue #13): what a 15-minute GPU lease can check, in two calls of at
# most 4 minutes each, every result written under $OUT as soon as its stage ends (the device
# tool returns only the last 12,000 characters of output, plus at most 8 files from $OUT).
#
# Here (no GPU; the GPU machine has CUDA 13, a newer glibc, 16 cores and no network, and gets a
# copy of the working tree plus the git-ignored paths a call carries):
#   cmake --preset release -B build/gpucheck -DGEMMA3_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a-real
#       (sm_90a code only: without the portable PTX the three copies of the kernels, in the
#       module, gemma3_tests and cuda_microbench, are smaller: with it, 2026-12-03, --assemble
#       counted 68 MiB of 64; --assemble checks the limit)
#   cmake --build build/gpucheck -j2 --target gemma3_cli gemma3_tests cuda_microbench
#   tools/gpu-check.sh --assemble build/gpucheck
#       -> gpu-carry/bin/{gemma3,gemma3_tests,cuda_microbench,libgemma3-cuda.so} and gpu-carry/lib/ with every shared
#          library ldd lists except glibc's and CUDA's; checks that gpu-carry plus the working tree
#          stay under the device tool's 64 MiB
# There (the device tool's run with carry ["gpu-carry"]), two calls:
#   tools/gpu-check.sh --stage 1   start check, CUDA tests (each in its own process: a fault kills
#                                  the CUDA context), compute-sanitizer, microbenchmarks
#   tools/gpu-check.sh --stage 2   real-shape parity (random 270M/1B GGUFs, CUDA vs the CPU
#                                  reference, fp8 weights vs bf16; the 4B's vision tower) and
#                                  model benchmarks
# CI (no GPU): tools/gpu-check.sh --dry-run ... (tests/gpu_check_dry_run.sh): the same flow with
# every command that needs a GPU replaced by a stub; argument handling and the $OUT layout are real.
#
# usage: tools/gpu-check.sh --assemble [BUILD_DIR] [--carry DIR]
#        tools/gpu-check.sh [--stage 1|2] [--out DIR] [--bin DIR] [--budget S] [--filter F] [--dry-run]
#   --stage    which call (default 1)
#   --out      result folder (default $OUT, else build/gpu-check-out)
#   --bin      the binaries (default gpu-carry/bin; gpu-carry/lib is added to LD_LIBRARY_PATH)
#   --budget   seconds after which no new step starts (default 220: the call ends inside 4 minutes)
#   --filter   gtest filter of the stage 1 tests (default Cuda/BackendOps.*:CudaOps.*:CudaVisionOps.*)
#   --dry-run  no GPU needed: stubs for nvidia-smi, the test runs, the sanitizer, make-model,
#              parity and bench; cuda_microbench --list for the table format
# Files under $OUT (at most 8 per call; names of letters, digits, '.', '_', '-'):
#   stage 1: summary.txt device.txt tests.xml tests.log sanitizer.log microbench.md
#   stage 2: summary.txt device.txt parity.xml parity.log bench.md models.log
# summary.txt is appended as each step ends; tests.xml (JUnit, one <testsuite> per process) is
# rewritten after every test; logs are complete, never tails.
# Exit codes: 0 every step passed; 1 a step failed (summary.txt says which); 2 bad arguments;
#   3 the binaries do not start here (a library is missing; device.txt has ldd's output);
#   4 (--assemble) the carried files would exceed the device tool's limit.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)

die_usage() {
  echo "gpu-check: $1" >&2
  sed -n '/^# usage:/,/^#   --dry-run/p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ---- --assemble: here, before the GPU calls -----------------------------------------------------
if [[ "${1:-}" == "--assemble" ]]; then
  shift
  build="$root/build/gpucheck"
  carry="$root/gpu-carry"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --carry) [[ $# -ge 2 ]] || die_usage "--carry needs a folder"; carry=$2; shift 2 ;;
      -*) die_usage "unknown argument to --assemble: $1" ;;
      *) build=$1; shift ;;
    esac
  done
  [[ -x "$build/gemma3_tests" && -x "$build/gemma3" ]] || { echo "gpu-check: $build has no gemma3/gemma3_tests: build first" >&2; exit 1; }
  rm -rf "$carry" && mkdir -p "$carry/bin" "$carry/lib" "$carry/lib-cxx"
  bins=(gemma3 gemma3_tests)
  [[ -x "$build/cuda_microbench" ]] && bins+=(cuda_microbench)
  # The CLI loads its CUDA backend, libgemma3-cuda.so, from its own folder (docs/cuda.md, "The
  # CUDA module"); the test binaries have it linked in.
  [[ -f "$build/libgemma3-cuda.so" ]] && bins+=(libgemma3-cuda.so)
  for b in "${bins[@]}"; do
    cp "$build/$b" "$carry/bin/"
    strip --strip-debug "$carry/bin/$b" 2>/dev/null || true
  done
  # Every shared library outside glibc and CUDA: the real file under its soname. CUDA's come
  # from the GPU machine (the start check finds them). libstdc++/libgcc_s go to lib-cxx/, used
  # there only if the machine's own are too old for our binaries (on LD_LIBRARY_PATH they would
  # also load into compute-sanitizer and nvidia-smi, which may need newer ones).
  for b in "${bins[@]}"; do ldd "$build/$b"; done | awk '/=> \//{print $1, $3}' | sort -u |
    grep -Ev '^(linux-vdso|ld-linux|libc\.so|libm\.so|libpthread|libdl\.so|librt\.so|libresolv|libcuda|libcudart|libcublas|libnvidia)' |
    while read -r soname path; do
      case "$soname" in
        libstdc++* | libgcc_s*) cp -L "$path" "$carry/lib-cxx/$soname" ;;
        *) cp -L "$path" "$carry/lib/$soname" ;;
      esac
    done
  ls -l "$carry/bin" "$carry/lib" "$carry/lib-cxx"
  carry_kib=$(du -sk "$carry" | cut -f1)
  # What else travels: tracked files plus untracked files git does not ignore.
  tree_kib=$(cd "$root" && git ls-files -z --cached --others --exclude-standard 2>/dev/null |
    du -ck --files0-from=- 2>/dev/null | awk 'END {print $1 + 0}')
  total=$((carry_kib + tree_kib))
  echo "gpu-carry: $((carry_kib / 1024)) MiB, working tree: $((tree_kib / 1024)) MiB, together $((total / 1024)) MiB of 64 MiB"
  if ((total >= 64 * 1024)); then
    echo "gpu-check: the carried files and the tree exceed the device tool's 64 MiB" >&2
    exit 4
  fi
  exit 0
fi

# ---- arguments ---------------------------------------------------------------------------------
stage=1
out="${OUT:-$root/build/gpu-check-out}"
bin="$root/gpu-carry/bin"
budget=220
filter='Cuda/BackendOps.*:CudaOps.*:CudaVisionOps.*'
dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage) [[ $# -ge 2 ]] || die_usage "--stage needs 1 or 2"; stage=$2; shift 2 ;;
    --out) [[ $# -ge 2 ]] || die_usage "--out needs a folder"; out=$2; shift 2 ;;
    --bin) [[ $# -ge 2 ]] || die_usage "--bin needs a folder"; bin=$2; shift 2 ;;
    --budget) [[ $# -ge 2 ]] || die_usage "--budget needs seconds"; budget=$2; shift 2 ;;
    --filter) [[ $# -ge 2 ]] || die_usage "--filter needs a gtest filter"; filter=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h | --help) sed -n '/^# usage:/,/^#   --dry-run/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die_usage "unknown argument: $1" ;;
  esac
done
[[ "$stage" == 1 || "$stage" == 2 ]] || die_usage "--stage must be 1 or 2, got '$stage'"
[[ "$budget" =~ ^[0-9]+$ ]] || die_usage "--budget must be a whole number of seconds, got '$budget'"
mkdir -p "$out" || { echo "gpu-check: cannot create $out" >&2; exit 2; }
out=$(cd "$out" && pwd)
lib="$(dirname "$bin")/lib"
# The CUDA suites: in gemma3_tests (nvcc builds), or in gemma3_cuda_tests of an emulator build
# (GEMMA3_CUDA_EMU: the debug preset), where CI runs this script's dry run.
tests_name=gemma3_tests
[[ -x "$bin/gemma3_cuda_tests" ]] && tests_name=gemma3_cuda_tests
tests_bin="$bin/$tests_name"
export LD_LIBRARY_PATH="$lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export GEMMA3_SOURCE_DIR="$root"  # test data: tests/data of this copy of the tree
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
elapsed() { echo $(($(date +%s) - start)); }
left() { echo $((budget - $(elapsed))); }
failed=0
summary="$out/summary.txt"

# A line for summary.txt (appended at once) and for stdout (the tool's output tail).
say() { echo "$*" | tee -a "$summary"; }
section() { say "== stage $stage: $1 ($(elapsed) s)"; }
# Seconds a step may take: its wish, capped by what the budget leaves after `reserve`.
cap() { # WISH RESERVE (never below 1: `timeout 0` would mean no limit)
  local l=$(($(left) - $2))
  ((l > $1)) && l=$1
  ((l < 1)) && l=1
  echo "$l"
}

say "gpu-check stage $stage, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${budget} s$([[ $dry == 1 ]] && echo ', DRY RUN (no GPU used)')"

# ---- start check: the binaries start, CUDA's libraries are found ----------------------------------
# A library ldd cannot resolve is searched for: CUDA's usual folders, ldconfig, Python wheels
# (nvidia-cublas and nvidia-cuda-runtime install lib/ folders under site-packages/nvidia), then
# the disk. The folder found goes first on LD_LIBRARY_PATH; device.txt says which file was used.
find_lib() { # NAME -> a folder holding it, or nothing
  local name=$1 d p py site
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
    /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu /usr/local/nvidia/lib64; do
    [[ -e "$d/$name" ]] && { echo "$d"; return; }
  done
  p=$(ldconfig -p 2>/dev/null | awk -v n="$name" '$1 == n {print $NF; exit}')
  [[ -n "$p" ]] && { dirname "$p"; return; }
  for py in python3 /opt/torch/.venv/bin/python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    for site in $("$py" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
      p=$(find "$site/nvidia" -name "$name" -print -quit 2>/dev/null)
      [[ -n "$p" ]] && { dirname "$p"; return; }
    done
  done
  p=$(timeout 30 find / -xdev \( -path /proc -o -path /sys \) -prune -o -name "$name" -print -quit 2>/dev/null)
  [[ -n "$p" ]] && dirname "$p"
}

start_check() {
  section "start check"
  local dev="$out/device.txt" b missing name dir resolved
  bins=("$bin/gemma3" "$tests_bin")
  [[ -x "$bin/cuda_microbench" ]] && bins+=("$bin/cuda_microbench")
  [[ -f "$bin/libgemma3-cuda.so" ]] && bins+=("$bin/libgemma3-cuda.so")  # the CLI's CUDA backend
  {
    echo "== nvidia-smi -L"
    if [[ $dry == 1 ]]; then echo "(dry run: nvidia-smi not run)"; else nvidia-smi -L 2>&1; fi
    echo "== nvidia-smi --query-gpu"
    [[ $dry == 1 ]] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
      --format=csv 2>&1
  } >"$dev"
  say "device: $(grep -m1 'GPU 0' "$dev" || echo 'no nvidia-smi -L output')"
  for b in gemma3 "$tests_name"; do
    [[ -x "$bin/$b" ]] || { say "START FAILED: $bin/$b is missing (tools/gpu-check.sh --assemble here first)"; exit 3; }
  done
  # Resolve what ldd cannot find, library by library.
  missing=$(ldd "${bins[@]}" 2>/dev/null | awk '/not found/ {print $1}' | sort -u)
  for name in $missing; do
    dir=$(find_lib "$name")
    if [[ -n "$dir" ]]; then
      export LD_LIBRARY_PATH="$dir:$LD_LIBRARY_PATH"
      say "library: $name was not found by ldd; using $dir/$name"
    else
      say "library: $name NOT FOUND anywhere on this machine"
    fi
  done
  for name in libcublas.so.13 libcublasLt.so.13 libcudart.so.13; do
    resolved=$(ldd "$tests_bin" 2>/dev/null | awk -v n="$name" '$1 == n {print $3}')
    [[ -n "$resolved" ]] && say "library: $name -> $resolved"
  done
  {
    echo "== LD_LIBRARY_PATH"
    echo "$LD_LIBRARY_PATH"
    for b in "${bins[@]}"; do
      echo "== ldd $b"
      ldd "$b" 2>&1
    done
  } >>"$dev"
  if ldd "${bins[@]}" 2>/dev/null | grep -q 'not found'; then
    say "START FAILED: unresolved libraries (device.txt): $(ldd "${bins[@]}" 2>/dev/null | awk '/not found/ {print $1}' | sort -u | tr '\n' ' ')"
    exit 3
  fi
  # Our libstdc++ only when the machine's is too old (a GLIBCXX/CXXABI/GCC version missing).
  if ! "$bin/gemma3" --help >"$work/help" 2>&1 && grep -qE "GLIBCXX|CXXABI|GCC_[0-9]" "$work/help" &&
    [[ -d "$lib-cxx" ]]; then
    export LD_LIBRARY_PATH="$lib-cxx:$LD_LIBRARY_PATH"
    say "library: this machine's libstdc++ is too old for the binaries; using $lib-cxx"
  fi
  if ! "$tests_bin" --gtest_list_tests --gtest_filter='CudaOps.*' >"$work/list" 2>&1; then
    say "START FAILED: $tests_name does not run: $(tail -n 3 "$work/list" | tr '\n' ' ')"
    exit 3
  fi
  if ! "$bin/gemma3" --help >"$work/help" 2>&1; then
    say "START FAILED: gemma3 does not run: $(tail -n 3 "$work/help" | tr '\n' ' ')"
    exit 3
  fi
  say "binaries start: $tests_name lists $(grep -c '^  ' "$work/list") CudaOps tests; gemma3 --help runs"
  if [[ $dry == 0 ]]; then
    {
      echo "== nvidia-smi -q"
      nvidia-smi -q 2>&1
    } >>"$dev"
  fi
}

# ---- JUnit XML: one <testsuite> per test process, merged into one file ---------------------------
xml_parts="$work/xml-parts"
: >"$xml_parts"
xml_write() { # OUTFILE
  {
    echo '<?xml version="1.0" encoding="UTF-8"?>'
    echo '<testsuites name="gpu-check">'
    cat "$xml_parts"
    echo '</testsuites>'
  } >"$1"
}
xml_add_file() { # GTEST_XML: its <testsuite> elements
  sed -e '1,/<testsuites/d' -e '/<\/testsuites>/,$d' "$1" >>"$xml_parts"
}
xml_add_case() { # SUITE TEST KIND(failure|skipped) MESSAGE
  local msg=${4//&/&amp;}
  msg=${msg//</&lt;}
  msg=${msg//\"/&quot;}
  {
    echo "  <testsuite name=\"$1\" tests=\"1\" failures=\"$([[ $3 == failure ]] && echo 1 || echo 0)\">"
    echo "    <testcase name=\"$2\" classname=\"$1\"><$3 message=\"$msg\"/></testcase>"
    echo "  </testsuite>"
  } >>"$xml_parts"
}

# ---- stage 1: the CUDA tests, one process each ---------------------------------------------------
run_tests() {
  section "tests"
  local log="$out/tests.log" tests t rc secs x t0 n=0 passed=0 fails=0 crashed=0 skipped=0 notrun=0 per
  : >"$log"
  tests=$("$tests_bin" --gtest_list_tests --gtest_filter="$filter" 2>/dev/null |
    awk '/^[^ ]/ {suite = $1} /^  / {print suite $1}')
  local bad=()
  for t in $tests; do
    n=$((n + 1))
    per=$(cap 150 70)  # keep ~70 s for the sanitizer and the microbenchmarks
    if ((per < 10)); then
      notrun=$((notrun + 1))
      xml_add_case "${t%%.*}" "${t#*.}" skipped "not run: time budget"
      continue
    fi
    x="$work/t.xml"
    rm -f "$x"
    t0=$(date +%s)
    if [[ $dry == 1 ]]; then
      echo "(dry run: $t not run)" >"$work/t.log"
      rc=0
    else
      timeout "$per" "$tests_bin" --gtest_filter="$t" --gtest_color=no --gtest_output="xml:$x" >"$work/t.log" 2>&1
      rc=$?
    fi
    secs=$(($(date +%s) - t0))
    {
      echo "==== $t (exit $rc, $secs s)"
      cat "$work/t.log"
    } >>"$log"
    if [[ -s "$x" ]]; then
      xml_add_file "$x"
    elif [[ $dry == 1 ]]; then
      xml_add_case "${t%%.*}" "${t#*.}" skipped "dry run"
    else
      xml_add_case "${t%%.*}" "${t#*.}" failure "no result: exit $rc$([[ $rc == 124 ]] && echo ' (timeout)') after $secs s"
    fi
    xml_write "$out/tests.xml"
    if [[ $dry == 1 ]] || { [[ $rc == 0 ]] && grep -q '^\[  SKIPPED \]' "$work/t.log"; }; then
      skipped=$((skipped + 1))
    elif [[ $rc == 0 ]]; then
      passed=$((passed + 1))
    elif [[ -s "$x" ]]; then
      fails=$((fails + 1))
      bad+=("$t")
      say "FAILED: $t (exit $rc, $secs s): $(grep -m1 -A3 -E 'Failure$|rror' "$work/t.log" | tr '\n' ' ' | cut -c1-300)"
    else
      crashed=$((crashed + 1))
      bad+=("$t")
      say "CRASHED: $t (exit $rc$([[ $rc == 124 ]] && echo ', timeout'), $secs s): $(grep -v '^\s*$' "$work/t.log" | tail -n 1 | cut -c1-200)"
    fi
  done
  xml_write "$out/tests.xml"
  say "tests: $n, one process each: $passed passed, $fails failed, $crashed crashed, $skipped skipped, $notrun not run (budget)"
  # A skip here means the GPU was not usable (e.g. cudaErrorInsufficientDriver): nothing was
  # checked, so the step fails.
  if ((skipped > 0)) && [[ $dry == 0 ]]; then
    say "FAILED: $skipped tests skipped: $(grep -m1 -o 'no CUDA backend here.*\|no tiny-vision fixture.*' "$log" | cut -c1-200)"
    failed=1
  fi
  grep '^timing:' "$log" | tee -a "$summary"
  # Failures again with GEMMA3_CUDA_SYNC=1: a fault is then reported by the op that caused it.
  for t in "${bad[@]}"; do
    per=$(cap 60 70)
    ((per < 10)) && break
    {
      echo "==== $t again with GEMMA3_CUDA_SYNC=1"
      GEMMA3_CUDA_SYNC=1 timeout "$per" "$tests_bin" --gtest_filter="$t" --gtest_color=no 2>&1
      echo "(exit $?)"
    } >"$work/t.log"
    cat "$work/t.log" >>"$log"
    say "  $t with GEMMA3_CUDA_SYNC=1: $(grep -m1 -o 'CUDA error after [^"]*' "$work/t.log" | cut -c1-200 || true)"
  done
  ((fails + crashed > 0)) && failed=1
  return 0
}

# ---- stage 1: compute-sanitizer ------------------------------------------------------------------
find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer 2>/dev/null)" /usr/local/cuda/bin/compute-sanitizer \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer /usr/local/cuda-13*/bin/compute-sanitizer; do
    [[ -n "$c" && -x "$c" ]] && { echo "$c"; return; }
  done
  timeout 10 find /usr/local /opt -name compute-sanitizer -type f -perm -u+x -print -quit 2>/dev/null
}

run_sanitizer() {
  section "compute-sanitizer"
  local log="$out/sanitizer.log" cs tool filt per rc
  : >"$log"
  if [[ $dry == 1 ]]; then
    cs="compute-sanitizer"
  else
    cs=$(find_sanitizer)
    if [[ -z "$cs" ]]; then
      say "sanitizer: compute-sanitizer not found on this machine"
      echo "compute-sanitizer not found (PATH, /usr/local/cuda*/bin, /usr/local, /opt)" >>"$log"
      failed=1
      return 0
    fi
  fi
  # memcheck: the ops and the tiny model; racecheck (shared-memory hazards): small attention
  # and GEMV cases (racecheck serializes, so only small ones).
  for spec in "memcheck Cuda/BackendOps.RmsNorm/*:Cuda/BackendOps.Embed*:Cuda/BackendOps.KvWrite*:Cuda/BackendOps.GeluGate*:CudaOps.SmallAttentionAndGemv:Cuda/BackendOps.SampleTreatsNan*:CudaOps.TinyModelMatchesCpu" \
    "racecheck CudaOps.SmallAttentionAndGemv"; do
    read -r tool filt <<<"$spec"
    per=$(cap 75 35)  # keep ~35 s for the microbenchmarks
    if ((per < 15)); then
      say "sanitizer $tool: not run (time budget)"
      continue
    fi
    echo "==== $cs --tool $tool ($filt)" >>"$log"
    if [[ $dry == 1 ]]; then
      echo "(dry run: not run)" >>"$log"
      say "sanitizer $tool: dry run"
      continue
    fi
    timeout "$per" "$cs" --tool "$tool" --error-exitcode 9 --print-limit 50 \
      "$tests_bin" --gtest_filter="$filt" --gtest_color=no >>"$log" 2>&1
    rc=$?
    echo "(exit $rc)" >>"$log"
    say "sanitizer $tool: exit $rc$([[ $rc == 124 ]] && echo ' (timeout)'): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -n 1 | sed 's/^=* *//')"
    ((rc != 0)) && failed=1
  done
  return 0
}

# ---- stage 1: microbenchmarks --------------------------------------------------------------------
run_microbench() {
  section "microbenchmarks"
  local md="$out/microbench.md" per rc
  if [[ ! -x "$bin/cuda_microbench" ]]; then
    say "microbench: $bin/cuda_microbench missing (not assembled?)"
    return 0
  fi
  per=$(cap 90 0)
  if ((per < 10)); then
    say "microbench: not run (time budget)"
    return 0
  fi
  if [[ $dry == 1 ]]; then
    "$bin/cuda_microbench" --list >"$md" 2>&1
  else
    timeout "$per" "$bin/cuda_microbench" --min-ms 20 >"$md" 2>&1
  fi
  rc=$?
  say "microbench: exit $rc$([[ $rc == 77 ]] && echo ' (skipped: no CUDA device)')$([[ $rc == 124 ]] && echo ' (timeout)'), $(grep '^| [a-z]' "$md" | grep -vc '^| group |') rows in microbench.md"
  grep -E '^\| copy ' "$md" | tee -a "$summary"
  ((rc != 0 && !(dry == 1 && rc == 77))) && failed=1
  return 0
}

# ---- stage 2: models, parity, benchmarks ---------------------------------------------------------
# Random-weight models go to memory when there is room (the GPU machine has 128 GiB; a disk
# write of a 2 GB GGUF can take longer than making it), else /tmp.
models="/tmp/gemma3-gpucheck"
if [[ -d /dev/shm ]] && (($(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}' || echo 0) > 16 * 1024 * 1024)); then
  models="/dev/shm/gemma3-gpucheck"
fi
make_model() { # SIZE TYPE -> path (empty on failure); logs to models.log
  local size=$1 type=$2 path="$models/$1-$2.gguf" t0 rc
  if [[ $dry == 1 ]]; then
    echo "(dry run: make-model --size $size --type $type not run)" >>"$out/models.log"
    echo "$path"
    return
  fi
  mkdir -p "$models"
  if [[ ! -s "$path" ]]; then
    t0=$(date +%s)
    timeout "$(cap 120 20)" "$bin/gemma3" make-model --size "$size" --type "$type" -o "$path" -q >>"$out/models.log" 2>&1
    rc=$?
    echo "make-model $size $type: exit $rc, $(($(date +%s) - t0)) s" >>"$out/models.log"
    if ((rc != 0)); then
      rm -f "$path"
      say "make-model $size $type: FAILED (exit $rc, models.log)" >&2
      return
    fi
  fi
  echo "$path"
}

run_parity() {
  section "real-shape parity"
  local paths=() p per rc
  : >"$out/models.log"
  for size in 270m 1b; do
    p=$(make_model "$size" bf16)
    if [[ -n "$p" ]]; then paths+=("$p"); else failed=1; fi
  done
  ((${#paths[@]} > 0)) || { say "parity: no models"; failed=1; return 0; }
  per=$(cap 170 30)  # keep ~30 s for the 270M benchmark
  if ((per < 20)); then
    say "parity: not run (time budget)"
    return 0
  fi
  if [[ $dry == 1 ]]; then
    echo "(dry run: CudaParity.* not run)" >"$out/parity.log"
    : >"$xml_parts"
    xml_add_case CudaParity RealShapeModels skipped "dry run"
    xml_write "$out/parity.xml"
    say "parity: dry run"
    return 0
  fi
  GEMMA3_PARITY_MODELS=$(IFS=,; echo "${paths[*]}") timeout "$per" "$tests_bin" --gtest_filter='CudaParity.*' \
    --gtest_color=no --gtest_output="xml:$out/parity.xml" >"$out/parity.log" 2>&1
  rc=$?
  say "parity: exit $rc$([[ $rc == 124 ]] && echo ' (timeout)')"
  grep -E '^parity:|Failure|SKIPPED \]' "$out/parity.log" | cut -c1-300 | tee -a "$summary"
  ((rc != 0)) && failed=1
  return 0
}

run_bench() {
  section "model benchmarks"
  local md="$out/bench.md" spec size type extra p per rc mm env
  : >"$md"
  # size type [bench flags]: bf16 as stored and as fp8, quantized types; the 4B also encodes one
  # image (-i) and decodes at 32K context (split-KV); "@nographs": the same bench with every op
  # launched one by one (GEMMA3_CUDA_GRAPHS=0), what the decode step's CUDA graph saves;
  # "@fp32gemm": prefill GEMMs in fp32 without tensor cores (GEMMA3_CUDA_FP32_GEMM=1), what the
  # bf16 GEMM gains (pp TFLOP/s and % of GEMM columns); "@noflash": prefill and vision attention
  # on the fp32 kernel (GEMMA3_CUDA_FLASH=0), what the tensor-core attention gains (pp at depth,
  # the image encode). In order of value: the rest as time allows.
  for spec in "270m bf16" "270m bf16 @nographs" "1b bf16" "1b bf16 @fp32gemm" "1b bf16 --weights fp8" "1b q4_k" \
    "4b q4_0 -i -d 0,32768" "4b q4_0 -i -d 0,32768 @noflash"; do
    read -r size type extra <<<"$spec"
    env=(env)
    local word rest=""
    for word in $extra; do
      case "$word" in
        @nographs) env+=(GEMMA3_CUDA_GRAPHS=0) ;;
        @fp32gemm) env+=(GEMMA3_CUDA_FP32_GEMM=1) ;;
        @noflash) env+=(GEMMA3_CUDA_FLASH=0) ;;
        *) rest+="${rest:+ }$word" ;;
      esac
    done
    extra=$rest
    per=$(cap 100 0)
    if ((per < 25)); then
      say "bench $spec: not run (time budget)"
      continue
    fi
    mm=()
    if [[ "$extra" == *-i* ]]; then
      p="$models/$size-$type.gguf"
      [[ $dry == 1 || -s "$p" ]] || timeout "$(cap 120 20)" "$bin/gemma3" make-model --size "$size" --type "$type" \
        --vision -o "$p" -q >>"$out/models.log" 2>&1 || {
        say "bench $spec: make-model --vision failed"
        failed=1
        continue
      }
      mm=(--mmproj "$models/$size-$type.mmproj.gguf")
      # Once: the tower's real-shape parity on these files (CudaParity.RealShapeVisionTower).
      if [[ $dry != 1 && -z "${vision_parity_done:-}" ]]; then
        vision_parity_done=1
        GEMMA3_PARITY_VISION="$p,${mm[1]}" timeout "$(cap 90 20)" "$tests_bin" \
          --gtest_filter='CudaParity.RealShapeVisionTower' --gtest_color=no >>"$out/parity.log" 2>&1
        rc=$?
        say "vision parity ($size $type): exit $rc$([[ $rc == 124 ]] && echo ' (timeout)')"
        grep -E '^parity: vision|Failure' "$out/parity.log" | cut -c1-300 | tee -a "$summary"
        ((rc != 0)) && failed=1
      fi
    else
      p=$(make_model "$size" "$type")
      [[ -n "$p" ]] || { failed=1; continue; }
    fi
    echo "## $size $type ${extra:-} ${env[*]:1}" >>"$md"
    if [[ $dry == 1 ]]; then
      echo "(dry run: gemma3 bench -m $p --backend cuda -p 512 -n 64 -r 2 $extra not run)" >>"$md"
      say "bench $spec: dry run"
      continue
    fi
    # shellcheck disable=SC2086  # extra holds several flags
    timeout "$(cap 100 0)" "${env[@]}" "$bin/gemma3" bench -m "$p" "${mm[@]}" --backend cuda -p 512 -n 64 -r 2 $extra \
      >>"$md" 2>&1
    rc=$?
    echo "(exit $rc)" >>"$md"
    if ((rc == 0)); then
      grep '^|' "$md" | grep -v -e '---' -e 'model *|' | tail -n 4 | sed "s/^/$size $type ${extra:-}: /" |
        sed "s/: /${env[*]:1}: /" | tee -a "$summary"
    else
      say "bench $spec: FAILED (exit $rc$([[ $rc == 124 ]] && echo ', timeout')): $(grep -v '^\s*$' "$md" | tail -n 2 | head -n 1 | cut -c1-200)"
      failed=1
    fi
  done
  return 0
}

# ---- the stages ----------------------------------------------------------------------------------
start_check
if [[ $stage == 1 ]]; then
  run_tests
  run_sanitizer
  run_microbench
else
  run_parity
  run_bench
fi
section "done: $([[ $failed == 0 ]] && echo 'every step passed' || echo 'SOMETHING FAILED (see above)')"
echo "files in $out: $(cd "$out" && find . -maxdepth 1 -type f -printf '%f ')"
exit "$failed"
