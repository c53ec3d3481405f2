"""Which of dft-peft's requirements this Python lacks or has outside our ranges.

    python benchmarks/gpu/needs.py            # prints one distribution name per line

Reads `[project] dependencies` from pyproject.toml plus the GPU run's extras (liger-kernel, for
the Liger comparison), so run.sh installs from the wheel folder only what the machine is missing
and keeps its own torch, transformers, accelerate and peft where our ranges admit them.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

EXTRAS = ["liger-kernel>=0.6", "pytest>=8"]
# What `datasets` and `pydantic` need that a CUDA image without them usually also lacks.
INDIRECT = {
    "datasets": ["dill", "multiprocess"],
    "pydantic": ["pydantic-core", "annotated-types", "typing-inspection"],
}


def needed(root: Path) -> list[str]:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    missing: list[str] = []
    for line in [*project["dependencies"], *EXTRAS]:
        req = Requirement(line)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            version = None
        if version is None or not req.specifier.contains(version, prereleases=True):
            missing.append(req.name)
            for dep in INDIRECT.get(req.name, []):
                try:
                    metadata.version(dep)
                except metadata.PackageNotFoundError:
                    missing.append(dep)
    return missing


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]
    print("\n".join(needed(root)))
