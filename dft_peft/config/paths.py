"""The one rule that turns a relative path in a config into an absolute one (see `load_config`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Keys holding paths: inputs must exist to be used; outputs are created by the run.
_INPUT_PATH_KEYS = (
    "base_model",
    "base_model_config",
    "tokenizer_config",
    "lora_model_dir",
    "resume_from_checkpoint",
    "deepspeed",  # a JSON file's path (a mapping is left alone)
)
_OUTPUT_PATH_KEYS = ("output_dir", "dataset_prepared_path")
DEFAULT_OUTPUT_DIR = "./model-out"


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a Jinja template or other long text is not a path
        return False


def _resolve_path(value: Any, base_dir: Path | None, *, output: bool) -> Any:
    """Apply `load_config`'s path rule to one value."""
    if not isinstance(value, str) or not value.strip() or "://" in value or "\n" in value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if base_dir is not None and _exists(base_dir / path):
        return os.path.normpath(os.path.abspath(base_dir / path))
    if _exists(path):
        return os.path.normpath(os.path.abspath(path))
    if base_dir is not None and path.parts and path.parts[0] == "..":
        return os.path.normpath(os.path.abspath(base_dir / path))
    return os.path.normpath(os.path.abspath(path)) if output else value


def resolve_paths(fields: dict[str, Any], base_dir: Path | None) -> None:
    for key in _INPUT_PATH_KEYS:
        if key in fields:
            fields[key] = _resolve_path(fields[key], base_dir, output=False)
    for key in _OUTPUT_PATH_KEYS:
        if key in fields:
            fields[key] = _resolve_path(fields[key], base_dir, output=True)
    if "output_dir" not in fields or fields["output_dir"] is None:
        fields["output_dir"] = _resolve_path(
            DEFAULT_OUTPUT_DIR, base_dir, output=True
        )
    for key in ("datasets", "test_datasets"):
        entries = fields.get(key)
        if not isinstance(entries, list):
            continue
        resolved = []
        for entry in entries:
            if isinstance(entry, Mapping) and isinstance(entry.get("path"), str):
                entry = {**entry, "path": _resolve_path(entry["path"], base_dir, output=False)}
            resolved.append(entry)
        fields[key] = resolved
    jinja = fields.get("chat_template_jinja")
    if isinstance(jinja, str) and base_dir is not None and len(jinja) < 1024:
        candidate = _resolve_path(jinja, base_dir, output=False)
        if candidate != jinja and _exists(Path(candidate)):
            fields["chat_template_jinja"] = candidate

