#!/usr/bin/env bash
# The README's first command: set up, then fine-tune SmolLM2-135M-Instruct with `loss: dft`
# (LoRA, CPU, offline) on the shipped math data. Extra arguments are passed to `dft-peft train`,
# e.g. `scripts/quickstart.sh --max_steps=5`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/setup-env.sh"
# The quickstart's model and data are on disk: offline, so nothing waits on the network.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
cd "$REPO"
dft-peft train examples/yaml/quickstart.yml "$@"
