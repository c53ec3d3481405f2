"""Axolotl's other alpaca prompt styles: `alpaca:chat`, `alpaca:chatml`, `alpaca:phi`, and the
`alpaca_chat` / `alpaca_instruct` strategy variants (no system line, concise).

The text is Axolotl's `AlpacaPrompter` (axolotl/prompters.py, 0.19) verbatim, quirks included
(`alpaca:phi` with an input puts it after `<|end|>` without a newline), so a model trained here
sees what it would see trained by Axolotl. `type: alpaca` itself lives in formats.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dft_peft.data.segments import FormatContext, Segment, eos_segment, register, required_text

if TYPE_CHECKING:
    from dft_peft.config.datasets import DatasetConfig

SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
SYSTEM_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
CONCISE = (
    "Below is an instruction from a USER that describes a task, paired with an input that provides further "
    "context. The ASSISTANT writes a response that concisely and appropriately completes the request.\n\n"
)
CONCISE_NO_INPUT = (
    "Below is an instruction from a USER that describes a task. The ASSISTANT writes a response that "
    "appropriately and concisely completes the request.\n\n"
)


@dataclass(frozen=True)
class PromptStyle:
    """Axolotl's PromptStyle formats: (system, turn with input, turn without input)."""

    system_format: str
    turn_format: str
    turn_no_input_format: str


STYLES = {
    "instruct": PromptStyle(
        "{system}\n\n",
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "chat": PromptStyle("SYSTEM: {system}\n", "USER: {instruction}\n{input}\nASSISTANT:", "USER: {instruction}\nASSISTANT:"),
    "chatml": PromptStyle(
        "<|im_start|>system\n{system}<|im_end|>\n",
        "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
    ),
    "phi": PromptStyle(
        "<|system|>\n{system}<|end|>\n",
        "<|user|>\n{instruction}<|end|>{input}<|assistant|>",
        "<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
    ),
}


def styled_prompt(style: str, instruction: str, input: str | None, system: str, system_no_input: str) -> str:
    """Axolotl's AlpacaPrompter._build_result without the output."""
    fmt = STYLES[style]
    if input:
        head = fmt.system_format.format(system=system) if system else ""
        return head + fmt.turn_format.format(instruction=instruction, input=input)
    head = fmt.system_format.format(system=system_no_input) if system_no_input else ""
    return head + fmt.turn_no_input_format.format(instruction=instruction)


# type name -> (style, system line, system line without input), for prompts at generation time.
ALPACA_STYLE_TYPES: dict[str, tuple[str, str, str]] = {}


def prompt_for(type_name: str, instruction: str, input: str | None = None) -> str:
    """The prompt of an alpaca-style `type:` up to where the answer starts (generate / eval)."""
    style, system, system_no_input = ALPACA_STYLE_TYPES[type_name]
    return styled_prompt(style, instruction, input, system, system_no_input)


def _register(name: str, style: str, system: str = SYSTEM, system_no_input: str = SYSTEM_NO_INPUT) -> None:
    ALPACA_STYLE_TYPES[name] = (style, system, system_no_input)

    def fmt(row: Mapping[str, Any], cfg: DatasetConfig, ctx: FormatContext) -> list[Segment]:
        instruction = required_text(row, "instruction", name)
        output = required_text(row, "output", name)
        value = row.get("input")
        prompt = styled_prompt(style, instruction, None if value is None else str(value), system, system_no_input)
        return [(prompt, False), (output, True), *eos_segment(ctx, cfg, True)]

    fmt.__name__ = fmt.__qualname__ = name.replace(":", "_").replace(".", "_")
    register(name)(fmt)


for _style in ("chat", "chatml", "phi"):
    _register(f"alpaca:{_style}", _style)
_register("alpaca_instruct.load_no_prompt", "instruct", "", "")
_register("alpaca_chat.load_no_prompt", "chat", "", "")
_register("alpaca_chat.load_concise", "chat", CONCISE, CONCISE_NO_INPUT)
