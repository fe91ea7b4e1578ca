#!/usr/bin/env bash
# ctest GpuCheck.DryRun: the parts of tools/gpu-check.sh that need no GPU, with the binaries of
# this build (BIN_DIR; in the debug preset's emulator build the CUDA suites are in
# gemma3_cuda_tests, which gpu-check.sh then uses): argument handling and exit codes, and for both stages the $OUT layout
# the device tool can return (at most 8 files, names of [A-Za-z0-9._-], summary.txt written,
# well-formed JUnit XML, every test of the filter accounted for). In CUDA builds also
# cuda_microbench: --help, bad arguments (2), --list's table, and the skip code (77) with a
# message when no device is visible.
# usage: tests/gpu_check_dry_run.sh BIN_DIR
set -u
bin=${1:?usage: gpu_check_dry_run.sh BIN_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
check="$root/tools/gpu-check.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
fail() {
  echo "FAIL: $*"
  fails=$((fails + 1))
}
expect_rc() { # WANT CMD... (output in $tmp/last)
  local want=$1
  shift
  "$@" >"$tmp/last" 2>&1
  local rc=$?
  [[ $rc == "$want" ]] || fail "$* exited $rc, expected $want: $(head -c 400 "$tmp/last")"
}

# ---- arguments ----
expect_rc 0 bash "$check" --help
grep -q -- '--dry-run' "$tmp/last" || fail "--help does not describe --dry-run"
expect_rc 2 bash "$check" --bogus
grep -q 'unknown argument: --bogus' "$tmp/last" || fail "--bogus: no message naming it"
expect_rc 2 bash "$check" --stage 3 --dry-run
grep -q -- '--stage must be 1 or 2' "$tmp/last" || fail "--stage 3: no message"
expect_rc 2 bash "$check" --budget soon --dry-run
expect_rc 2 bash "$check" --out
expect_rc 1 bash "$check" --assemble "$tmp/no-such-build" --carry "$tmp/carry"
expect_rc 3 bash "$check" --dry-run --bin "$tmp/empty-bin" --out "$tmp/out-missing"
grep -q 'START FAILED' "$tmp/out-missing/summary.txt" 2>/dev/null || fail "missing binaries: no START FAILED in summary.txt"

# ---- the $OUT layout of each stage ----
layout_ok() { # DIR EXPECTED-FILES...
  local dir=$1 f n
  shift
  n=$(find "$dir" -type f | wc -l)
  ((n <= 8)) || fail "$dir holds $n files: the device tool returns at most 8"
  [[ -z "$(find "$dir" -mindepth 1 -type d)" ]] || fail "$dir has subfolders"
  while IFS= read -r f; do
    [[ "$f" =~ ^[A-Za-z0-9._-]+$ ]] || fail "file name '$f' has characters the device tool refuses"
  done < <(find "$dir" -type f -printf '%f\n')
  for f in "$@"; do [[ -s "$dir/$f" ]] || fail "$dir/$f missing or empty"; done
}
xml_ok() { # FILE
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import sys, xml.etree.ElementTree as E; r = E.parse(sys.argv[1]).getroot(); assert r.tag == "testsuites"' "$1" ||
      fail "$1 is not well-formed JUnit XML"
  else
    head -n 2 "$1" | grep -q '<testsuites' || fail "$1 does not start with <testsuites>"
  fi
}

out1="$tmp/out1"
expect_rc 0 bash "$check" --stage 1 --dry-run --bin "$bin" --out "$out1"
cat "$tmp/last"
layout_ok "$out1" summary.txt device.txt tests.xml tests.log
xml_ok "$out1/tests.xml"
for step in "start check" "tests" "compute-sanitizer" "microbenchmarks" "done"; do
  grep -q "== stage 1: $step" "$out1/summary.txt" || fail "stage 1 summary.txt lacks '$step'"
done
tests_bin="$bin/gemma3_tests"  # gpu-check.sh's choice: the emulator build's CUDA binary if present
[[ -x "$bin/gemma3_cuda_tests" ]] && tests_bin="$bin/gemma3_cuda_tests"
want=$("$tests_bin" --gtest_list_tests --gtest_filter='Cuda/BackendOps.*:CudaOps.*:CudaVisionOps.*' | grep -c '^  ')
[[ "$want" -gt 0 ]] || fail "$tests_bin lists no CUDA tests"
got=$(grep -c '<testcase' "$out1/tests.xml")
[[ "$want" == "$got" ]] || fail "tests.xml has $got test cases, the filter lists $want"
grep -q "^tests: $want, one process each" "$out1/summary.txt" || fail "summary.txt does not count $want tests"

out2="$tmp/out2"
expect_rc 0 bash "$check" --stage 2 --dry-run --bin "$bin" --out "$out2"
cat "$tmp/last"
layout_ok "$out2" summary.txt device.txt parity.xml parity.log bench.md models.log
xml_ok "$out2/parity.xml"
for step in "start check" "real-shape parity" "model benchmarks" "done"; do
  grep -q "== stage 2: $step" "$out2/summary.txt" || fail "stage 2 summary.txt lacks '$step'"
done

# A budget already spent: every test is reported as not run, still one XML entry each.
out3="$tmp/out3"
expect_rc 0 bash "$check" --stage 1 --dry-run --budget 0 --bin "$bin" --out "$out3"
grep -q "0 passed, 0 failed, 0 crashed, 0 skipped, $want not run" "$out3/summary.txt" ||
  fail "budget 0: tests not all reported as not run: $(grep '^tests:' "$out3/summary.txt")"
xml_ok "$out3/tests.xml"

# ---- cuda_microbench (CUDA builds) ----
mb="$bin/cuda_microbench"
if [[ -x "$mb" ]]; then
  expect_rc 0 "$mb" --help
  expect_rc 2 "$mb" --only nonsense
  expect_rc 2 "$mb" --min-ms -3
  expect_rc 2 "$mb" --frobnicate
  expect_rc 0 "$mb" --list --tsv "$tmp/mb.tsv"
  head -n 1 "$tmp/last" | grep -q '^| group | case | type | us | rate | unit | % of reference | reference |$' ||
    fail "cuda_microbench --list: unexpected header: $(head -n 1 "$tmp/last")"
  rows=$(grep '^| [a-z]' "$tmp/last" | grep -vc '^| group |')
  ((rows == 1 + 20 + 8 + 36 + 2)) || fail "cuda_microbench --list: $rows rows, expected 67"
  [[ $(wc -l <"$tmp/mb.tsv") == $((rows + 1)) ]] || fail "cuda_microbench --tsv: not one line per row"
  expect_rc 0 "$mb" --list --only gemv
  [[ $(grep '^| [a-z]' "$tmp/last" | grep -vc '^| group |') == 21 ]] || fail "--only gemv: expected the copy row and 20 GEMV rows"
  if [[ ! -e /dev/nvidia0 ]]; then  # no GPU: the documented skip
    "$mb" --only copy >"$tmp/last" 2>&1
    rc=$?
    [[ $rc == 77 ]] || fail "cuda_microbench without a GPU exited $rc, expected 77"
    grep -q 'skipped' "$tmp/last" || fail "cuda_microbench without a GPU: no skip message"
  fi
else
  echo "(no cuda_microbench in $bin: a build without CUDA)"
fi

if ((fails > 0)); then
  echo "$fails check(s) failed"
  exit 1
fi
echo "gpu-check dry run: all checks passed"
