"""Load and validate an Axolotl-style YAML config.

The product promise is that a hobbyist adds `loss: dft` to the Axolotl QLoRA config they already
have and it runs. So key names, defaults and meanings follow Axolotl's schema
(`axolotl/utils/schemas/*.py`), and no key is ever silently dropped:

* a key that is neither ours nor Axolotl's (a typo) is an error that suggests the closest key;
* an Axolotl key dft-peft does not implement (`deepspeed`, `rl`, `unsloth_*`, ...) is an error,
  or with `strict: false` a warning naming it. Left empty or off (`deepspeed:`, `group_by_length:
  false`), as Axolotl's own example files do, it changes nothing and is accepted quietly;
* objective parameters (`dft_alpha`, ...) sit at the top level and are checked against the loss
  registry, so a parameter of another objective is an error that names its loss.

Every problem is a `UserError` with one line naming the file and key and saying what to do.

Where we deliberately differ from Axolotl:

* `strict` (Axolotl: "allow CLI overrides", default false) means here "unsupported Axolotl keys
  are errors" and defaults to true. Axolotl's examples carry `strict: false`, so their configs get
  warnings rather than errors, which is what their author would want.
* `adapter` is required (lora or qlora): full fine-tuning is out of scope.
* `optimizer` defaults to `adamw_torch` (Axolotl: `adamw_torch_fused`), which works on every
  device; `seed` defaults to 42, the value transformers uses when Axolotl leaves it unset.
"""

from __future__ import annotations

import logging
import os
import re
import typing
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from dft_peft.axolotl_keys import (
    CHAT_TEMPLATES,
    AXOLOTL_HARMLESS_KEYS,
    AXOLOTL_UNSUPPORTED_KEYS,
    AXOLOTL_UNSUPPORTED_PREFIXES,
    DEFAULT_TRUE_KEYS,
    UNSUPPORTED_HINTS,
)
from dft_peft.data.spec import DatasetConfig
from dft_peft.errors import UserError, closest, did_you_mean

logger = logging.getLogger(__name__)

Optimizer = Literal[
    "adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"
]
Scheduler = Literal["cosine", "linear", "constant"]
AttnImplementation = Literal["flash_attention_2", "sdpa", "eager"]
Reporter = Literal["tensorboard", "wandb", "none"]

# transformers' OptimizerNames spells the bitsandbytes AdamW two ways; keep one.
OPTIMIZER_ALIASES = {"adamw_8bit": "adamw_bnb_8bit"}

# Axolotl's older boolean attention switches, mapped to `attn_implementation` as Axolotl does.
LEGACY_ATTENTION_FLAGS = {
    "flash_attention": "flash_attention_2",
    "sdp_attention": "sdpa",
    "eager_attention": "eager",
}

# Axolotl's internal field names, which it also accepts as keys (populate_by_name).
KEY_ALIASES = {"type_of_model": "model_type", "revision_of_model": "model_revision"}

# Axolotl's `bnb_config_kwargs` entries that have a dft-peft key.
BNB_KWARGS = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant")

# Keys accepted on input and folded into other fields by `Config._normalize_inputs`.
INPUT_ONLY_KEYS = frozenset(LEGACY_ATTENTION_FLAGS) | frozenset(KEY_ALIASES) | {"bnb_config_kwargs"}

# Keys holding paths: inputs must exist to be used; outputs are created by the run.
_INPUT_PATH_KEYS = (
    "base_model",
    "base_model_config",
    "tokenizer_config",
    "lora_model_dir",
    "resume_from_checkpoint",
)
_OUTPUT_PATH_KEYS = ("output_dir", "dataset_prepared_path")


class SpecialTokens(BaseModel):
    """Axolotl's `special_tokens:` block: tokens to set (or add) on the tokenizer."""

    model_config = ConfigDict(extra="forbid")

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    additional_special_tokens: list[str] | None = None


class Config(BaseModel):
    """A validated run configuration; field names, defaults and meanings follow Axolotl.

    Build one with `load_config(path)` (or `Config.from_dict(mapping)`): they also run the
    unknown-key checks, resolve relative paths and validate the objective's parameters, which
    plain `Config(...)` does not.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # --- model ---------------------------------------------------------------------------------
    base_model: str = Field(description="Hub id, local folder, or pkg://<package>/<file>.gguf.")
    base_model_config: str | None = None
    tokenizer_config: str | None = None
    model_type: str | None = Field(default=None, description="e.g. AutoModelForCausalLM")
    tokenizer_type: str | None = Field(default=None, description="e.g. AutoTokenizer")
    model_revision: str | None = None
    trust_remote_code: bool = False
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    attn_implementation: AttnImplementation | None = Field(
        default=None, description="None: the transformers default for the model (usually sdpa)."
    )

    # --- adapter -------------------------------------------------------------------------------
    adapter: Literal["lora", "qlora"] | None = None
    lora_model_dir: str | None = None
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    lora_target_modules: list[str] | str | None = None
    lora_target_linear: bool | None = None
    lora_modules_to_save: list[str] | None = None

    # --- objective -----------------------------------------------------------------------------
    loss: str = Field(default="sft", description="Objective in the loss registry (sft, dft, ...).")

    # --- data ----------------------------------------------------------------------------------
    datasets: list[DatasetConfig]
    test_datasets: list[DatasetConfig] | None = None
    dataset_prepared_path: str | None = None
    val_set_size: float = Field(default=0.0, ge=0.0)
    sequence_len: int = Field(default=512, ge=8)
    sample_packing: bool = False
    pad_to_sequence_len: bool | None = Field(
        default=None, description="None: follow sample_packing (Axolotl's default)."
    )
    train_on_inputs: bool = False
    excess_length_strategy: Literal["drop", "truncate"] = "drop"
    special_tokens: SpecialTokens | None = None
    tokens: list[str] | None = None
    chat_template: str | None = None
    chat_template_jinja: str | None = None

    # --- optimisation --------------------------------------------------------------------------
    micro_batch_size: int = Field(default=1, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    num_epochs: float = Field(default=1.0, gt=0.0)
    max_steps: int | None = Field(default=None, ge=1)
    optimizer: Optimizer = "adamw_torch"
    adam_beta1: float | None = Field(default=None, ge=0.0, lt=1.0)
    adam_beta2: float | None = Field(default=None, ge=0.0, lt=1.0)
    adam_epsilon: float | None = Field(default=None, gt=0.0)
    lr_scheduler: Scheduler = "cosine"
    learning_rate: float = Field(gt=0.0)
    warmup_steps: int | None = Field(default=None, ge=0)
    warmup_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float | None = Field(default=None, ge=0.0)
    seed: int = 42

    # --- precision and memory ------------------------------------------------------------------
    bf16: bool | Literal["auto"] | None = Field(
        default="auto", description="auto: bf16 where the GPU supports it; null counts as false."
    )
    fp16: bool | None = None
    tf32: bool | Literal["auto"] | None = None
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: dict[str, Any] | None = None

    # --- checkpoints, logging, evaluation ------------------------------------------------------
    output_dir: str = "./model-out"
    logging_steps: int | None = Field(default=None, ge=1)
    save_steps: int | float | None = None
    saves_per_epoch: int | None = Field(default=None, ge=1)
    eval_steps: int | float | None = None
    evals_per_epoch: int | None = Field(default=None, ge=1)
    save_total_limit: int | None = Field(default=None, ge=1)
    resume_from_checkpoint: str | None = None
    auto_resume_from_checkpoints: bool | None = None

    # --- trackers ------------------------------------------------------------------------------
    report_to: list[Reporter] | None = None
    use_tensorboard: bool | None = None
    use_wandb: bool | None = None
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_name: str | None = None
    wandb_mode: str | None = None
    wandb_run_id: str | None = None
    wandb_watch: str | None = None
    wandb_log_model: str | None = None

    # --- misc ----------------------------------------------------------------------------------
    plugins: list[str] | None = None
    strict: bool = Field(
        default=True, description="false: unsupported Axolotl keys warn instead of failing."
    )

    _source: Path | None = PrivateAttr(default=None)
    _loss_params: dict[str, Any] | None = PrivateAttr(default=None)
    _ignored: dict[str, str] = PrivateAttr(default_factory=dict)

    # ---------------------------------------------------------------------------------- inputs

    @model_validator(mode="before")
    @classmethod
    def _normalize_inputs(cls, data: Any) -> Any:
        """Fold Axolotl's alternative spellings into our fields and let `key:` (null) mean unset."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        for old, new in KEY_ALIASES.items():
            if old in data:
                value = data.pop(old)
                if data.get(new) is not None and value is not None and data[new] != value:
                    raise ValueError(f"`{old}` and `{new}` are one setting; keep only `{new}`.")
                if value is not None:
                    data[new] = value
        cls._fold_legacy_attention(data)
        cls._fold_bnb_kwargs(data)
        if data.get("chat_template_jinja") and not data.get("chat_template"):
            data["chat_template"] = "jinja"  # Axolotl does the same
        # An empty `key:` means "not set" in Axolotl files: use our default where null is no value.
        for key in [k for k, v in data.items() if v is None]:
            field = cls.model_fields.get(key)
            if field is not None and not _accepts_none(field.annotation):
                del data[key]
        return data

    @staticmethod
    def _fold_legacy_attention(data: dict[str, Any]) -> None:
        chosen = data.get("attn_implementation")
        flags = []
        for flag, impl in LEGACY_ATTENTION_FLAGS.items():
            value = data.pop(flag, None)
            if value is None or value is False:
                continue
            if value is not True:
                raise ValueError(f"`{flag}` must be true or false (got {value!r}).")
            flags.append((flag, impl))
        if len(flags) > 1:
            names = " and ".join(f"`{f}`" for f, _ in flags)
            raise ValueError(f"{names} are both set; keep one (or use `attn_implementation`).")
        if flags:
            flag, impl = flags[0]
            if chosen is not None and chosen != impl:
                raise ValueError(
                    f"`{flag}: true` means `attn_implementation: {impl}`, which conflicts with "
                    f"`attn_implementation: {chosen}`; keep only `attn_implementation`."
                )
            data["attn_implementation"] = impl

    @staticmethod
    def _fold_bnb_kwargs(data: dict[str, Any]) -> None:
        kwargs = data.pop("bnb_config_kwargs", None)
        if kwargs is None:
            return
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"`bnb_config_kwargs` must be a mapping (got {kwargs!r}).")
        for key, value in kwargs.items():
            if key not in BNB_KWARGS:
                raise ValueError(
                    f"`bnb_config_kwargs.{key}` is not supported by dft-peft; supported: "
                    f"{', '.join(BNB_KWARGS)}."
                )
            if data.get(key) is not None and data[key] != value:
                raise ValueError(
                    f"`{key}` is set both at the top level and in `bnb_config_kwargs` with "
                    f"different values; keep one."
                )
            data[key] = value

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_alias(cls, value: Any) -> Any:
        return OPTIMIZER_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("bf16", "tf32", mode="before")
    @classmethod
    def _bool_or_auto(cls, value: Any) -> Any:
        if value is None or isinstance(value, bool) or value == "auto":
            return value
        raise ValueError("must be true, false or auto")

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _plain_checkpointing(cls, value: Any) -> Any:
        if isinstance(value, str) and value in ("offload", "offload_disk", "unsloth"):
            raise ValueError(
                f"must be true or false (Axolotl's `{value}` mode is not supported by dft-peft)"
            )
        return value

    @field_validator("save_steps", "eval_steps", mode="before")
    @classmethod
    def _steps_or_fraction(cls, value: Any) -> Any:
        if value is None:
            return None
        problem = "must be a number of steps, or a fraction of the run below 1"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(problem)
        try:
            number = float(value)
        except ValueError:
            raise ValueError(problem) from None
        if number <= 0:
            raise ValueError("must be positive")
        return int(number) if number >= 1 and number == int(number) else number

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _target_modules(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ValueError("must be a list of module names (e.g. [q_proj, v_proj]) or a regex")

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("datasets")
    @classmethod
    def _at_least_one_dataset(cls, value: list[DatasetConfig]) -> list[DatasetConfig]:
        if not value:
            raise ValueError(
                "must list at least one dataset, e.g. `- path: data/train.jsonl` + `type: alpaca`"
            )
        return value

    @field_validator("chat_template")
    @classmethod
    def _known_chat_template(cls, value: str | None) -> str | None:
        if value is None or value in CHAT_TEMPLATES:
            return value
        fallback = value.removeprefix("tokenizer_default_fallback_")
        if fallback != value and fallback in CHAT_TEMPLATES:
            return value
        raise ValueError(
            f"unknown chat template `{value}`: use a name such as chatml, llama3, qwen_25 or "
            f"tokenizer_default, or put a Jinja template in `chat_template_jinja`."
            + did_you_mean(value, CHAT_TEMPLATES)
        )

    # ----------------------------------------------------------------------------- consistency

    @model_validator(mode="after")
    def _check_consistency(self) -> Config:
        """Cross-key rules; most mirror Axolotl's validators so a config means the same in both."""
        if self.adapter is None:
            raise ValueError(
                "`adapter` is not set: dft-peft trains LoRA adapters only (no full fine-tuning); "
                "add `adapter: lora`, or `adapter: qlora` with `load_in_4bit: true`."
            )
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("`load_in_4bit` and `load_in_8bit` are both true; keep one.")
        if self.adapter == "qlora" and not self.load_in_4bit:
            raise ValueError(
                "`adapter: qlora` needs `load_in_4bit: true` (Axolotl requires it too); add it, "
                "or use `adapter: lora`."
            )
        if not self.lora_target_linear and not self.lora_target_modules:
            raise ValueError(
                "no LoRA target: set `lora_target_linear: true` (every linear layer) or list "
                "`lora_target_modules` (e.g. [q_proj, k_proj, v_proj, o_proj])."
            )
        if self.bf16 is True and self.fp16:
            raise ValueError("`bf16` and `fp16` are both true; keep one (fp16 for T4/V100 GPUs).")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("`warmup_steps` and `warmup_ratio` are both set; keep one.")
        if self.save_steps and self.saves_per_epoch:
            raise ValueError("`save_steps` and `saves_per_epoch` are both set; keep one.")
        if self.eval_steps and self.evals_per_epoch:
            raise ValueError("`eval_steps` and `evals_per_epoch` are both set; keep one.")
        if self.test_datasets and self.val_set_size:
            raise ValueError(
                "`test_datasets` and a non-zero `val_set_size` are both set; keep one source of "
                "evaluation data."
            )
        if self.eval_steps and not self.val_set_size and not self.test_datasets:
            raise ValueError(
                "`eval_steps` is set but there is no evaluation data: set `val_set_size` (e.g. "
                "0.05) or `test_datasets`."
            )
        if self.chat_template == "jinja" and not self.chat_template_jinja:
            raise ValueError("`chat_template: jinja` needs the template in `chat_template_jinja`.")
        if self.pad_to_sequence_len is None:
            self.pad_to_sequence_len = self.sample_packing
        return self

    # ------------------------------------------------------------------------------- building

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        source: str | Path = "config",
        base_dir: str | Path | None = None,
        overrides: list[str] | Mapping[str, Any] | None = None,
    ) -> Config:
        """Validate a parsed YAML mapping: key checks, path resolution, objective parameters.

        `source` names the file in error messages; `base_dir` is the folder relative paths are
        tried against first (see `load_config`).
        """
        label = Path(source).name if isinstance(source, Path) else str(source)
        if not isinstance(data, Mapping):
            kind = type(data).__name__
            raise UserError(f"{label}: the top level must be `key: value` lines, not a {kind}.")
        raw = dict(data)
        if overrides:
            over = parse_overrides(overrides)
            for key in over:
                _check_override_key(key)
            raw.update(over)

        strict = raw.get("strict", True)
        if strict is None:
            strict = True
        if not isinstance(strict, bool):
            raise UserError(f"{label}: `strict` must be true or false (got {strict!r}).")

        fields, loss_params, ignored = _sort_keys(raw, label, strict)
        fields = _drop_axolotl_plugins(fields, label, strict, ignored)
        _resolve_paths(fields, Path(base_dir) if base_dir is not None else None)

        try:
            cfg = cls.model_validate(fields)
        except ValidationError as exc:
            raise UserError(f"{label}: {_describe_validation_error(exc)}") from None

        from dft_peft.losses.registry import validate_loss_params

        try:
            cfg._loss_params = validate_loss_params(cfg.loss, loss_params)
        except UserError as exc:
            raise UserError(f"{label}: {exc}") from None
        cfg._ignored = ignored
        cfg._source = Path(source).resolve() if isinstance(source, Path) else None
        return cfg

    # -------------------------------------------------------------------------------- queries

    def loss_kwargs(self) -> dict[str, Any]:
        """The chosen objective's parameters, defaults filled in (e.g. {"dft_alpha": 1.0})."""
        if self._loss_params is None:
            from dft_peft.losses.registry import validate_loss_params

            self._loss_params = validate_loss_params(self.loss, {})
        return dict(self._loss_params)

    @property
    def source_path(self) -> Path | None:
        """The YAML file this config came from (None when built from a dict)."""
        return self._source

    @property
    def ignored_keys(self) -> dict[str, str]:
        """Axolotl keys that were accepted without effect, each with the reason."""
        return dict(self._ignored)

    @property
    def effective_batch_size(self) -> int:
        """Sequences per optimizer step on one device."""
        return self.micro_batch_size * self.gradient_accumulation_steps

    def reporters(self) -> list[str]:
        """Trackers to log to: `report_to` if given, else derived the way Axolotl does.

        Axolotl turns wandb on when `wandb_project` is set (or `use_wandb: true`) and
        tensorboard with `use_tensorboard: true`.
        """
        if self.report_to is not None:
            return [r for r in self.report_to if r != "none"]
        found = []
        if self.use_wandb or (self.use_wandb is None and self.wandb_project):
            found.append("wandb")
        if self.use_tensorboard:
            found.append("tensorboard")
        return found

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data; `load_config` of it gives the same run."""
        out: dict[str, Any] = {}
        dumped = self.model_dump(mode="json")
        for key, value in dumped.items():
            if key in ("datasets", "test_datasets") and value is not None:
                value = [ds.model_dump(mode="json", exclude_none=True) for ds in getattr(self, key)]
            elif key == "special_tokens" and value is not None:
                value = {k: v for k, v in value.items() if v is not None}
            out[key] = value
            if key == "loss":
                out.update(self.loss_kwargs())
        return out

    def describe(self) -> str:
        """A human-readable summary plus the full resolved config, for `dft-peft validate`."""
        quant = "none"
        if self.load_in_4bit:
            double = ", double quant" if self.bnb_4bit_use_double_quant else ""
            quant = f"4-bit {self.bnb_4bit_quant_type}{double}"
        elif self.load_in_8bit:
            quant = "8-bit"
        targets = (
            "all linear layers" if self.lora_target_linear else f"{self.lora_target_modules}"
        )
        params = ", ".join(f"{k}={v}" for k, v in self.loss_kwargs().items())
        datasets = "; ".join(f"{ds.path} ({ds.type})" for ds in self.datasets)
        length = (
            f"max_steps {self.max_steps}" if self.max_steps else f"num_epochs {self.num_epochs}"
        )
        if self.warmup_steps:
            warmup = f", warmup_steps {self.warmup_steps}"
        elif self.warmup_ratio:
            warmup = f", warmup_ratio {self.warmup_ratio}"
        else:
            warmup = ""
        lines = [
            f"config:      {self.source_path or '(from a mapping)'}",
            f"objective:   loss: {self.loss}" + (f" ({params})" if params else ""),
            f"model:       {self.base_model}",
            f"adapter:     {self.adapter} r={self.lora_r} alpha={self.lora_alpha} "
            f"dropout={self.lora_dropout} on {targets}; quantization: {quant}",
            f"data:        {datasets}",
            f"             sequence_len {self.sequence_len}, sample_packing {self.sample_packing}, "
            f"val_set_size {self.val_set_size}",
            f"batch:       {self.micro_batch_size} x {self.gradient_accumulation_steps} "
            f"accumulation = {self.effective_batch_size} sequences per optimizer step",
            f"schedule:    {length}; {self.optimizer}, lr {self.learning_rate}, "
            f"{self.lr_scheduler}{warmup}",
            f"precision:   bf16 {self.bf16}, fp16 {self.fp16}; gradient_checkpointing "
            f"{self.gradient_checkpointing}; attention {self.attn_implementation or 'default'}",
            f"output_dir:  {self.output_dir}",
        ]
        noted = {k: why for k, why in self._ignored.items() if why != "unset"}
        unset = [k for k, why in self._ignored.items() if why == "unset"]
        if noted:
            lines.append("ignored:     " + ", ".join(f"{k} ({why})" for k, why in noted.items()))
        if unset:
            lines.append("left empty:  " + ", ".join(unset) + " (Axolotl keys, nothing to do)")
        body = yaml.safe_dump(self.to_yaml_dict(), sort_keys=False, allow_unicode=True)
        return "\n".join(lines) + "\n\n# resolved config\n" + body


# ------------------------------------------------------------------------------------ loading


def load_config(path: str | Path, overrides: list[str] | Mapping[str, Any] | None = None) -> Config:
    """Read, check and resolve a YAML config file.

    `overrides` are command-line settings, `["learning_rate=1e-4", "max_steps=5"]` (a leading
    `--` is allowed) or a dict; values are parsed as YAML so numbers and booleans get their type.
    They replace the file's values and go through the same key checks.

    Relative paths (`base_model` when it is a local path, every dataset `path`, `output_dir`,
    `lora_model_dir`, `dataset_prepared_path`, `tokenizer_config`, `base_model_config`,
    `resume_from_checkpoint`) are resolved by one rule:

    1. if the path exists relative to the config file's folder, that is it;
    2. else if it exists relative to the current directory, that is it;
    3. else, for a path that does not exist yet: one starting with `../` is taken relative to the
       config file's folder (it can only have been written from the file's point of view); an
       output path is taken relative to the current directory, as Axolotl does for
       `output_dir: ./outputs/out`; any other input is left as written (a hub id such as
       `NousResearch/Meta-Llama-3-8B`, or a missing file the loader will report).

    Values with a scheme (`pkg://...`, `hf://...`) and absolute paths are left alone.
    """
    path = Path(path).expanduser()
    label = path.name
    if not path.exists():
        raise UserError(f"config file not found: {path} (relative paths start from {Path.cwd()}).")
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass the YAML config file inside it.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(
            f"{_yaml_error_location(path, exc)}: YAML syntax error: {_yaml_problem(exc)}; "
            "check indentation, colons and quotes."
        ) from None
    if data is None:
        raise UserError(f"{label}: the file is empty; add `key: value` lines (`base_model: ...`).")
    if not isinstance(data, dict):
        raise UserError(
            f"{label}: the top level must be `key: value` lines, not a {type(data).__name__}."
        )
    _check_duplicate_keys(text, path)
    return Config.from_dict(data, source=path, base_dir=path.parent, overrides=overrides)


def parse_overrides(overrides: list[str] | Mapping[str, Any]) -> dict[str, Any]:
    """`["--max_steps=5", "bf16=false"]` -> {"max_steps": 5, "bf16": False}: values are YAML."""
    if isinstance(overrides, Mapping):
        return dict(overrides)
    parsed: dict[str, Any] = {}
    for item in overrides:
        text = str(item).lstrip("-")
        key, sep, value = text.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"override `{item}` must look like `key=value` (e.g. `--max_steps=5`).")
        try:
            parsed[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise UserError(f"override `{item}`: the value is not valid YAML; quote it.") from None
    return parsed


# ------------------------------------------------------------------------------------ helpers


def _accepts_none(annotation: Any) -> bool:
    """Whether a field's type includes None (so an empty `key:` is a value, not "unset")."""
    if annotation is Any or annotation is None or annotation is type(None):
        return True
    return type(None) in typing.get_args(annotation)


def _loss_param_owners() -> dict[str, str]:
    """Every objective parameter key -> the objective that declares it."""
    from dft_peft.losses.registry import loss_param_names

    return {key: name for name, keys in loss_param_names().items() for key in keys}


def _supported_keys() -> set[str]:
    return set(Config.model_fields) | set(INPUT_ONLY_KEYS)


def is_axolotl_key(key: str) -> bool:
    """Whether `key` is a real Axolotl option that dft-peft does not implement."""
    return (
        key in AXOLOTL_UNSUPPORTED_KEYS
        or key in AXOLOTL_HARMLESS_KEYS
        or key.startswith(AXOLOTL_UNSUPPORTED_PREFIXES)
    )


def _is_off(key: str, value: Any) -> bool:
    """Whether an unsupported key's value means the feature is unused (so ignoring it is exact).

    Axolotl's example files list many keys left empty (`deepspeed:`) or off (`group_by_length:
    false`); those must not stop a config from loading.
    """
    if key in DEFAULT_TRUE_KEYS:
        return value is None or value is True
    if value is None or value is False:
        return True
    if isinstance(value, (str, list, dict)) and not value:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _unknown_key_message(key: str, candidates: set[str]) -> str:
    hint = did_you_mean(key, candidates)
    if not hint:
        near = closest(key, AXOLOTL_UNSUPPORTED_KEYS)
        if near:
            hint = f" Did you mean `{near}` (an Axolotl option dft-peft does not support)?"
        else:
            hint = " It is not a dft-peft or Axolotl option; remove it."
    return f"unknown key `{key}`.{hint}"


def _check_override_key(key: str) -> None:
    supported = _supported_keys() | set(_loss_param_owners())
    if key in supported or is_axolotl_key(key):
        return
    raise UserError(f"command-line override `--{key}`: {_unknown_key_message(key, supported)}")


def _sort_keys(
    raw: dict[Any, Any], label: str, strict: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """Split top-level keys into schema fields, objective parameters and ignored Axolotl keys.

    Raises for typos (always) and for Axolotl keys we do not implement (unless `strict: false`).
    """
    supported = _supported_keys()
    owners = _loss_param_owners()
    fields: dict[str, Any] = {}
    loss_params: dict[str, Any] = {}
    ignored: dict[str, str] = {}
    unsupported: list[str] = []
    typos: list[str] = []
    for key, value in raw.items():
        if not isinstance(key, str):
            raise UserError(
                f"{label}: top-level key {key!r} is not a name; keys are text such as `lora_r`."
            )
        if key in supported:
            fields[key] = value
        elif key in owners:
            if value is not None:  # an empty `dft_alpha:` means "use the default"
                loss_params[key] = value
        elif key in AXOLOTL_HARMLESS_KEYS:
            ignored[key] = "no effect in dft-peft"
        elif is_axolotl_key(key):
            if _is_off(key, value):
                ignored[key] = "unset"
            else:
                unsupported.append(key)
        else:
            typos.append(key)
    if typos:
        candidates = supported | set(owners)
        first = _unknown_key_message(typos[0], candidates)
        more = f" (also unknown: {', '.join(f'`{k}`' for k in typos[1:])})" if typos[1:] else ""
        raise UserError(f"{label}: {first}{more}")
    if unsupported and strict:
        if len(unsupported) == 1:
            key = unsupported[0]
            hint = f" ({UNSUPPORTED_HINTS[key]})" if key in UNSUPPORTED_HINTS else ""
            raise UserError(
                f"{label}: `{key}` is an Axolotl option dft-peft does not support{hint}; remove it "
                f"(or set `strict: false` to ignore it with a warning)."
            )
        names = ", ".join(f"`{k}`" for k in unsupported)
        raise UserError(
            f"{label}: {names} are Axolotl options dft-peft does not support; remove them "
            f"(or set `strict: false` to ignore them with a warning)."
        )
    for key in unsupported:
        warnings.warn(
            f"{label}: ignoring `{key}`, an Axolotl option dft-peft does not support "
            "(strict: false).",
            UserWarning,
            stacklevel=4,
        )
        ignored[key] = "not supported, ignored (strict: false)"
    return fields, loss_params, ignored


def _drop_axolotl_plugins(
    fields: dict[str, Any], label: str, strict: bool, ignored: dict[str, str]
) -> dict[str, Any]:
    """Axolotl's own plugins (`axolotl.integrations.*`) cannot run here: error, or warn and drop."""
    plugins = fields.get("plugins")
    if not isinstance(plugins, list):
        return fields
    axolotl = [p for p in plugins if isinstance(p, str) and p.startswith("axolotl.")]
    if not axolotl:
        return fields
    if strict:
        raise UserError(
            f"{label}: `plugins: {axolotl[0]}` is an Axolotl plugin dft-peft does not support; "
            "remove it (or set `strict: false` to ignore it with a warning)."
        )
    for name in axolotl:
        warnings.warn(
            f"{label}: ignoring Axolotl plugin `{name}` (strict: false).", UserWarning, stacklevel=4
        )
        ignored[f"plugins: {name}"] = "not supported, ignored (strict: false)"
    kept = [p for p in plugins if p not in axolotl]
    return {**fields, "plugins": kept or None}


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a Jinja template or other long text is not a path
        return False


def _resolve_path(value: Any, base_dir: Path | None, *, output: bool) -> Any:
    """Apply `load_config`'s path rule to one value."""
    if not isinstance(value, str) or not value.strip() or "://" in value or "\n" in value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if base_dir is not None and _exists(base_dir / path):
        return os.path.normpath(os.path.abspath(base_dir / path))
    if _exists(path):
        return os.path.normpath(os.path.abspath(path))
    if base_dir is not None and path.parts and path.parts[0] == "..":
        return os.path.normpath(os.path.abspath(base_dir / path))
    return os.path.normpath(os.path.abspath(path)) if output else value


def _resolve_paths(fields: dict[str, Any], base_dir: Path | None) -> None:
    for key in _INPUT_PATH_KEYS:
        if key in fields:
            fields[key] = _resolve_path(fields[key], base_dir, output=False)
    for key in _OUTPUT_PATH_KEYS:
        if key in fields:
            fields[key] = _resolve_path(fields[key], base_dir, output=True)
    if "output_dir" not in fields or fields["output_dir"] is None:
        fields["output_dir"] = _resolve_path(
            Config.model_fields["output_dir"].default, base_dir, output=True
        )
    for key in ("datasets", "test_datasets"):
        entries = fields.get(key)
        if not isinstance(entries, list):
            continue
        resolved = []
        for entry in entries:
            if isinstance(entry, Mapping) and isinstance(entry.get("path"), str):
                entry = {**entry, "path": _resolve_path(entry["path"], base_dir, output=False)}
            resolved.append(entry)
        fields[key] = resolved
    jinja = fields.get("chat_template_jinja")
    if isinstance(jinja, str) and base_dir is not None and len(jinja) < 1024:
        candidate = _resolve_path(jinja, base_dir, output=False)
        if candidate != jinja and _exists(Path(candidate)):
            fields["chat_template_jinja"] = candidate


# ------------------------------------------------------------------------- error formatting

_TYPE_PHRASES = {
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be text",
    "list_type": "must be a list (one `- item` per line)",
    "dict_type": "must be a mapping of `key: value` lines",
    "model_type": "must be a mapping of `key: value` lines",
    "model_attributes_type": "must be a mapping of `key: value` lines",
    "too_short": "must not be empty",
}

_REQUIRED_HINTS = {
    "base_model": "set a Hugging Face model id, a local folder or pkg://<package>/<file>.gguf",
    "learning_rate": "Axolotl has no default either; add e.g. `learning_rate: 2e-4`",
    "datasets": "add at least one entry, e.g. `- path: data/train.jsonl` with `type: alpaca`",
}

# Pieces of a pydantic error location that name a union branch, not a key.
_LOC_NOISE = re.compile(r"^(int|float|str|bool|list|dict|none|function-.*|[a-z_]+\[.*\])$")


def _format_loc(loc: Iterable[Any]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and not _LOC_NOISE.match(part):
            text += f".{part}" if text else part
    return text


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _model_for(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    if loc and loc[0] in ("datasets", "test_datasets"):
        return DatasetConfig
    if loc and loc[0] == "special_tokens":
        return SpecialTokens
    return Config


def _describe_validation_error(exc: ValidationError) -> str:
    """pydantic's multi-line report -> one line naming the key, what is wrong and the value."""
    errors = exc.errors()
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    key = _format_loc(loc)
    kind = err.get("type", "")
    got = f" (got {_short_repr(err['input'])})" if "input" in err else ""
    ctx = err.get("ctx") or {}

    if kind in ("value_error", "assertion_error"):
        message = str(ctx.get("error", err.get("msg", ""))).removeprefix("Value error, ")
        if not key:
            return message
        text = f"`{key}`: {message}{'' if '`' in message else got}"
        return text if text.endswith((".", "?")) else text + "."
    if kind == "missing":
        hint = _REQUIRED_HINTS.get(key, "add it")
        return f"`{key}` is required: {hint}."
    if kind == "extra_forbidden":
        model = _model_for(loc)
        last = loc[-1] if loc else key
        what = "dataset key" if model is DatasetConfig else "key"
        names = set(model.model_fields) if model is not None else set()
        return f"`{key}` is not a valid {what}.{did_you_mean(str(last), names)}"
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "")
        return f"`{key}` must be one of {expected}{got}."
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        symbol = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
                  "less_than": "<"}[kind]
        bound = next(iter(ctx.values()), "?")
        return f"`{key}` must be {symbol} {bound}{got}."
    phrase = _TYPE_PHRASES.get(kind, err.get("msg", "is invalid").lower())
    return f"`{key}` {phrase}{got}."


def _yaml_error_location(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return str(path)
    return f"{path}:{mark.line + 1}:{mark.column + 1}"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{problem} ({context})" if context else str(problem)
    return " ".join(text.split())


def _check_duplicate_keys(text: str, path: Path) -> None:
    """A key written twice silently keeps the last value in YAML; make it an error instead."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                    line = key_node.start_mark.line + 1
                    if key_node.value in seen:
                        raise UserError(
                            f"{path}:{line}: `{key_node.value}` is set twice (lines "
                            f"{seen[key_node.value]} and {line}); keep one."
                        )
                    seen[key_node.value] = line
                stack.append(value_node)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
