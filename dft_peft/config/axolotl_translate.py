"""Axolotl settings that ask for something dft-peft does under another name, rewritten before
validation, each with the one note `validate` shows ("mapped: ...").

Kept apart from `normalize.py` (alternative spellings of one field, silently folded): what is
translated here runs differently from how Axolotl runs it (another FSDP version, another
attention kernel) while computing the same thing, and the user is told so.
"""

from __future__ import annotations

from typing import Any

from dft_peft.config.fsdp_legacy import translate_legacy_fsdp

MAPPED = "mapped: "
XFORMERS_NOTE = "xformers attention runs as sdpa (PyTorch's memory-efficient kernels, the same attention)"


def translate_xformers(raw: dict[str, Any]) -> str | None:
    """`xformers_attention: true` / `attn_implementation: xformers` -> sdpa."""
    flag = raw.get("xformers_attention")
    if flag is True:
        del raw["xformers_attention"]
        if raw.get("attn_implementation") in (None, "xformers", "sdpa"):
            raw["attn_implementation"] = "sdpa"
            return XFORMERS_NOTE
        raw["xformers_attention"] = flag  # conflicts with another choice: the key table says so
        return None
    if raw.get("attn_implementation") == "xformers":
        raw["attn_implementation"] = "sdpa"
        return XFORMERS_NOTE
    return None


def translate_axolotl(raw: dict[str, Any]) -> dict[str, str]:
    """Rewrite `raw` in place; {key: note} for each translation made."""
    notes: dict[str, str] = {}
    for key, translate in (("fsdp", translate_legacy_fsdp), ("xformers_attention", translate_xformers)):
        note = translate(raw)
        if note:
            notes[key] = MAPPED + note
    return notes
