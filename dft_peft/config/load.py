"""Reading a YAML file into a checked `Config`: keys sorted, paths resolved, errors in one line."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dft_peft.config.axolotl_translate import translate_axolotl
from dft_peft.config.keys import check_override_key, drop_axolotl_plugins, sort_keys
from dft_peft.config.checks import check_raw_values, warn_questionable
from dft_peft.config.messages import describe_validation_error, primary_error, yaml_error_location, yaml_problem
from dft_peft.config.paths import resolve_paths
from dft_peft.config.schema import ConfigSchema
from dft_peft.errors import UserError
from dft_peft.losses.registry import validate_loss_params


class Config(ConfigSchema):
    """A validated run configuration; field names, defaults and meanings follow Axolotl.

    Build one with `load_config(path)` or `Config.from_dict(mapping)`: they also run the
    unknown-key checks, resolve relative paths and validate the objective's parameters, which
    plain `Config(...)` does not.
    """

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        source: str | Path = "config",
        base_dir: str | Path | None = None,
        overrides: list[str] | Mapping[str, Any] | None = None,
    ) -> Config:
        """Validate a parsed YAML mapping: key checks, path resolution, objective parameters."""
        return build_config(data, source=source, base_dir=base_dir, overrides=overrides)


def load_config(path: str | Path, overrides: list[str] | Mapping[str, Any] | None = None) -> Config:
    """Read, check and resolve a YAML config file.

    `overrides` are command-line settings, `["learning_rate=1e-4", "max_steps=5"]` (a leading
    `--` is allowed) or a dict; values are parsed as YAML so numbers and booleans get their type.
    They replace the file's values and go through the same key checks.

    Relative paths (`base_model` when it is a local path, every dataset `path`, `output_dir`,
    `lora_model_dir`, `dataset_prepared_path`, `tokenizer_config`, `base_model_config`,
    `resume_from_checkpoint`) are resolved by one rule:

    1. if the path exists relative to the config file's folder, that is it;
    2. else if it exists relative to the current directory, that is it;
    3. else, for a path that does not exist yet: one starting with `../` is taken relative to the
       config file's folder (it can only have been written from the file's point of view); an
       output path is taken relative to the current directory, as Axolotl does for
       `output_dir: ./outputs/out`; any other input is left as written (a hub id such as
       `NousResearch/Meta-Llama-3-8B`, or a missing file the loader will report).

    Values with a scheme (`pkg://...`, `hf://...`) and absolute paths are left alone.
    """
    path = Path(path).expanduser()
    label = path.name
    if not path.exists():
        raise UserError(f"config file not found: {path} (relative paths start from {Path.cwd()}).")
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass the YAML config file inside it.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(
            f"{yaml_error_location(path, exc)}: YAML syntax error: {yaml_problem(exc)}; "
            "check indentation, colons and quotes."
        ) from None
    if data is None:
        raise UserError(f"{label}: the file is empty; add `key: value` lines (`base_model: ...`).")
    if not isinstance(data, dict):
        raise UserError(
            f"{label}: the top level must be `key: value` lines, not a {type(data).__name__}."
        )
    _check_duplicate_keys(text, path)
    return build_config(data, source=path, base_dir=path.parent, overrides=overrides)


def parse_overrides(overrides: list[str] | Mapping[str, Any]) -> dict[str, Any]:
    """`["--max_steps=5", "bf16=false"]` -> {"max_steps": 5, "bf16": False}: values are YAML."""
    if isinstance(overrides, Mapping):
        return dict(overrides)
    parsed: dict[str, Any] = {}
    for item in overrides:
        text = str(item).lstrip("-")
        key, sep, value = text.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"override `{item}` must look like `key=value` (e.g. `--max_steps=5`).")
        try:
            parsed[key] = yaml.safe_load(value) if value.strip() else None  # `--key=`: unset
        except yaml.YAMLError:
            raise UserError(f"command-line override `--{key}={value}`: the value is not valid YAML; quote it.") from None
    return parsed


def override_label(key: str, value: Any) -> str:
    """How an error names a value that came from the command line rather than the YAML file."""
    text = "true" if value is True else "false" if value is False else "null" if value is None else str(value)
    hint = f" (`--{key}` with no value means true)" if value is True else ""
    return f"command-line override `--{key}={text}`{hint}"


def _label_for(key: Any, label: str, over: Mapping[str, Any]) -> str:
    return override_label(key, over[key]) if isinstance(key, str) and key in over else label



def build_config(
    data: Mapping[str, Any],
    *,
    source: str | Path = "config",
    base_dir: str | Path | None = None,
    overrides: list[str] | Mapping[str, Any] | None = None,
) -> Config:
    """Validate a parsed YAML mapping: key checks, path resolution, objective parameters.

    `source` names the file in error messages; `base_dir` is the folder relative paths are
    tried against first (see `load_config`).
    """
    label = Path(source).name if isinstance(source, Path) else str(source)
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise UserError(f"{label}: the top level must be `key: value` lines, not a {kind}.")
    raw = dict(data)
    over: dict[str, Any] = {}
    if overrides:
        over = parse_overrides(overrides)
        for key in over:
            check_override_key(key)
        raw.update(over)
    check_raw_values(raw, _label_for("loss", label, over))

    strict = raw.get("strict", True)
    if strict is None:
        strict = True
    if not isinstance(strict, bool):
        raise UserError(f"{label}: `strict` must be true or false (got {strict!r}).")

    try:
        mapped = translate_axolotl(raw)  # FSDP1 -> FSDP2, xformers -> sdpa: the same computation
    except UserError as exc:
        raise UserError(f"{label}: {exc}") from None
    fields, loss_params, ignored = sort_keys(raw, label, strict)
    ignored.update(mapped)
    fields = drop_axolotl_plugins(fields, label, strict, ignored)
    resolve_paths(fields, Path(base_dir) if base_dir is not None else None)

    try:
        cfg = Config.model_validate(fields)
    except ValidationError as exc:
        key = (primary_error(exc).get("loc") or (None,))[0]
        raise UserError(f"{_label_for(key, label, over)}: {describe_validation_error(exc)}") from None

    try:
        cfg._loss_params = validate_loss_params(cfg.loss, loss_params)
    except UserError as exc:
        named = next((k for k in loss_params if k in over and f"`{k}`" in str(exc)), "loss")
        raise UserError(f"{_label_for(named, label, over)}: {exc}") from None
    warn_questionable(cfg)
    cfg._ignored = ignored
    cfg._source = Path(source).resolve() if isinstance(source, Path) else None
    return cfg


def _check_duplicate_keys(text: str, path: Path) -> None:
    """A key written twice silently keeps the last value in YAML; make it an error instead."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                    line = key_node.start_mark.line + 1
                    if key_node.value in seen:
                        raise UserError(
                            f"{path}:{line}: `{key_node.value}` is set twice (lines "
                            f"{seen[key_node.value]} and {line}); keep one."
                        )
                    seen[key_node.value] = line
                stack.append(value_node)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
