"""Prompt formats: one function per `type:` turning a raw row into text segments.

A segment is `(text, trainable)`. Formats only decide *what text* is shown and *which parts*
the loss may see; tokenization, masking and length handling live in `tokenize.py`, so adding a
format is one decorated function here and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dft_peft.data.spec import DatasetConfig

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


def _eos_segment(ctx: FormatContext, cfg: DatasetConfig, trainable: bool) -> list[Segment]:
    """The closing EOS, so the model learns to stop; `train_on_eos: none` keeps it untrained."""
    if not ctx.eos_token:
        return []
    return [(ctx.eos_token, trainable and cfg.train_on_eos != "none")]


# Axolotl's AlpacaPrompter (prompt_style "instruct"), verbatim: models trained with Axolotl and
# with dft-peft must see the same prompt so checkpoints and evaluations stay comparable.
ALPACA_SYSTEM_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_SYSTEM_NO_INPUT_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_PROMPT_INPUT = ALPACA_SYSTEM_PROMPT + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = ALPACA_SYSTEM_NO_INPUT_PROMPT + "### Instruction:\n{instruction}\n\n### Response:\n"


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The alpaca prompt up to `### Response:\\n`; also what generation/eval must feed the model."""
    if input:  # Axolotl treats an empty input like a missing one
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


@register("alpaca")
def alpaca(row: Mapping[str, Any], cfg: DatasetConfig, ctx: FormatContext) -> list[Segment]:
    instruction = required_text(row, "instruction", "alpaca")
    output = required_text(row, "output", "alpaca")
    input_value = row.get("input")
    prompt = alpaca_prompt(instruction, None if input_value is None else str(input_value))
    return [(prompt, False), (output, True), *_eos_segment(ctx, cfg, True)]


@register("completion")
def completion(row: Mapping[str, Any], cfg: DatasetConfig, ctx: FormatContext) -> list[Segment]:
    text = required_text(row, cfg.field, "completion", "set field: to the text column or fix the row")
    return [(text, True), *_eos_segment(ctx, cfg, True)]


@register("input_output")
def input_output(row: Mapping[str, Any], cfg: DatasetConfig, ctx: FormatContext) -> list[Segment]:
    segments = row.get("segments")
    if not isinstance(segments, list) or not segments:
        raise RowError("missing field 'segments' required by type: input_output (a list of {text, label})")
    out: list[Segment] = []
    for i, seg in enumerate(segments):
        if not isinstance(seg, Mapping) or seg.get("text") is None:
            raise RowError(f"segments[{i}] needs a 'text' (and a boolean 'label') for type: input_output")
        label = seg.get("label", True)
        if not isinstance(label, bool):
            raise RowError(f"segments[{i}].label must be true or false, got {label!r}")
        out.append((str(seg["text"]), label))
    # Axolotl appends EOS so the model learns to stop; skip it when the text already ends with it.
    if ctx.eos_token and not out[-1][0].endswith(ctx.eos_token):
        out.extend(_eos_segment(ctx, cfg, out[-1][1]))
    return out


@register("chat_template", renders_special_tokens=True)
def chat_template(row: Mapping[str, Any], cfg: DatasetConfig, ctx: FormatContext) -> list[Segment]:
    from dft_peft.data.chat import chat_segments  # chat rendering is big enough for its own module

    return chat_segments(row, cfg, ctx)


from dft_peft.data import alpaca_styles  # noqa: E402,F401  (registers Axolotl's other alpaca styles)
