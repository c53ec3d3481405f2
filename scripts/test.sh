#!/usr/bin/env bash
# The README's second command: set up, then run the whole test suite, including the real
# Axolotl integration test (its own virtual environment, built once: ~5 minutes, 4.3 GB).
# Set DFT_PEFT_SKIP_AXOLOTL=1 to skip building it; extra arguments go to pytest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/setup-env.sh"
cd "$REPO"
if [ "${DFT_PEFT_SKIP_AXOLOTL:-0}" != 1 ]; then
    bash "$REPO/scripts/axolotl-venv.sh"
fi
python -m pytest -q "$@"
