"""The vocabulary of prompt formats: a segment is `(text, trainable)`, a format turns a row into
segments, and the registry maps each YAML `type:` name to its format. Kept apart from the formats
themselves so that `chat.py` and `alpaca_styles.py` can register theirs without importing
`formats.py`, which imports them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dft_peft.config.dataset_types import declare_format

if TYPE_CHECKING:
    from dft_peft.config.datasets import DatasetConfig

Segment = tuple[str, bool]
FormatFn = Callable[[Mapping[str, Any], "DatasetConfig", "FormatContext"], list[Segment]]

# Bump when a format's rendered text changes, so prepared-dataset caches are rebuilt.
FORMAT_VERSION = 1


class RowError(Exception):
    """A row cannot be formatted; the caller prefixes the file and row number."""


@dataclass(frozen=True)
class FormatContext:
    """What a format may need besides the row: the tokenizer's special strings and chat template."""

    tokenizer: Any
    chat_template: str | None = None

    @property
    def eos_token(self) -> str | None:
        return getattr(self.tokenizer, "eos_token", None)


FORMATS: dict[str, FormatFn] = {}
# Formats whose rendered text already carries BOS/special tokens (a chat template does), so
# tokenization must not prepend the tokenizer's BOS a second time.
RENDERS_OWN_SPECIAL_TOKENS: set[str] = set()


def register(name: str, *, renders_special_tokens: bool = False) -> Callable[[FormatFn], FormatFn]:
    """Add a format to the registry under its YAML `type:` name."""

    declare_format(name)  # the config validates `type:` against the declared names

    def deco(fn: FormatFn) -> FormatFn:
        FORMATS[name] = fn
        if renders_special_tokens:
            RENDERS_OWN_SPECIAL_TOKENS.add(name)
        return fn

    return deco


def required_text(row: Mapping[str, Any], field: str, type_name: str, hint: str = "") -> str:
    """The row's `field` as text, or a RowError that names the field and how to fix it."""
    value = row.get(field)
    if value is None:
        fix = hint or "fix the row"
        raise RowError(f"missing field '{field}' required by type: {type_name} ({fix})")
    if isinstance(value, (list, dict)):
        raise RowError(f"field '{field}' must be text for type: {type_name}, got {type(value).__name__}")
    return str(value)


def eos_segment(ctx: FormatContext, cfg: DatasetConfig, trainable: bool) -> list[Segment]:
    """The closing EOS, so the model learns to stop; `train_on_eos: none` keeps it untrained."""
    if not ctx.eos_token:
        return []
    return [(ctx.eos_token, trainable and cfg.train_on_eos != "none")]
