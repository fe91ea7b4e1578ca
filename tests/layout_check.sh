#!/usr/bin/env bash
# ctest Layout.Includes: the source tree's layering (docs/architecture.md §7) holds. Each folder
# of src/ includes only the folders listed for it below, and the CLI (tools/cli) and examples/
# include only the public headers (include/gemma3/) and their own files; the CLI's make-model
# command also uses the development library's dev/make_model.h, and its serve command the HTTP
# server (tools/server, itself built on the public headers only).
# usage: tests/layout_check.sh [SOURCE_ROOT]
set -u
root=${1:-$(cd "$(dirname "$0")/.." && pwd)}
fails=0
fail() {
  echo "FAIL: $*"
  fails=$((fails + 1))
}

# folder -> the src/ folders its files may include (besides gemma3/ and itself).
declare -A allowed=(
  [core]=""
  [io]="core"
  [backend]="core"
  [image]="core io"
  [text]="core io checkpoint"
  [checkpoint]="core io model text"
  [model]="core backend checkpoint"
  [runtime]="core io backend checkpoint text model image"
  [dev]="core io checkpoint text model"
)
for dir in "${!allowed[@]}"; do
  [[ -d "$root/src/$dir" ]] || {
    fail "src/$dir is missing (update tests/layout_check.sh with the tree)"
    continue
  }
  while IFS= read -r line; do
    file=${line%%:*}
    inc=$(sed -E 's/.*#include "([^"]+)".*/\1/' <<<"${line#*:}")
    top=${inc%%/*}
    [[ "$inc" == */* ]] || continue # a file of the same folder
    [[ "$top" == gemma3 || "$top" == "$dir" || "$top" == ".." ]] && continue
    [[ " ${allowed[$dir]} " == *" $top "* ]] && continue
    fail "${file#$root/} includes \"$inc\": src/$dir may include only: ${allowed[$dir]:-(nothing of src/)}"
  done < <(grep -rHE '^#include "' "$root/src/$dir")
done
for dir in "$root"/src/*/; do
  d=$(basename "$dir")
  [[ -n "${allowed[$d]+x}" ]] || fail "src/$d is not in tests/layout_check.sh's table of allowed includes"
done

# The CLI and the examples are built against the public headers only.
while IFS= read -r line; do
  file=${line%%:*}
  inc=$(sed -E 's/.*#include "([^"]+)".*/\1/' <<<"${line#*:}")
  [[ "$inc" == gemma3/* || "$inc" != */* ]] && continue
  [[ "$file" == */tools/cli/cmd_make_model.cpp && "$inc" == dev/make_model.h ]] && continue
  [[ "$file" == */tools/cli/cmd_serve.cpp && "$inc" == server/server.h ]] && continue
  fail "${file#$root/} includes \"$inc\": the CLI, the server and examples use only include/gemma3/ (make-model: dev/make_model.h; serve: server/server.h)"
done < <(grep -rHE '^#include "' "$root/tools/cli" "$root/tools/server" "$root/examples")

if ((fails)); then
  echo "$fails layering violation(s)"
  exit 1
fi
echo "layout: every include follows the layering"
