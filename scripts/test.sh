#!/usr/bin/env bash
# The README's second command: set up, then run the whole test suite, including the real
# Axolotl integration test (its own virtual environment, built once: ~5 minutes, 4.3 GB), and
# the core tests once more against Axolotl 0.19's pinned versions (transformers 5.16.1, peft
# 0.20.0, ...), which dft-peft's declared ranges admit.
# Set DFT_PEFT_SKIP_AXOLOTL=1 to skip the Axolotl environment; extra arguments go to pytest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/setup-env.sh"
# The tests never reach the real hub (the hub tests start their own stand-in server).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
cd "$REPO"
AXOLOTL_VENV="${DFT_PEFT_AXOLOTL_VENV:-$REPO/.venv-axolotl}"
if [ "${DFT_PEFT_SKIP_AXOLOTL:-0}" != 1 ]; then
    bash "$REPO/scripts/axolotl-venv.sh"
    echo "== core tests with Axolotl 0.19's dependency pins ($AXOLOTL_VENV)"
    "$AXOLOTL_VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slow and not axolotl and not gpu" tests
fi
echo "== all tests with constraints.txt ($VIRTUAL_ENV)"
python -m pytest -q "$@"
