#!/usr/bin/env bash
# Create (or reuse) the virtual environment in which dft-peft's Axolotl integration
# is tested: Axolotl 0.19.0 with its own pins (transformers 5.16.1, peft 0.20.0, ...),
# CPU torch 2.13.0, and this checkout of dft-peft installed editable on top.
#
#   scripts/axolotl-venv.sh        # -> $DFT_PEFT_AXOLOTL_VENV, default <repo>/.venv-axolotl
#
# A venv that already imports axolotl 0.19.0 is reused (seconds); only the editable
# dft-peft install is redone when it points at another checkout. A fresh build takes
# about 5 minutes and 4.3 GB (triton, xformers, ... come along with Axolotl even on CPU).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DFT_PEFT_AXOLOTL_VENV:-$REPO/.venv-axolotl}"
PYTHON="${PYTHON:-python3}"
AXOLOTL_VERSION="0.19.0"
TORCH_VERSION="2.13.0"
CONSTRAINTS="$REPO/constraints-axolotl.txt"
export AXOLOTL_DO_NOT_TRACK=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

# shellcheck source=scripts/venv-pip.sh
source "$REPO/scripts/venv-pip.sh"
vpip() { venv_pip "$VENV" "$@"; }

axolotl_ready() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "$AXOLOTL_VERSION" "$TORCH_VERSION" <<'PY' >/dev/null 2>&1
import sys, importlib.metadata as md
assert md.version("axolotl") == sys.argv[1]
assert md.version("torch").split("+")[0] == sys.argv[2]
import pytest, matplotlib, gguf  # noqa: F401,E401
import axolotl.integrations.base  # noqa: F401
PY
}

dft_peft_here() {
    # From /, so that the checkout in the current directory cannot stand in for an install.
    (cd / && "$VENV/bin/python" - "$REPO") <<'PY' >/dev/null 2>&1
import sys, pathlib, importlib.util
spec = importlib.util.find_spec("dft_peft")
locations = [pathlib.Path(p).resolve() for p in spec.submodule_search_locations]
assert pathlib.Path(sys.argv[1], "dft_peft").resolve() in locations
PY
}

start=$(date +%s)
if axolotl_ready; then
    echo "axolotl-venv: reusing $VENV (axolotl $AXOLOTL_VERSION)"
    built=0
else
    echo "axolotl-venv: building $VENV (about 5 minutes)"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    # 1. torch FIRST and pinned: from the machine's local wheel folder this is the CPU
    #    build; a ranged torch would pull GBs of CUDA wheels from the index.
    vpip "torch==$TORCH_VERSION"
    # 2. Axolotl and its dependencies at the recorded versions (torch held in place).
    #    pytest, matplotlib and gguf let dft-peft's own test suite run here as well.
    vpip -c "$CONSTRAINTS" "axolotl==$AXOLOTL_VERSION" pytest matplotlib gguf
    built=1
fi

if ! dft_peft_here; then
    # 3. dft-peft itself, editable and without dependencies: Axolotl's pins win.
    vpip --no-deps -e "$REPO"
fi

if { [ "$built" = 1 ] && ! axolotl_ready; } || ! dft_peft_here; then
    echo "axolotl-venv: $VENV is not usable (axolotl $AXOLOTL_VERSION + dft_peft from $REPO)" >&2
    exit 1
fi
echo "axolotl-venv: ready in $(($(date +%s) - start))s: $VENV"
