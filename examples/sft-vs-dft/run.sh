#!/usr/bin/env bash
# SFT vs DFT on SmolLM2-135M-Instruct, end to end on a CPU (~25 minutes on 2 shared cores):
#   1-2. `dft-peft compare dft.yml --losses sft,dft`: fine-tune a LoRA with `loss: sft` and one
#      with `loss: dft` (same config, seed, data and steps), then evaluate the base model and both
#      adapters on the first problems of gsm_test.jsonl (sft.yml stays as the single SFT run),
#   3. `dft-peft inspect` the target-token probabilities of the training rows under all three,
#   4. write results/summary.md (Markdown tables of everything above).
#
# Usage (with the project's environment active):  bash examples/sft-vs-dft/run.sh
# Knobs (environment variables): STEPS (40), LIMIT (50 problems), MAX_NEW (160 tokens),
# ROWS (64 training rows for inspect). Adapters already trained are reused (compare resumes).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
ADAPTERS="$ROOT/outputs/sft-vs-dft"   # where sft.yml / dft.yml write (their output_dir)
RESULTS="$HERE/results"
STEPS="${STEPS:-40}"
LIMIT="${LIMIT:-50}"
MAX_NEW="${MAX_NEW:-160}"
ROWS="${ROWS:-64}"

# One math thread: on a small CPU shared with other work, PyTorch's default (one thread per core)
# oversubscribes the cores and runs 5-15x slower. On a dedicated machine, export OMP_NUM_THREADS=$(nproc).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

mkdir -p "$RESULTS" "$ADAPTERS"
stage() { echo; echo "=== $* ($(date +%H:%M:%S), ${SECONDS}s elapsed)"; }

# Train sft and dft from dft.yml (same seed, rows and steps; each into $ADAPTERS/<loss>) and
# evaluate the base model and both adapters side by side: one `dft-peft compare` call. It resumes:
# a variant already trained in its folder is not trained again.
stage "compare sft,dft: $STEPS steps each, eval on $LIMIT problems (greedy, max $MAX_NEW new tokens)"
dft-peft compare "$HERE/dft.yml" --losses sft,dft \
  --eval-dataset "$ROOT/examples/data/gsm_test.jsonl" --limit "$LIMIT" --max-new-tokens "$MAX_NEW" \
  --max_steps="$STEPS" --output_dir="$ADAPTERS" 2>&1 | tee "$ADAPTERS/compare.log"
cp "$ADAPTERS/compare-eval.json" "$RESULTS/eval.json"
for loss in sft dft; do
  python - "$ADAPTERS/$loss" "$RESULTS/train-$loss.json" <<'EOF'
import json, sys
from pathlib import Path
run, out = Path(sys.argv[1]), Path(sys.argv[2])
metrics = json.loads((run / "train_metrics.json").read_text())
metrics["log_history"] = json.loads((run / "log_history.json").read_text())
out.write_text(json.dumps(metrics, indent=1) + "\n")
EOF
done

stage "inspect: p(y_t) of the first $ROWS training rows under base, sft, dft"
dft-peft inspect "$HERE/dft.yml" --compare "sft=$ADAPTERS/sft" "dft=$ADAPTERS/dft" \
  --max-rows "$ROWS" --out "$RESULTS/inspect.png"

python "$HERE/summarize.py" "$RESULTS" > "$RESULTS/summary.md"
stage "done: $RESULTS/summary.md"
cat "$RESULTS/summary.md"
