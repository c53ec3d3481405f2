#!/usr/bin/env bash
# Release check: build the sdist and wheel, `twine check` them, look inside the wheel for every
# file the package needs, then install the wheel in a clean virtual environment through the
# notebook's own install cell and run the `dft-peft` command from it (from another folder, so the
# checkout cannot stand in for it); last, the same install from a git URL.
#
#   bash scripts/check-release.sh
#
# The clean venv gets torch first (`torch==2.13.0` is the CPU build from the machine's wheel
# folder, where a torch that pip resolves by itself pulls GBs of CUDA packages; Colab has its own),
# then the notebook's install cell installs the wheel with its declared dependencies, at
# constraints.txt's versions, from PyPI. Then `dft-peft --help`, `dft-peft export --help` and
# `import dft_peft.export.gguf` run from it. About 3 minutes on 2 cores, ~1.5 GB in a temp folder.
#
# Needs `build` and `twine` in the calling Python (the dev extra has them; PYTHON=... picks one).
# The artifacts stay in dist/ (the notebook's install cell takes the wheel's path).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PIP_DISABLE_PIP_VERSION_CHECK=1
# shellcheck source=scripts/venv-pip.sh
source "$REPO/scripts/venv-pip.sh"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
dist="$REPO/dist"
rm -rf "$dist"
start=$SECONDS

echo "== build sdist and wheel"
"$PYTHON" -m build --sdist --wheel --outdir "$dist" "$REPO" >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
wheel="$(ls "$dist"/dft_peft-*.whl)"
sdist="$(ls "$dist"/dft_peft-*.tar.gz)"
echo "   $(basename "$wheel"), $(basename "$sdist")"

echo "== twine check"
"$PYTHON" -m twine check --strict "$dist"/*

echo "== the wheel holds every file of the package"
# Every file under dft_peft/ that git knows (tracked or new), except caches, must be in the wheel.
missing="$(cd "$REPO" && git ls-files --cached --others --exclude-standard dft_peft \
    | grep -v -e '__pycache__' -e '\.pyc$' | sort \
    | comm -23 - <("$PYTHON" -c 'import sys, zipfile; print("\n".join(sorted(n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.startswith("dft_peft/"))))' "$wheel"))"
if [ -n "$missing" ]; then
    echo "missing from the wheel (add them to [tool.setuptools.package-data] in pyproject.toml):"
    echo "$missing"
    exit 1
fi

echo "== a clean venv with torch only (as on Colab), then the notebook's install cell with the wheel"
"$PYTHON" -m venv "$work/venv"
venv_pip "$work/venv" "torch==2.13.0"
"$PYTHON" - "$REPO/notebooks/dft_qlora_colab.ipynb" "dft-peft[gguf,plot] @ file://$wheel" >"$work/install_cell.py" <<'PY'
import json, re, sys
cells = json.load(open(sys.argv[1], encoding="utf-8"))["cells"]
source = next("".join(c["source"]) for c in cells if c["cell_type"] == "code" and "DFT_PEFT_SOURCE =" in "".join(c["source"]))
print(re.sub(r"^DFT_PEFT_SOURCE = .*$", lambda _: f"DFT_PEFT_SOURCE = {sys.argv[2]!r}", source, count=1, flags=re.M))
PY
# The cell's pip gets the tested versions too (on top of any constraint this machine's pip config sets).
machine_constraint="$("$PYTHON" -m pip config get global.constraint 2>/dev/null || true)"
(cd "$work" && PIP_CONSTRAINT="$machine_constraint $REPO/constraints.txt" "$work/venv/bin/python" install_cell.py 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory")

echo "== run it"
cd "$work"
"$work/venv/bin/dft-peft" --help >/dev/null
"$work/venv/bin/dft-peft" export --help | grep -q -- "--quant"
"$work/venv/bin/python" -c "import dft_peft, dft_peft.export.gguf, matplotlib; print('   dft_peft', dft_peft.__version__, 'from', dft_peft.__file__)"

echo "== the install cell's other form: a git URL (this checkout's last commit)"
# (`git+https://...` on Colab; a local `name @ git+file:///...` is refused by older pip's URL parser)
venv_pip "$work/venv" --no-deps --force-reinstall "git+file://$REPO"
"$work/venv/bin/dft-peft" --help >/dev/null
echo "release check passed in $((SECONDS - start)) s: $(basename "$wheel")"
