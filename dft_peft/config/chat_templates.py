"""Axolotl's named chat templates: which names dft-peft accepts, and their Jinja text.

The names are Axolotl 0.19's `ChatTemplate` enum and the text is Axolotl's own
(`axolotl/utils/chat_templates/templates/*.jinja`, Apache-2.0, Copyright Axolotl AI), copied
into `axolotl_chat_templates.json` by `scripts/gen_axolotl_keys.py`. A name is accepted only if
dft-peft can find its trained turns in the rendering (`tests/test_chat_templates_all.py`
tokenizes a conversation with every accepted name and checks the masks); the others are refused
with the reason.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from dft_peft.config.axolotl_keys import chat_template_names
from dft_peft.errors import did_you_mean

TEMPLATES_FILE = Path(__file__).with_name("axolotl_chat_templates.json")
TOKENIZER_DEFAULT = "tokenizer_default"
JINJA = "jinja"
FALLBACK_PREFIX = "tokenizer_default_fallback_"

# Named templates dft-peft cannot train with, and why.
REFUSED_TEMPLATES = {
    "llava": "a multimodal (image) template; dft-peft trains causal text models",
    "pixtral": "a multimodal (image) template; dft-peft trains causal text models",
    "qwen2_vl": "a multimodal (image) template; dft-peft trains causal text models",
    "llama3_2_vision": "a multimodal (image) template; dft-peft trains causal text models",
    "command_a": "it always opens a new assistant turn after the conversation, so the end of a reply "
    "cannot be told from the next turn's header",
    "command_a_rag": "renders retrieved documents the rows would have to carry; not supported",
    "command_a_tool_use": "renders tool definitions the rows would have to carry; not supported",
}


@lru_cache(maxsize=1)
def _data() -> dict:
    return json.loads(TEMPLATES_FILE.read_text(encoding="utf-8"))


def axolotl_templates() -> dict[str, str]:
    """Name -> Jinja text of every named template Axolotl ships."""
    return dict(_data()["templates"])


def axolotl_template_names() -> frozenset[str]:
    """Names Axolotl's config accepts for `chat_template:` (its ChatTemplate enum)."""
    return chat_template_names()


def accepted_template_names() -> frozenset[str]:
    """Named templates dft-peft renders: Axolotl's, minus the refused ones."""
    names = axolotl_template_names() - {TOKENIZER_DEFAULT, JINJA}
    return frozenset(n for n in names if n in _data()["templates"] and n not in REFUSED_TEMPLATES)


def template_text(name: str) -> str | None:
    """The Jinja text of an accepted named template, or None."""
    return _data()["templates"].get(name) if name in accepted_template_names() else None


def check_template_name(value: str) -> str:
    """`value` if it is a template name (or Jinja text) dft-peft can use; else a ValueError."""
    if "{%" in value or "{{" in value or value in (TOKENIZER_DEFAULT, JINJA):
        return value
    name = value.removeprefix(FALLBACK_PREFIX)
    if name in accepted_template_names():
        return value
    if name in REFUSED_TEMPLATES:
        raise ValueError(f"chat template `{name}` is not supported: {REFUSED_TEMPLATES[name]}")
    known = sorted(accepted_template_names() | {TOKENIZER_DEFAULT, JINJA})
    raise ValueError(
        f"unknown chat template `{value}`: use one of Axolotl's names ({', '.join(known)}), "
        "`tokenizer_default_fallback_<name>`, or put a Jinja template in `chat_template_jinja`."
        + did_you_mean(name, known)
    )
