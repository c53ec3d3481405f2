"""Prompt formats: one function per `type:` turning a raw row into text segments.

A segment is `(text, trainable)`. Formats only decide *what text* is shown and *which parts*
the loss may see; tokenization, masking and length handling live in `tokenize.py`, so adding a
format is one decorated function here (and its name in `config/dataset_types.py`). The
registry itself is `segments.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dft_peft.data import alpaca_styles  # noqa: F401  (registers Axolotl's other alpaca styles)
from dft_peft.data.chat import chat_segments
from dft_peft.data.segments import (  # noqa: F401  (the registry's names, re-exported for the data room)
    FORMAT_VERSION,
    FORMATS,
    RENDERS_OWN_SPECIAL_TOKENS,
    FormatContext,
    FormatFn,
    RowError,
    Segment,
    eos_segment,
    register,
    required_text,
)

if TYPE_CHECKING:
    from dft_peft.config.datasets import DatasetConfig

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
    return [(prompt, False), (output, True), *eos_segment(ctx, cfg, True)]


@register("completion")
def completion(row: Mapping[str, Any], cfg: DatasetConfig, ctx: FormatContext) -> list[Segment]:
    text = required_text(row, cfg.field, "completion", "set field: to the text column or fix the row")
    return [(text, True), *eos_segment(ctx, cfg, True)]


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
        out.extend(eos_segment(ctx, cfg, out[-1][1]))
    return out


@register("chat_template", renders_special_tokens=True)
def chat_template(row: Mapping[str, Any], cfg: DatasetConfig, ctx: FormatContext) -> list[Segment]:
    return chat_segments(row, cfg, ctx)
