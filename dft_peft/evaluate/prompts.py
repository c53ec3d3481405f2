"""Eval prompts built the way training built them: the config's first dataset entry decides
(Alpaca prompt in any of its styles, or the chat template with the user turn)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dft_peft.data.alpaca_styles import ALPACA_STYLE_TYPES, prompt_for
from dft_peft.data.chat import resolve_chat_template
from dft_peft.data.formats import alpaca_prompt
from dft_peft.errors import UserError

def _user_text(row: Mapping[str, Any], where: str) -> str:
    for key in ("instruction", "question", "problem", "prompt"):
        if row.get(key):
            text = str(row[key])
            if key == "instruction" and row.get("input"):
                text += "\n\n" + str(row["input"])
            return text
    raise UserError(f"{where}: no problem text (an `instruction`, `question` or `problem` field)")


def build_prompt(row: Mapping[str, Any], entry: Any, tokenizer: Any, chat_template: str | None, where: str) -> str:
    """The prompt text the model saw in training, up to where its answer starts."""
    if entry.type == "alpaca":
        if row.get("instruction") is None:
            raise UserError(f"{where}: missing field 'instruction' (the dataset is formatted as type: alpaca)")
        return alpaca_prompt(str(row["instruction"]), None if row.get("input") is None else str(row["input"]))
    if entry.type in ALPACA_STYLE_TYPES:  # alpaca:phi, alpaca:chatml, ...: Axolotl's other styles
        if row.get("instruction") is None:
            raise UserError(f"{where}: missing field 'instruction' (the dataset is formatted as type: {entry.type})")
        return prompt_for(entry.type, str(row["instruction"]), None if row.get("input") is None else str(row["input"]))
    if entry.type == "chat_template":
        raw = row.get(entry.field_messages)
        if isinstance(raw, list) and raw:
            messages = [
                {"role": entry.canonical_role(str(m[entry.role_key])), "content": str(m[entry.content_key])}
                for m in raw
            ]
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()  # the reference answer: the model writes its own
            if not messages:
                raise UserError(f"{where}: no user message before the assistant's answer")
        else:
            messages = [{"role": "user", "content": _user_text(row, where)}]
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )
    raise UserError(
        f"eval builds prompts for dataset types alpaca and chat_template; the config's first dataset is "
        f"type: {entry.type}"
    )


def training_chat_template(cfg: Any, entry: Any, tokenizer: Any) -> str | None:
    """The chat template the dataset entry was trained with (None for non-chat formats)."""
    if entry.type != "chat_template":
        return None
    return resolve_chat_template(entry.chat_template or cfg.chat_template_jinja or cfg.chat_template, tokenizer, "eval")


def training_prompt(cfg: Any, tokenizer: Any, text: str) -> str:
    """A free-text question formatted like the config's first dataset at training time, so that
    `dft-peft generate` asks in the format the adapter learned (alpaca or the chat template)."""
    entry = cfg.datasets[0]
    if entry.type not in ("alpaca", "chat_template") and entry.type not in ALPACA_STYLE_TYPES:
        return text
    template = training_chat_template(cfg, entry, tokenizer)
    return build_prompt({"instruction": text}, entry, tokenizer, template, "--prompt")
