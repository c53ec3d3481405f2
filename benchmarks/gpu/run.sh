#!/usr/bin/env bash
# Everything dft-peft claims about CUDA, on a bare CUDA machine with PyTorch and no network:
#
#   bash benchmarks/gpu/fetch-wheels.sh          # once, on a machine with PyPI: fills .whl/
#   bash benchmarks/gpu/run.sh [OUT_DIR]         # on the GPU machine (default OUT_DIR: $OUT or
#                                                # benchmarks/gpu/results)
#
# 1. installs, from the wheel folder only (pip --no-index), the requirements this Python lacks
#    or has outside dft-peft's ranges (benchmarks/gpu/needs.py decides; the machine's own torch,
#    transformers, accelerate and peft are kept where they fit), into a private --target folder,
#    and puts dft-peft itself on PYTHONPATH (nothing is built);
# 2. runs the GPU tests (`pytest -m gpu tests/test_gpu.py`);
# 3. runs benchmarks/gpu/loss.py and benchmarks/gpu/e2e.py;
# 4. writes OUT_DIR/results.json and OUT_DIR/results.md (benchmarks/gpu/report.py), beside
#    env.json, pytest.xml, loss.json, e2e.json and run.log (7 files).
#
# Each stage has its own time limit so the whole run ends within 10 minutes on an H100/H200;
# a stage that fails or times out is recorded and the next one still runs. Environment:
#   WHEELS   wheel folder (default .whl)          PYTHON  interpreter (default python3)
#   SITE     where missing wheels are installed   E2E_ARGS / LOSS_ARGS  extra benchmark flags
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-${OUT:-benchmarks/gpu/results}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WHEELS="${WHEELS:-.whl}"
PY="${PYTHON:-python3}"
SITE="${SITE:-/tmp/dft-peft-site}"
LOG="$OUT_DIR/run.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
declare -A STAGES=()

say() { echo "== $*" | tee -a "$LOG"; }

write_env() {  # GPU, versions and the stage exit codes so far
  local stages="{" k sep=""
  for k in "${!STAGES[@]}"; do stages+="$sep\"$k\": ${STAGES[$k]}"; sep=", "; done
  stages+="}"
  "$PY" - "$OUT_DIR/env.json" "$stages" <<'EOF' 2>>"$LOG" || true
import json, sys
from importlib import metadata
info = {}
try:
    import torch
    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, total_memory=p.total_memory, capability=f"{p.major}.{p.minor}")
except Exception as exc:  # noqa: BLE001
    info["error"] = repr(exc)
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "datasets", "liger-kernel", "flash-attn"):
    try:
        info[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        info[name] = None
json.dump({"gpu": info, "stages": json.loads(sys.argv[2])}, open(sys.argv[1], "w"), indent=2)
EOF
}

stage() {  # stage NAME SECONDS COMMAND...
  local name="$1" limit="$2"; shift 2
  say "$name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  STAGES[$name]=${PIPESTATUS[0]}
  say "$name exit ${STAGES[$name]}"
  write_env
}

# --- 1. install what is missing, from the wheel folder only ---------------------------------------
say "python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
mapfile -t MISSING < <("$PY" benchmarks/gpu/needs.py "$ROOT")
if ((${#MISSING[@]})); then
  say "missing or out of range here: ${MISSING[*]}"
  FILES=()
  for name in "${MISSING[@]}"; do
    pattern="$(echo "$name" | tr '-' '_')"
    found="$(ls "$WHEELS"/ 2>/dev/null | grep -i "^${pattern}-[0-9]" | head -1)"
    if [[ -n "$found" ]]; then FILES+=("$WHEELS/$found"); else say "no wheel for $name in $WHEELS (run fetch-wheels.sh)"; fi
  done
  if ((${#FILES[@]})); then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${FILES[@]}" 2>&1 | tee -a "$LOG"
    STAGES[install]=${PIPESTATUS[0]}
  fi
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
write_env
nvidia-smi -L 2>&1 | tee -a "$LOG" || true
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  say "no CUDA GPU visible to $PY: run.sh measures a CUDA machine (CPU checks: pytest, and the benchmarks' --smoke)"
  "$PY" benchmarks/gpu/report.py "$OUT_DIR" >>"$LOG" 2>&1
  exit 2
fi

# --- 2. GPU tests ------------------------------------------------------------------------------------
stage tests 240 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider --junitxml "$OUT_DIR/pytest.xml"

# --- 3. benchmarks -----------------------------------------------------------------------------------
# shellcheck disable=SC2086
stage loss 90 "$PY" benchmarks/gpu/loss.py --json "$OUT_DIR/loss.json" ${LOSS_ARGS:-}
# shellcheck disable=SC2086
stage e2e 240 "$PY" benchmarks/gpu/e2e.py --json "$OUT_DIR/e2e.json" ${E2E_ARGS:-}

# --- 4. one JSON, one Markdown table -----------------------------------------------------------------
"$PY" benchmarks/gpu/report.py "$OUT_DIR" 2>&1 | tee -a "$LOG"
say "results: $OUT_DIR/results.md"
cat "$OUT_DIR/results.md"
