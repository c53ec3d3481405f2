"""How a model is named in eval and inspect reports: an adapter by its folder (and the objective
it was trained with), paths shown relative to where the user stands."""

from __future__ import annotations

import json
from pathlib import Path


def adapter_label(adapter_dir: str | Path) -> tuple[str, str]:
    """(label, folder) for `--adapter`/`--compare` values: `NAME=DIR`, or DIR labelled with the
    objective it was trained with (from dft-peft's train_metrics.json), e.g. `dft: outputs/dft`."""
    text = str(adapter_dir)
    name, sep, rest = text.partition("=")
    if sep and name and "/" not in name and not Path(text).exists():
        return name, rest
    kind = "adapter"
    metrics = Path(text, "train_metrics.json")
    if metrics.is_file():
        try:
            kind = str(json.loads(metrics.read_text()).get("loss") or kind)
        except (OSError, ValueError):
            pass
    return f"{kind}: {display_path(text)}", text


def display_path(path: str) -> str:
    """`path` relative to the current directory when it is under it (reports stay portable)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
