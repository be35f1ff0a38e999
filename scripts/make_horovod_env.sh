#!/usr/bin/env bash
# Builds the Horovod environment: a venv with TF 2.15, Horovod 0.28.1 (gloo, no MPI) and this package.
#   bash scripts/make_horovod_env.sh [VENV]      (default: .venv-horovod beside this repository's setup.py)
# Horovod ships only as source; the build takes ~2 minutes of compiling on 2 cores the first time and needs cmake and
# g++. pip's wheel cache keeps the built wheel, so a later environment installs it in seconds.
# One build at a time per VENV (a lock beside it): a second call waits for the first, then finds the
# environment ready (a stamp of what it was built from) and returns at once. CI starts it in the
# background while the tests run; the Horovod test's own call then waits for it.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$repo/.venv-horovod}"
python="${PYTHON:-python3}"
# The compiler's optimisation level for Horovod and its Gloo (default -O2, as Horovod's own build). CI builds
# at -O1 (.ci/run): 109 against 161 CPU seconds of compiling on the 2-core machine; its tests move kilobytes.
opt_level="${SPARKML_MNIST_HOROVOD_OPT:--O2}"
case "$opt_level" in -O0|-O1|-O2|-O3|-Os) ;; *) echo "make_horovod_env: SPARKML_MNIST_HOROVOD_OPT=$opt_level is not one of -O0 -O1 -O2 -O3 -Os" >&2; exit 2 ;; esac

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
stamp="$venv/.built-from"
inputs="$( (cat "$repo/requirements/horovod-tf215.txt" "$repo/setup.py"; echo "$opt_level") | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ]; then
  echo "Horovod environment ready: $venv/bin/python (built earlier from the same requirements)"
  exit 0
fi

for tool in cmake g++; do
  command -v "$tool" >/dev/null || { echo "make_horovod_env: $tool is needed to build Horovod; install it first" >&2; exit 2; }
done
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip -q --disable-pip-version-check)
"${pip[@]}" install -r "$repo/requirements/horovod-tf215.txt"
# Horovod's setup.py configures CMake as RelWithDebInfo (-O2 -g); through this wrapper (HOROVOD_CMAKE) the
# level above without debug info: at -O2 a fifth less compiling (161 against 204 CPU seconds measured) and a
# 1 MB wheel instead of 16 MB.
real_cmake="$(command -v cmake)"
wrapper_dir="$(mktemp -d)"
trap 'rm -rf "$wrapper_dir"' EXIT
printf '%s\n' '#!/bin/sh' \
  "case \" \$* \" in *\" --build \"*|*\" --version \"*) exec \"$real_cmake\" \"\$@\" ;; esac" \
  "exec \"$real_cmake\" \"\$@\" -DCMAKE_CXX_FLAGS_RELWITHDEBINFO='$opt_level -DNDEBUG' -DCMAKE_C_FLAGS_RELWITHDEBINFO='$opt_level -DNDEBUG'" \
  > "$wrapper_dir/cmake"
chmod +x "$wrapper_dir/cmake"
# --no-build-isolation: Horovod's build imports the TF installed above to find its headers and ABI.
# pip's wheel cache is keyed by the source, not by the level: only -O2 wheels go into it and come out of it.
cache=()
[ "$opt_level" = "-O2" ] || cache=(--no-cache-dir)
HOROVOD_CMAKE="$wrapper_dir/cmake" HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}" \
  "${pip[@]}" install "${cache[@]}" --no-build-isolation -c "$repo/requirements/horovod-tf215.txt" "horovod==0.28.1"
"${pip[@]}" install -c "$repo/requirements/horovod-tf215.txt" -e "$repo"
# The check the backend itself makes (Horovod's TensorFlow ops built, TF <= 2.15), then a real import.
TF_CPP_MIN_LOG_LEVEL=2 "$venv/bin/python" -c '
import sys
from sparkml_mnist.launcher.backends.horovod import horovod_problem
problem = horovod_problem()
if problem:
    sys.exit(f"make_horovod_env: {problem}")
import horovod.tensorflow.keras
'
echo "$inputs" > "$stamp"
echo "Horovod environment ready: $venv/bin/python"
