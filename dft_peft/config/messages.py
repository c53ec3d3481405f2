"""pydantic's and PyYAML's multi-line reports -> one line naming the key, the problem and the value."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dft_peft.config.datasets import DatasetConfig
from dft_peft.config.schema import ConfigSchema, SpecialTokens
from dft_peft.errors import did_you_mean


_TYPE_PHRASES = {
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be text",
    "list_type": "must be a list (one `- item` per line)",
    "dict_type": "must be a mapping of `key: value` lines",
    "model_type": "must be a mapping of `key: value` lines",
    "model_attributes_type": "must be a mapping of `key: value` lines",
    "too_short": "must not be empty",
}

_REQUIRED_HINTS = {
    "base_model": "set a Hugging Face model id, a local folder or pkg://<package>/<file>.gguf",
    "learning_rate": "Axolotl has no default either; add e.g. `learning_rate: 2e-4`",
    "datasets": "add at least one entry, e.g. `- path: data/train.jsonl` with `type: alpaca`",
}

# Pieces of a pydantic error location that name a union branch, not a key.
_LOC_NOISE = re.compile(r"^(int|float|str|bool|list|dict|none|function-.*|[a-z_]+\[.*\])$")


def _format_loc(loc: Iterable[Any]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and not _LOC_NOISE.match(part):
            text += f".{part}" if text else part
    return text


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _model_for(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    if loc and loc[0] in ("datasets", "test_datasets"):
        return DatasetConfig
    if loc and loc[0] == "special_tokens":
        return SpecialTokens
    return ConfigSchema


def primary_error(exc: ValidationError) -> dict[str, Any]:
    """The error to report: a misspelled key (`pth:`) before the `path is required` it causes."""
    errors = exc.errors()
    return next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])


def describe_validation_error(exc: ValidationError) -> str:
    """pydantic's multi-line report -> one line naming the key, what is wrong and the value."""
    err = primary_error(exc)
    loc = tuple(err.get("loc", ()))
    key = _format_loc(loc)
    kind = err.get("type", "")
    got = f" (got {_short_repr(err['input'])})" if "input" in err else ""
    ctx = err.get("ctx") or {}

    if kind in ("value_error", "assertion_error"):
        message = str(ctx.get("error", err.get("msg", ""))).removeprefix("Value error, ")
        if not key:
            return message
        text = f"`{key}`: {message}{'' if '`' in message else got}"
        return text if text.endswith((".", "?")) else text + "."
    if kind == "missing":
        hint = _REQUIRED_HINTS.get(key, "add it")
        return f"`{key}` is required: {hint}."
    if kind == "extra_forbidden":
        model = _model_for(loc)
        last = loc[-1] if loc else key
        what = "dataset key" if model is DatasetConfig else "key"
        names = set(model.model_fields) if model is not None else set()
        return f"`{key}` is not a valid {what}.{did_you_mean(str(last), names)}"
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "")
        return f"`{key}` must be one of {expected}{got}."
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        symbol = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
                  "less_than": "<"}[kind]
        bound = next(iter(ctx.values()), "?")
        return f"`{key}` must be {symbol} {bound}{got}."
    phrase = _TYPE_PHRASES.get(kind, err.get("msg", "is invalid").lower())
    return f"`{key}` {phrase}{got}."


def yaml_error_location(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return str(path)
    return f"{path}:{mark.line + 1}:{mark.column + 1}"


def yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{problem} ({context})" if context else str(problem)
    return " ".join(text.split())

