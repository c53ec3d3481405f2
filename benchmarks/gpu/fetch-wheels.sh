#!/usr/bin/env bash
# Fill the wheel folder that benchmarks/gpu/run.sh installs from on a GPU machine without network.
#
#   bash benchmarks/gpu/fetch-wheels.sh            # into .whl/ (WHEELS=... to change)
#
# Run it on a machine with PyPI. It downloads manylinux x86_64 wheels for the GPU machine's
# Python (PY_VERSION, default 3.12: the lent H100/H200 image's python3), without dependencies,
# of exactly what that image lacks (its package list: the device tool's KINDS.md). It keeps the
# machine's own torch, transformers, accelerate, peft, safetensors, pyyaml and huggingface-hub,
# which dft-peft's ranges admit, so the folder stays well under the 64 MiB a device call carries
# (bitsandbytes alone is ~43 MB). Versions are the ones constraints.txt pins where it pins them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
WHEELS="${WHEELS:-.whl}"
PY_VERSION="${PY_VERSION:-3.12}"
PIP="${PIP:-python3 -m pip}"
mkdir -p "$WHEELS"
# Keep the folder out of git (it travels to the device as a carried path, not as a tracked file).
if [[ "$WHEELS" != /* && -d .git ]] && ! grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null; then
  echo "/$WHEELS/" >>.git/info/exclude
fi

pin() {  # the version constraints.txt pins for $1, else $2
  local v
  v="$(grep -i "^$1==" constraints.txt | head -1 | cut -d= -f3 || true)"
  echo "${v:-$2}"
}

# What the GPU image lacks (not in KINDS.md's list): pydantic (+ its own needs), datasets (+ dill,
# multiprocess), bitsandbytes, liger-kernel (the Liger comparison in loss.py).
PACKAGES=(
  "bitsandbytes==$(pin bitsandbytes 0.50.2)"
  "pydantic==$(pin pydantic 2.14.3)"
  "pydantic-core==$(pin pydantic-core 2.50.4)"
  "annotated-types==$(pin annotated-types 0.8.0)"
  "typing-inspection==$(pin typing-inspection 0.4.5)"
  "datasets==$(pin datasets 5.2.0)"
  "dill==$(pin dill 0.4.1)"
  "multiprocess==$(pin multiprocess 0.70.19)"
  "liger-kernel==$(pin liger-kernel 0.8.1)"  # the version Axolotl 0.19 pins
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
for spec in "${PACKAGES[@]}"; do
  # one at a time: a package that has moved on (a missing pin) does not stop the others
  $PIP download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${PLATFORMS[@]}" -d "$WHEELS" "$spec" || echo "fetch-wheels: could not fetch $spec" >&2
done
# One version of each: two wheels of one package stop the whole install on the GPU machine.
ls "$WHEELS"/*.whl | sed -E 's#.*/([^-]+)-.*#\1#' | sort | uniq -d | while read -r dup; do
  echo "fetch-wheels: more than one wheel of $dup in $WHEELS; keep one" >&2
done
du -ch "$WHEELS"/*.whl | tail -1 | sed "s#total#in $WHEELS (the device carries at most 64 MiB with the tree)#"
