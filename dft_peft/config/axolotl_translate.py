"""Axolotl settings that ask for something dft-peft does under another name, rewritten before
validation, each with the one note `validate` shows ("mapped: ...").

Kept apart from `normalize.py` (alternative spellings of one field, silently folded): what is
translated here runs differently from how Axolotl runs it (another FSDP version, another
attention kernel) while computing the same thing, and the user is told so.
"""

from __future__ import annotations

import re
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


def translate_gemma4_hybrid_attention(raw: dict[str, Any]) -> str | None:
    """`gemma4_hybrid_attn_impl: true` (FlashAttention-2 on Gemma 4's sliding-window layers, sdpa on
    its global layers, whose head_dim 512 FlashAttention-2 cannot take) -> sdpa on every layer."""
    if raw.get("gemma4_hybrid_attn_impl") is not True:
        return None
    if raw.get("attn_implementation") not in (None, "flash_attention_2", "sdpa"):
        return None  # another choice conflicts: the key table says so
    del raw["gemma4_hybrid_attn_impl"]
    raw["attn_implementation"] = "sdpa"
    return "Gemma 4's hybrid attention runs as sdpa on every layer (the same attention; FlashAttention-2 on the sliding-window layers is speed only)"


def translate_kernel_experts(raw: dict[str, Any]) -> str | None:
    """`experts_implementation: scattermoe | sonicmoe` (kernels of Axolotl's KernelsPlugin) -> the
    model's own experts code."""
    value = raw.get("experts_implementation")
    if value not in KERNEL_EXPERTS:
        return None
    del raw["experts_implementation"]
    return f"experts_implementation {value} (Axolotl's kernel plugin) runs as transformers' own experts code (the same MoE)"


# transformers' `attn_implementation: <org>/<repo>[@rev][:fn]`: an attention kernel fetched from the hub
# by the `kernels` package (compiled code from the hub, like trust_remote_code).
HUB_KERNEL = re.compile(r"^[\w.-]+/[\w.-]+(@[\w.-]+)?(:\w+)?$")


def translate_hub_attention(raw: dict[str, Any]) -> str | None:
    """`attn_implementation: kernels-community/vllm-flash-attn3` -> the model's own attention."""
    value = raw.get("attn_implementation")
    if not isinstance(value, str) or not HUB_KERNEL.match(value):
        return None
    del raw["attn_implementation"]
    return (
        f"attention kernel `{value}` from the hub runs as the model's own attention (transformers' default for "
        "it: sdpa, or eager where the model has no sdpa; the same attention, and no compiled code is downloaded)"
    )


KERNEL_EXPERTS = ("scattermoe", "sonicmoe")
TRANSLATIONS = (
    ("attn_implementation", translate_hub_attention),
    ("fsdp", translate_legacy_fsdp),
    ("xformers_attention", translate_xformers),
    ("gemma4_hybrid_attn_impl", translate_gemma4_hybrid_attention),
    ("experts_implementation", translate_kernel_experts),
)


def translate_axolotl(raw: dict[str, Any]) -> dict[str, str]:
    """Rewrite `raw` in place; {key: note} for each translation made."""
    notes: dict[str, str] = {}
    for key, translate in TRANSLATIONS:
        note = translate(raw)
        if note:
            notes[key] = MAPPED + note
    return notes
