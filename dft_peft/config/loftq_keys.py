"""Axolotl 0.19's `peft:` block: `peft: {loftq_config: {loftq_bits: 4}}`, LoftQ initialisation.

Axolotl's schema (utils/schemas/peft.py `PeftConfig`, `LoftQConfig`) has `loftq_config` with one
field, `loftq_bits` (default 4). With it Axolotl loads the model in full precision, skips k-bit
preparation and lets peft quantize it (loaders/model.py, loaders/adapter.py); the run itself is in
`dft_peft/model/loftq.py`. Axolotl 0.19 has no validator for the combinations below: there a 4-bit
or 8-bit model would reach peft's LoftQ, which expects full-precision weights, so dft-peft refuses
them in one line, like the values peft itself refuses (bits other than 4 and 8).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from dft_peft.config.schema import ConfigSchema as Config


class LoftQFields(BaseModel):
    """Axolotl's `LoftQConfig` subset."""

    model_config = ConfigDict(extra="forbid")

    loftq_bits: Literal[4, 8] = Field(default=4, description="4: NF4, 8: int8 (bitsandbytes), what peft's LoftQ quantizes to.")


class PeftFields(BaseModel):
    """Axolotl's `peft:` block (its `PeftConfig` subset)."""

    model_config = ConfigDict(extra="forbid")

    loftq_config: LoftQFields | None = Field(default=None, description="LoftQ initialisation for LoRA.")


def loftq_bits(cfg: Any) -> int | None:
    """`peft.loftq_config.loftq_bits` when LoftQ is on, else None (Axolotl's `cfg.peft and ...` chain)."""
    loftq = getattr(getattr(cfg, "peft", None), "loftq_config", None)
    return getattr(loftq, "loftq_bits", None) or None


def check_loftq(cfg: Config) -> None:
    """Raise ValueError (one line) for combinations peft's LoftQ cannot run."""
    bits = loftq_bits(cfg)
    if not bits:
        return
    if cfg.adapter == "qlora":
        raise ValueError(
            "`peft.loftq_config` quantizes the full-precision model itself (peft's LoftQ), so it goes with "
            "`adapter: lora`, not `adapter: qlora`; write `adapter: lora` without `load_in_4bit`."
        )
    if cfg.load_in_4bit or cfg.load_in_8bit:
        raise ValueError(
            "`peft.loftq_config` quantizes the full-precision model itself (peft's LoftQ) and cannot start from a "
            "bitsandbytes model; remove `load_in_4bit`/`load_in_8bit` (Axolotl's LoftQ example has neither)."
        )
    if cfg.lora_target_parameters:
        raise ValueError(
            "`peft.loftq_config` initialises LoRA on Linear layers only (peft's LoftQ fails on "
            "`lora_target_parameters`); remove one of them."
        )
