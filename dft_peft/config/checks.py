"""Rules that span several keys; most mirror Axolotl's validators so a config means the same."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dft_peft.config.loftq_keys import check_loftq
from dft_peft.config.loop_keys import check_loop_keys
from dft_peft.config.relora_keys import check_relora
from dft_peft.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from dft_peft.config.schema import ConfigSchema as Config


def check_consistency(cfg: Config) -> None:
    """Raise ValueError (pydantic turns it into one line) for combinations that cannot run."""
    if cfg.adapter is None:
        raise ValueError(
            "`adapter` is not set: dft-peft trains LoRA adapters only (no full fine-tuning); "
            "add `adapter: lora`, or `adapter: qlora` with `load_in_4bit: true`."
        )
    check_loftq(cfg)  # `peft.loftq_config`: before the qlora rule, which would ask for load_in_4bit
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ValueError("`load_in_4bit` and `load_in_8bit` are both true; keep one.")
    if cfg.adapter == "qlora" and not cfg.load_in_4bit:
        raise ValueError(
            "`adapter: qlora` needs `load_in_4bit: true` (Axolotl requires it too); add it, "
            "or use `adapter: lora`."
        )
    if not cfg.lora_target_linear and not cfg.lora_target_modules and not cfg.lora_target_parameters:
        raise ValueError(
            "no LoRA target: set `lora_target_linear: true` (every linear layer) or list "
            "`lora_target_modules` (e.g. [q_proj, k_proj, v_proj, o_proj]) or `lora_target_parameters`."
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
    check_loop_keys(cfg)  # early stopping, best model, DeepSpeed: before the generic eval-data rule below
    check_relora(cfg)  # ReLoRA and jagged restarts: Axolotl's check_relora
    if cfg.eval_steps and not cfg.val_set_size and not cfg.test_datasets:
        raise ValueError(
            "`eval_steps` is set but there is no evaluation data: set `val_set_size` (e.g. "
            "0.05) or `test_datasets`."
        )
    if cfg.chat_template == "jinja" and not cfg.chat_template_jinja:
        raise ValueError("`chat_template: jinja` needs the template in `chat_template_jinja`.")
    check_prequantized(cfg)


def check_prequantized(cfg: Config) -> None:
    """`model_quantization_config`: Axolotl's rule against bitsandbytes, and MXFP4 only dequantized."""
    name, kwargs = cfg.model_quantization_config, cfg.model_quantization_config_kwargs
    if name is None:
        if kwargs:
            raise ValueError("`model_quantization_config_kwargs` is set without `model_quantization_config`; add it or remove them.")
        return
    if cfg.load_in_4bit or cfg.load_in_8bit:
        raise ValueError(
            "model_quantization_config and load_in_8bit or load_in_4bit cannot be used together (Axolotl's rule): "
            "the checkpoint's own format replaces bitsandbytes; remove one."
        )
    if name == "Mxfp4Config" and not (kwargs or {}).get("dequantize"):
        raise ValueError(
            "model_quantization_config: Mxfp4Config trains only dequantized (transformers' MXFP4 kernels cannot "
            "train); add `model_quantization_config_kwargs: {dequantize: true}`."
        )


# ----------------------------------------------------------------------------- warnings at load


# Learning rates outside this range are almost always a typo (a missing minus in the exponent).
SANE_LEARNING_RATES = (1e-7, 0.05)
# At or above this, an Adam step changes each LoRA weight by ~lr: the adapter cannot survive it.
DESTRUCTIVE_LEARNING_RATE = 1.0


def warn_questionable(cfg: Config) -> None:
    """One-line warnings for values Axolotl accepts but that are likely not what was meant."""
    import logging

    log = logging.getLogger("dft_peft.config")
    if cfg.load_in_4bit and cfg.adapter == "lora":
        log.warning(
            "load_in_4bit with adapter: lora trains a LoRA on a 4-bit base, which is QLoRA; "
            "write `adapter: qlora` to say so (the run is the same)."
        )
    low, high = SANE_LEARNING_RATES
    if cfg.learning_rate >= DESTRUCTIVE_LEARNING_RATE and "adam" in cfg.optimizer.lower():
        import warnings

        warnings.warn(  # a warning, not a log line: it reaches Python API and notebook users too
            f"learning_rate {cfg.learning_rate:g} with {cfg.optimizer}: Adam moves every LoRA weight by about "
            "the learning rate at each step, so from the first steps the adapter is noise (LoRA uses 1e-4 to "
            "5e-4); check the exponent.",
            UserWarning,
            stacklevel=2,
        )
    elif not low <= cfg.learning_rate <= high:
        log.warning(
            "learning_rate %g is outside the usual %g-%g for LoRA (typically 1e-4 to 5e-4); check the exponent.",
            cfg.learning_rate, low, high,
        )


def check_raw_values(raw: dict, label: str) -> None:
    """Checks on the mapping as written, before empty values are dropped as "unset"."""
    if "loss" in raw and (raw["loss"] is None or (isinstance(raw["loss"], str) and not raw["loss"].strip())):
        raise UserError(
            f"{label}: `loss` is empty; write `loss: dft` (or sft, asft, prob, power), or remove the line for sft."
        )


def reject_bool_number(value, name: str, annotation) -> None:
    """`lora_r: true` is a typo, not 1: pydantic's lax mode would take a bool as a number."""
    import typing

    args = set(typing.get_args(annotation)) or {annotation}
    if isinstance(value, bool) and bool in args:
        return
    if isinstance(value, bool) and args & {int, float}:
        raise ValueError(f"must be a number, not {str(value).lower()}")


# ----------------------------------------------------------------------------- paths, before a run


def looks_like_path(value: str) -> bool:
    """A value meant as a local path rather than a hub id (`org/name`) or a scheme (`pkg://`)."""
    from pathlib import Path

    if "://" in value:
        return False
    if value.startswith(("/", ".", "~")) or "\\" in value or value.count("/") > 1:
        return True
    return Path(value).expanduser().exists()


def _input_folder(key: str, value: str | None, *, needs: str | None = None, files_ok: tuple[str, ...] = ()) -> None:
    from pathlib import Path

    if value is None or not looks_like_path(value):
        return
    path = Path(value).expanduser()
    if not path.exists():
        raise UserError(f"{key} `{value}` does not exist; check the path (relative paths start from the config file's folder).")
    if path.is_file():
        if path.suffix.lower() in files_ok:
            return
        raise UserError(f"{key} `{value}` is a file; point it at the folder that holds it.")
    if needs and not (path / needs).is_file():
        raise UserError(f"{key} `{value}` is a folder without {needs}; point it at the right folder.")


def _output_folder(key: str, value: str | None, *, optional: bool) -> None:
    import os
    from pathlib import Path

    if value is None and optional:
        return
    if value is None or not str(value).strip():
        raise UserError(f"`{key}` is empty; set a folder, e.g. `{key}: ./outputs/run1`.")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{key} `{value}` is a file, not a folder; choose another {key}.")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{key} `{value}` lies under `{parent}`, which is a file; choose another {key}.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{key} `{value}`: cannot write in `{parent}` (permission denied); choose another {key}.")
    why = _cannot_create_in(parent)
    if why:
        raise UserError(f"{key} `{value}`: cannot create a folder in `{parent}` ({why}); choose another {key}.")


def _cannot_create_in(parent) -> str | None:
    """Why no folder can be made in `parent`, or None. `os.access` says yes to root on a read-only
    file system (/sys, a read-only mount), so a folder is made and removed again to be sure."""
    import os
    import tempfile

    try:
        probe = tempfile.mkdtemp(prefix=".dft-peft-write-check-", dir=parent)
    except OSError as exc:
        return (exc.strerror or type(exc).__name__).lower()
    os.rmdir(probe)
    return None


def check_paths(cfg: Config) -> None:
    """Path problems as one line before any work: `train` and `validate` both run this.

    A value that does not look like a path (`org/name`) may be a hub id and is left to the model
    loader; anything written as a path must exist and be the right kind of thing.
    """
    from pathlib import Path

    base = cfg.base_model
    if base and looks_like_path(base):
        path = Path(base).expanduser()
        if path.suffix.lower() == ".gguf":
            if not path.is_file():
                raise UserError(f"base_model: GGUF file `{base}` does not exist; check the path.")
        elif not path.exists():
            raise UserError(f"base_model `{base}` does not exist; check the path (or give a hub id such as org/name).")
        elif path.is_file():
            raise UserError(f"base_model `{base}` is a file; point it at the model folder (with config.json) or a .gguf file.")
        elif not (path / "config.json").is_file():
            raise UserError(f"base_model `{base}` is a folder without config.json; point it at a model folder.")
    _input_folder("tokenizer_config", cfg.tokenizer_config)
    _input_folder("base_model_config", cfg.base_model_config, needs="config.json", files_ok=(".json",))
    _input_folder("lora_model_dir", cfg.lora_model_dir, needs="adapter_config.json")
    _output_folder("output_dir", cfg.output_dir, optional=False)
    _output_folder("dataset_prepared_path", cfg.dataset_prepared_path, optional=True)
    if cfg.resume_from_checkpoint is not None:
        path = Path(cfg.resume_from_checkpoint).expanduser()
        if not path.exists():
            raise UserError(f"resume_from_checkpoint `{path}` does not exist; point it at an output_dir/checkpoint-N folder.")
        if not (path / "trainer_state.json").is_file():
            raise UserError(
                f"resume_from_checkpoint `{path}` is not a complete checkpoint (no trainer_state.json); "
                "point it at an output_dir/checkpoint-N folder."
            )


# ----------------------------------------------------------------------------- the model's limits


def check_model_config(cfg: Config, model_config) -> None:
    """Limits only the model's config knows: its position limit."""
    limit = getattr(model_config, "max_position_embeddings", None)
    rope = getattr(model_config, "rope_scaling", None)
    scaled = isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default"
    if isinstance(limit, int) and cfg.sequence_len > limit and not scaled:
        raise UserError(
            f"sequence_len {cfg.sequence_len} is beyond the model's position limit (max_position_embeddings "
            f"{limit}); lower sequence_len to {limit} or less."
        )


def check_lora_targets_exist(model, targets: list[str]) -> None:
    """Every module named in `lora_target_modules` must exist (peft fails only when none does)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    full = {name for name, _ in model.named_modules() if name}
    missing = [t for t in targets if t not in names and t not in full and not any(n.endswith("." + t) for n in full)]
    if missing:
        linear = sorted(n for n in names if n.endswith("proj") or n in ("fc1", "fc2", "dense", "c_attn", "c_proj"))
        raise UserError(
            f"lora_target_modules: `{missing[0]}` is not a module of this model"
            f"{did_you_mean(missing[0], names)} (its linear layers: {', '.join(linear[:10]) or 'none found'}); "
            "fix the name or use lora_target_linear: true."
        )
