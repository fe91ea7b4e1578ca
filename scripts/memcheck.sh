#!/usr/bin/env bash
# Runs the image decoder tests under valgrind memcheck and fails on any error it reports: a read
# of uninitialized memory, an invalid read or write, a definite leak. The decoder wraps
# stb_image, which once read an uninitialized stack palette (issue #12: a palette index past the
# PLTE); neither ASan nor UBSan reports such reads, and MemorySanitizer would need every library
# rebuilt with it.
#
#   scripts/memcheck.sh [--build-dir DIR] [--filter GTEST_FILTER]
#
#   --build-dir D  where the test binary is built (default build/memcheck)
#   --filter F     gtest filter (default: the decoder suites, which include a replay of
#                  fuzz/corpus/image; the preprocessing goldens are left out as slow under valgrind)
#
# Builds only tests/test_image.cpp and what it tests (src/image/image*.cpp, src/core/status.cpp)
# with Release flags plus -g, no sanitizers, CPU only, from a build.ninja it writes in DIR, so it
# neither needs nor waits for the rest of the library. Needs valgrind (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

build=build/memcheck
filter='ImageLimits.*:ImageRegressions.*:ImageGoldens.DecodeMatchesPillow'
while (($#)); do
  case "$1" in
    --build-dir|--filter)
      if (($# < 2)); then echo "memcheck.sh: error: $1 needs a value" >&2; exit 2; fi
      if [[ "$1" == --build-dir ]]; then build="$2"; else filter="$2"; fi
      shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "memcheck.sh: error: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
for tool in valgrind ninja g++; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "memcheck.sh: error: $tool not found; run scripts/setup.sh" >&2
    exit 1
  fi
done

# The same include directories and test definitions as CMakeLists.txt gives gemma3_tests.
stb_dir=/usr/include/stb
[[ -f "$stb_dir/stb_image.h" ]] || stb_dir=/usr/include
mkdir -p "$build"
cat >"$build/build.ninja" <<EOF
# Written by scripts/memcheck.sh; paths are relative to the repository root.
builddir = $build
cxxflags = -std=c++20 -O3 -DNDEBUG -g -Wall -Wextra -Wno-unused-parameter -Iinclude -Isrc -I$stb_dir $
    -DGEMMA3_SOURCE_DIR='"$PWD"'
rule cxx
  command = g++ \$cxxflags -MMD -MF \$out.d -c \$in -o \$out
  depfile = \$out.d
  deps = gcc
  description = CXX \$in
rule link
  command = g++ \$in -o \$out -lgtest -lgtest_main -lfmt -pthread
  description = LINK \$out
build $build/obj/status.o: cxx src/core/status.cpp
build $build/obj/image.o: cxx src/image/image.cpp
build $build/obj/image_decode.o: cxx src/image/image_decode.cpp
build $build/obj/test_image.o: cxx tests/test_image.cpp
build $build/image_tests: link $build/obj/status.o $build/obj/image.o $build/obj/image_decode.o $
    $build/obj/test_image.o
EOF
ninja -f "$build/build.ninja" -j 2 "$build/image_tests"

echo "memcheck.sh: valgrind memcheck on $build/image_tests --gtest_filter=$filter"
if ! valgrind --tool=memcheck --error-exitcode=1 --track-origins=yes --leak-check=full \
    --errors-for-leak-kinds=definite --show-leak-kinds=definite --quiet \
    "$build/image_tests" --gtest_filter="$filter" --gtest_brief=1; then
  echo "memcheck.sh: FAILED: valgrind reported errors or a test failed (output above)" >&2
  exit 1
fi
echo "memcheck.sh: no memcheck errors"
