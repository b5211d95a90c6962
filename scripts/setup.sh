#!/usr/bin/env bash
# Installs loracast's engine, libtorch from PyPI's pinned torch wheel (SPEC §4), into a versioned
# venv cache outside the checkout, and links it into the repo as ./.venv and ./.libtorch (which
# .cargo/config.toml points LIBTORCH at). Idempotent: a second run only re-links.
#   scripts/setup.sh         torch only: enough to build, test and run loracast
#   scripts/setup.sh --dev   + diffusers/transformers/peft: regenerate fixtures, run benchmarks
#   scripts/setup.sh --cuda  + the two CUDA header packages the wheel's dependencies lack, for
#                            `cargo build --features cuda` (the c10d bridge's NCCL path); flags combine
set -euo pipefail
TORCH_VERSION=2.13.0
dev=0 cuda=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --cuda) cuda=1 ;;
    *) echo "setup: unknown option $arg (expected --dev and/or --cuda)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
cache="${LORACAST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/loracast}"
venv="$cache/venv-torch$TORCH_VERSION"
if [ ! -f "$venv/.ok-torch" ]; then
  echo "setup: installing torch==$TORCH_VERSION into $venv (once per machine, ~3 GB)" >&2
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION"
  touch "$venv/.ok-torch"
fi
if [ "$dev" = 1 ] && [ ! -f "$venv/.ok-dev" ]; then
  echo "setup: installing the Python reference (diffusers, transformers, peft)" >&2
  # The constraint keeps pip from "upgrading" the pinned torch through a dependency.
  echo "torch==$TORCH_VERSION" > "$venv/constraints.txt"
  "$venv/bin/pip" install -q --disable-pip-version-check -c "$venv/constraints.txt" \
    diffusers==0.42.1 transformers==5.23.0 peft==0.21.2 safetensors==0.8.0 pillow numpy
  touch "$venv/.ok-dev"
fi
if [ "$cuda" = 1 ] && [ ! -f "$venv/.ok-cuda" ]; then
  # crt/host_config.h and nv/target, which <cuda_runtime.h> includes: the versions pinned in the
  # wheel's cuda_toolkit-13.0.3.0 metadata (torch 2.13.0+cu130). Headers only.
  echo "setup: installing the CUDA 13.0 headers for the NCCL path (nvidia-cuda-crt, nvidia-cuda-cccl)" >&2
  echo "torch==$TORCH_VERSION" > "$venv/constraints.txt"
  "$venv/bin/pip" install -q --disable-pip-version-check -c "$venv/constraints.txt" \
    nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
  touch "$venv/.ok-cuda"
fi
ln -sfn "$venv" .venv
torch_dir=$("$venv/bin/python" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torch").origin))')
ln -sfn "$torch_dir" .libtorch
