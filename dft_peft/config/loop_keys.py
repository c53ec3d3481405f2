"""Axolotl's training-loop keys that span several settings: early stopping and the best
checkpoint, DeepSpeed's config file, the quadratic warmup's scheduler.

Each rule restates what Axolotl 0.19 does with the key (src/axolotl/utils/schemas/validation.py,
core/builders/causal.py), so a config means the same here; where Axolotl would fail later with a
traceback, or silently drop the key, the config is refused up front in one line instead. The
arguments these keys become at run time are built in `dft_peft/training/loop_options.py`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dft_peft.config.schema import ConfigSchema as Config

# dft-peft's evaluation runs with `prediction_loss_only`: the loss is its one metric.
LOSS_METRICS = ("loss", "eval_loss")
# The folder of DeepSpeed configs in Axolotl's repository (`deepspeed: deepspeed_configs/zero2.json`).
AXOLOTL_DEEPSPEED_FOLDER = "deepspeed_configs"
# Axolotl's files of that folder, shipped with dft-peft (Apache-2.0; NOTICE.md there).
BUNDLED_DEEPSPEED = Path(__file__).with_name(AXOLOTL_DEEPSPEED_FOLDER)
ZERO3_REASON = (
    "ZeRO stage 3 shards every weight across GPUs, but dft-peft's fused loss reads the LM head's weight "
    "directly; use a stage 0-2 config (e.g. Axolotl's deepspeed_configs/zero2.json)"
)


# ----------------------------------------------------------------------------- DeepSpeed


def check_deepspeed(value: Any) -> str | dict[str, Any] | None:
    """`deepspeed:` as Axolotl takes it (a JSON file's path or the mapping itself), checked before
    any loading: the file must exist and parse, and its ZeRO stage must leave weights whole.

    Returns the value to pass to `TrainingArguments(deepspeed=...)` (unchanged; empty means unset).
    """
    if value is None or value == "" or value == {}:
        return None
    if not isinstance(value, (str, dict)):
        raise ValueError("must be the path of a DeepSpeed JSON file or a mapping of its settings")
    if isinstance(value, str):
        value = bundled_axolotl_file(value) or value
    config = value if isinstance(value, dict) else read_deepspeed_file(value)
    if zero_stage(config) == 3:
        raise ValueError(ZERO3_REASON)
    return value


def bundled_axolotl_file(value: str) -> str | None:
    """Our copy of Axolotl's `deepspeed_configs/<name>.json` when `value` names one that does not
    exist where the config looked: Axolotl's examples assume a run from Axolotl's repository."""
    path = Path(value)
    if path.is_file() or path.parts[:1] != (AXOLOTL_DEEPSPEED_FOLDER,) or len(path.parts) != 2:
        return None
    bundled = BUNDLED_DEEPSPEED / path.name
    return str(bundled) if bundled.is_file() else None


def read_deepspeed_file(value: str) -> dict[str, Any]:
    """The JSON mapping in `value`; a missing or broken file is one line naming it."""
    path = Path(value).expanduser()
    if not path.is_file():
        shipped = Path(value).parts[:1] == (AXOLOTL_DEEPSPEED_FOLDER,)
        hint = (
            " (dft-peft ships Axolotl's zero1, zero2 and zero3 files under this name: check the file "
            "name, or give the file's full path)"
            if shipped
            else "; check the path (relative paths start from the config file's folder)"
        )
        raise ValueError(f"file `{value}` does not exist{hint}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"`{value}` is not a readable JSON file ({exc}); fix or replace it") from None
    if not isinstance(config, dict):
        raise ValueError(f"`{value}` must hold a JSON object of DeepSpeed settings")
    return config


def zero_stage(config: dict[str, Any]) -> int:
    """`zero_optimization.stage` (DeepSpeed's default: 0, no ZeRO)."""
    zero = config.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ValueError("`zero_optimization` must be a mapping such as {stage: 2}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"`zero_optimization.stage` must be 0, 1, 2 or 3, not {stage!r}")
    return int(stage)


# ----------------------------------------------------------------------------- eval and best model


def steps_divide(save_steps: float, eval_steps: float) -> bool:
    """Whether checkpoints fall on evaluations, as transformers requires for
    `load_best_model_at_end`: whole steps must divide, fractions of the run likewise; a mix of a
    fraction and whole steps cannot be guaranteed to."""
    if (save_steps < 1) != (eval_steps < 1):
        return False
    scale = 1_000_000  # transformers' own integer arithmetic for fractions
    return round(save_steps * scale) % round(eval_steps * scale) == 0


def has_eval_data(cfg: Config) -> bool:
    return bool(cfg.val_set_size or cfg.test_datasets) and cfg.evals_per_epoch != 0


def check_loop_keys(cfg: Config) -> None:
    """Raise ValueError (one line) for loop settings that cannot run; warn where Axolotl ignores a key."""
    if cfg.deepspeed and (cfg.fsdp_config or cfg.fsdp_version):
        raise ValueError("`deepspeed` and `fsdp_config` are both set; keep one (Axolotl refuses both too).")
    if cfg.early_stopping_patience:
        _check_early_stopping(cfg)
    if cfg.load_best_model_at_end:
        _check_best_model(cfg)
    if cfg.metric_for_best_model is not None and cfg.metric_for_best_model not in LOSS_METRICS:
        raise ValueError(
            f"metric_for_best_model: `{cfg.metric_for_best_model}` is not computed (dft-peft's evaluation "
            "reports the loss only); use `metric_for_best_model: eval_loss` or remove it."
        )
    if cfg.lr_quadratic_warmup and cfg.lr_scheduler != "cosine":
        warnings.warn(  # Axolotl ignores it too: its quadratic warmup exists for the cosine schedule only
            f"lr_quadratic_warmup applies to `lr_scheduler: cosine` only (as in Axolotl); with "
            f"`{cfg.lr_scheduler}` the warmup stays linear.",
            UserWarning,
            stacklevel=2,
        )


def _check_early_stopping(cfg: Config) -> None:
    """Axolotl's `check_early_stopping`, and the evaluation data it silently assumes."""
    if not has_eval_data(cfg):
        raise ValueError(
            "`early_stopping_patience` stops on the evaluation loss, but there is no evaluation data: set "
            "`val_set_size` (e.g. 0.05) or `test_datasets`, or remove early_stopping_patience."
        )
    if not cfg.save_steps or not cfg.eval_steps:
        raise ValueError(
            "`early_stopping_patience` needs `save_steps` and `eval_steps` (the best checkpoint is kept, so "
            "checkpoints must fall on evaluations), as in Axolotl; set e.g. `eval_steps: 50` and `save_steps: 100`."
        )
    if not steps_divide(cfg.save_steps, cfg.eval_steps):
        raise ValueError(
            f"`early_stopping_patience` needs save_steps ({cfg.save_steps}) to be a multiple of eval_steps "
            f"({cfg.eval_steps}), as in Axolotl; change one of them."
        )


def _check_best_model(cfg: Config) -> None:
    """`load_best_model_at_end: true` needs evaluations, and checkpoints that fall on them."""
    if not has_eval_data(cfg):
        raise ValueError(
            "`load_best_model_at_end` picks the checkpoint with the best evaluation loss, but there is no "
            "evaluation data: set `val_set_size` (e.g. 0.05) or `test_datasets`, or remove it."
        )
    saves_on_steps = bool(cfg.save_steps or cfg.saves_per_epoch)
    evals_on_steps = bool(cfg.eval_steps or cfg.evals_per_epoch)
    if saves_on_steps != evals_on_steps:
        raise ValueError(
            "`load_best_model_at_end` needs checkpoints and evaluations on one schedule: set both "
            "save_steps and eval_steps (save_steps a multiple of eval_steps), or neither (both once per epoch)."
        )
    if cfg.save_steps and cfg.eval_steps and not steps_divide(cfg.save_steps, cfg.eval_steps):
        raise ValueError(
            f"`load_best_model_at_end` needs save_steps ({cfg.save_steps}) to be a multiple of eval_steps "
            f"({cfg.eval_steps}); change one of them."
        )
