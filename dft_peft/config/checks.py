"""Rules that span several keys; most mirror Axolotl's validators so a config means the same."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dft_peft.config.schema import Config


def check_consistency(cfg: Config) -> None:
    """Raise ValueError (pydantic turns it into one line) for combinations that cannot run."""
    if cfg.adapter is None:
        raise ValueError(
            "`adapter` is not set: dft-peft trains LoRA adapters only (no full fine-tuning); "
            "add `adapter: lora`, or `adapter: qlora` with `load_in_4bit: true`."
        )
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ValueError("`load_in_4bit` and `load_in_8bit` are both true; keep one.")
    if cfg.adapter == "qlora" and not cfg.load_in_4bit:
        raise ValueError(
            "`adapter: qlora` needs `load_in_4bit: true` (Axolotl requires it too); add it, "
            "or use `adapter: lora`."
        )
    if not cfg.lora_target_linear and not cfg.lora_target_modules:
        raise ValueError(
            "no LoRA target: set `lora_target_linear: true` (every linear layer) or list "
            "`lora_target_modules` (e.g. [q_proj, k_proj, v_proj, o_proj])."
        )
    if cfg.bf16 is True and cfg.fp16:
        raise ValueError("`bf16` and `fp16` are both true; keep one (fp16 for T4/V100 GPUs).")
    if cfg.warmup_steps and cfg.warmup_ratio:
        raise ValueError("`warmup_steps` and `warmup_ratio` are both set; keep one.")
    if cfg.save_steps and cfg.saves_per_epoch:
        raise ValueError("`save_steps` and `saves_per_epoch` are both set; keep one.")
    if cfg.eval_steps and cfg.evals_per_epoch:
        raise ValueError("`eval_steps` and `evals_per_epoch` are both set; keep one.")
    if cfg.test_datasets and cfg.val_set_size:
        raise ValueError(
            "`test_datasets` and a non-zero `val_set_size` are both set; keep one source of "
            "evaluation data."
        )
    if cfg.eval_steps and not cfg.val_set_size and not cfg.test_datasets:
        raise ValueError(
            "`eval_steps` is set but there is no evaluation data: set `val_set_size` (e.g. "
            "0.05) or `test_datasets`."
        )
    if cfg.chat_template == "jinja" and not cfg.chat_template_jinja:
        raise ValueError("`chat_template: jinja` needs the template in `chat_template_jinja`.")
