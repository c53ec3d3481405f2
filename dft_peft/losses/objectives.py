"""Per-token training objectives.

Each objective receives fp32 (or fp64) logits of valid tokens only, `[n, V]`, and their targets
`[n]`, and returns per-token losses `[n]`. Chunking, masking, normalisation and the backward pass
are done by `fused.py`, identically for every objective. Objectives that depend only on
log p(target) are written as functions of that vector (`register_loss_of_logp`), which gives the
fused path a fast gradient; the general `(logits, targets)` form is derived from them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from dft_peft.losses.logprobs import target_logprobs  # noqa: F401  (part of this module's API)
from dft_peft.losses.registry import register_loss, register_loss_of_logp


@register_loss_of_logp("sft")
def sft(logp: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning: cross-entropy, -log p(y_t)."""
    return -logp


class DFTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dft_alpha: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Mix of the DFT weight: alpha * sg(p) + (1 - alpha). 1 is the paper's DFT, 0 is SFT.",
    )
    dft_sft_special_tokens: bool | list[int] = Field(
        False,
        description=(
            "true: EOS / end-of-turn and the tokenizer's other special tokens keep SFT's weight "
            "(-log p) as targets, the rest DFT's. A list of token ids names them yourself. "
            "Off by default (the paper's objective)."
        ),
        json_schema_extra={"omit_default": True},
    )


@register_loss_of_logp("dft", params=DFTParams)
def dft(
    logp: torch.Tensor,
    dft_alpha: float = 1.0,
    dft_sft_special_tokens: bool | list[int] = False,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dynamic Fine-Tuning (arXiv 2508.05629, Eq. 9): -sg(p) * log p(y_t).

    The detached probability cancels the 1/p that SFT's gradient hides, so tokens the model finds
    very unlikely stop dominating the update. With alpha = 1 this is exactly TRL's
    `-exp(logp).detach() * logp`.

    That same down-weighting starves a target the base model finds unlikely for a reason the data
    cannot fix by itself: an end-of-turn token in a prompt format the model does not know starts
    near p = 0.005, DFT barely trains it and the tuned model never stops. With
    `dft_sft_special_tokens` (a list of token ids; `true` is resolved from the tokenizer by
    `resolve_special_token_ids` before training) those targets keep the weight 1 of SFT.
    """
    weight = logp.detach().exp()
    if dft_alpha != 1.0:
        weight = dft_alpha * weight + (1.0 - dft_alpha)
    if dft_sft_special_tokens is True:
        raise ValueError(
            "dft_sft_special_tokens: true must be resolved to token ids before the loss runs "
            "(dft_peft.losses.objectives.resolve_special_token_ids(params, tokenizer))"
        )
    if dft_sft_special_tokens and targets is not None:
        ids = torch.as_tensor(dft_sft_special_tokens, dtype=targets.dtype, device=targets.device)
        weight = torch.where(torch.isin(targets, ids), torch.ones_like(weight), weight)
    return -weight * logp


def special_token_ids(tokenizer: Any, model_config: Any = None) -> list[int]:
    """Ids of the targets that DFT must not starve: EOS / end-of-turn and the other special tokens.

    The tokenizer's special tokens (bos/eos/pad/unk and additional ones, which include chat
    markers such as `<|im_end|>` or `<|eot_id|>`) plus every id in the model's generation config
    `eos_token_id` (Llama-3 lists its end-of-turn there, not in the tokenizer).
    """
    ids: set[int] = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    for source in (model_config, getattr(model_config, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        for i in eos if isinstance(eos, (list, tuple)) else [eos]:
            if i is not None:
                ids.add(int(i))
    return sorted(ids)


def resolve_special_token_ids(params: dict[str, Any], tokenizer: Any, model: Any = None) -> dict[str, Any]:
    """`dft_sft_special_tokens: true` -> the list of ids it means for this tokenizer (and model).

    Returns a new dict; other parameters (and an explicit list) pass through unchanged.
    """
    if params.get("dft_sft_special_tokens") is not True:
        return dict(params)
    config = getattr(model, "config", None)
    ids = special_token_ids(tokenizer, config)
    if model is not None and getattr(model, "generation_config", None) is not None:
        ids = sorted(set(ids) | set(special_token_ids(None, model.generation_config)))
    return {**params, "dft_sft_special_tokens": ids}


class ASFTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    asft_lambda: float = Field(0.1, ge=0.0, description="Weight of the per-token KL(p_base || p_theta) anchor.")


@register_loss("asft", params=ASFTParams, needs=("ref_logits",))
def asft(
    logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor, asft_lambda: float = 0.1
) -> torch.Tensor:
    """Anchored DFT (arXiv 2509.23753): DFT + lambda * KL(p_base || p_theta) over the vocabulary.

    `ref_logits` are the frozen base model's logits for the same rows (under LoRA: the same model
    with the adapter disabled). The anchor keeps DFT from drifting where its down-weighting of
    unlikely tokens would otherwise let the distribution collapse.
    """
    loss = dft(target_logprobs(logits, targets))
    if asft_lambda == 0.0:
        return loss
    ref_logp = torch.log_softmax(ref_logits, dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
    return loss + asft_lambda * kl


@register_loss_of_logp("prob")
def prob(logp: torch.Tensor) -> torch.Tensor:
    """1 - p(y_t) ("Beyond log likelihood", arXiv 2510.00526): its gradient equals DFT's."""
    return -torch.expm1(logp)


class PowerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    power_q: float = Field(0.5, gt=0.0, le=1.0, description="q -> 0 is SFT (-log p); q = 1 is `prob` (1 - p).")


@register_loss_of_logp("power", params=PowerParams)
def power(logp: torch.Tensor, power_q: float = 0.5) -> torch.Tensor:
    """-(p^q - 1) / q (arXiv 2510.00526): interpolates between SFT (q -> 0) and `prob` (q = 1)."""
    return -torch.expm1(power_q * logp) / power_q


class EAFTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eaft_alpha: float = Field(1.0, ge=0.0, description="Power of the entropy weight (Axolotl's `eaft_alpha`, default 1).")
    eaft_k: int = Field(20, ge=2, description="Top-K logits whose softmax entropy weights the token (Axolotl's `eaft_k`, default 20).")
    eaft_normalize: bool = Field(
        False,
        description=(
            "true: divide the top-K entropy by ln K (the paper, LLaMA-Factory and Axolotl after "
            "0.19); false: the raw entropy, as Axolotl 0.19 does."
        ),
        json_schema_extra={"omit_default": True},
    )


# Axolotl 0.19 adds this inside the log of its top-K entropy; kept so values match it exactly.
EAFT_LOG_EPS = 1e-10


@register_loss("eaft", params=EAFTParams)
def eaft(
    logits: torch.Tensor,
    targets: torch.Tensor,
    eaft_alpha: float = 1.0,
    eaft_k: int = 20,
    eaft_normalize: bool = False,
) -> torch.Tensor:
    """Entropy-aware fine-tuning (arXiv 2601.02151): CE * sg(H_topK)^alpha.

    H_topK is the entropy of the softmax over the K largest logits, a cheap proxy for how unsure
    the model is at that position: confident positions (H near 0) get little weight, so the update
    goes where the model is uncertain and confident knowledge is not overwritten. Formula and
    defaults of Axolotl 0.19 (`axolotl/monkeypatch/loss/eaft.py`): raw entropy with 1e-10 inside
    the log, alpha 1, K 20; `eaft_normalize` divides H by ln K first (range [0, 1]).
    """
    with torch.no_grad():
        top = torch.topk(logits.detach(), k=min(eaft_k, logits.shape[-1]), dim=-1).values
        probs = torch.softmax(top, dim=-1)
        entropy = -(probs * torch.log(probs + EAFT_LOG_EPS)).sum(dim=-1)
        if eaft_normalize:
            entropy = entropy / math.log(top.shape[-1])
        weight = entropy.pow(eaft_alpha)
    return -weight * target_logprobs(logits, targets)
