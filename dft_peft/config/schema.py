"""Load and validate an Axolotl-style YAML config.

The product promise is that a hobbyist adds `loss: dft` to the Axolotl QLoRA config they already
have and it runs. So key names, defaults and meanings follow Axolotl's schema
(`axolotl/utils/schemas/*.py`), and no key is ever silently dropped:

* a key that is neither ours nor Axolotl's (a typo) is an error that suggests the closest key;
* an Axolotl key dft-peft does not implement (`rl`, `relora`, `unsloth_*`, ...) is an error,
  or with `strict: false` a warning naming it. Left empty or off (`rl:`, `group_by_length:
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

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from dft_peft.config.chat_templates import check_template_name
from dft_peft.config.checks import check_consistency, reject_bool_number
from dft_peft.config.describe import describe
from dft_peft.config.fsdp import normalise_fsdp_config
from dft_peft.config.loop_keys import check_deepspeed
from dft_peft.config.relora_keys import off_means_unset
from dft_peft.config.model_fields import ModelFields
from dft_peft.config.normalize import normalize_inputs
from dft_peft.losses.registry import validate_loss_params
from dft_peft.config.datasets import DatasetConfig

Optimizer = Literal[
    "adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
    "adamw_torch_8bit", "adamw_torch_4bit",
]
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt"]
Reporter = Literal["tensorboard", "wandb", "none"]

# transformers' OptimizerNames spells the bitsandbytes AdamW two ways; keep one.
OPTIMIZER_ALIASES = {"adamw_8bit": "adamw_bnb_8bit"}


class SpecialTokens(BaseModel):
    """Axolotl's `special_tokens:` block: tokens to set (or add) on the tokenizer."""

    model_config = ConfigDict(extra="forbid")

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    additional_special_tokens: list[str] | None = None


class ConfigSchema(ModelFields):
    """The fields of a run configuration, their validators and queries; names, defaults and
    meanings follow Axolotl. Users get `dft_peft.config.Config` (this plus `from_dict`, defined
    beside `load_config` in load.py, which reads the YAML through these fields)."""

    # allow_inf_nan=False: `learning_rate: .inf` is refused up front, not found as a NaN adapter.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    # --- objective -----------------------------------------------------------------------------
    loss: str = Field(default="sft", description="Objective in the loss registry (sft, dft, ...).")
    prior_check: bool = Field(
        default=True,
        description="Before training, check on a sample of rows whether the base model's prior suits DFT.",
    )
    prior_check_rows: int = Field(default=64, ge=1, description="Training rows the prior check runs.")

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
    dataset_exact_deduplication: bool | None = Field(default=None, description="drop rows that repeat another row exactly.")
    excess_length_strategy: Literal["drop", "truncate"] = "drop"
    special_tokens: SpecialTokens | None = None
    tokens: list[str] | None = None
    chat_template: str | None = None
    chat_template_jinja: str | None = None
    eot_tokens: list[str] | None = Field(
        default=None, description="end-of-turn tokens of chat data (Axolotl: default the EOS token)"
    )

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
    seed: int = Field(default=42, ge=0, lt=2**32)  # numpy (transformers set_seed) takes 0..2**32-1
    # Axolotl's loop keys (meanings: config/loop_keys.py; TrainingArguments: training/loop_options.py)
    eval_batch_size: int | None = Field(default=None, ge=1, description="rows per eval batch (default micro_batch_size).")
    lr_quadratic_warmup: bool | None = Field(default=None, description="cosine schedule: warm up as (step/warmup)^2.")
    early_stopping_patience: int | None = Field(default=None, ge=0, description="stop after this many evaluations without a better eval loss.")
    load_best_model_at_end: bool | None = False
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    torch_compile: bool | Literal["auto"] | None = Field(default=None, description="torch.compile the model (auto: on for torch >= 2.5.1).")
    torch_compile_backend: str | None = None
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune"] | None = None
    # Axolotl's ReLoRA and jagged restarts (rules: config/relora_keys.py; run: training/relora.py)
    relora: bool | None = Field(default=None, description="merge LoRA into the base and restart it every jagged_restart_steps.")
    relora_prune_ratio: float | None = Field(default=None, ge=0.0, le=1.0, description="share of Adam's moments zeroed at a restart (default 0.9; 0.999 for reset).")
    relora_prune_method: Literal["magnitude", "random", "reset"] | None = Field(default=None, description="which moments are zeroed (default magnitude: the smallest).")
    relora_cpu_offload: bool | None = Field(default=None, description="compute the merges on the CPU.")
    jagged_restart_steps: int | None = Field(default=None, ge=1, description="steps between learning-rate restarts (and ReLoRA merges).")
    jagged_restart_warmup_steps: int | None = Field(default=None, ge=1, description="warmup steps after each restart (default 10).")
    jagged_restart_anneal_steps: int | None = Field(default=None, ge=1, description="anneal steps before each restart (default 1).")

    # --- precision and memory ------------------------------------------------------------------
    bf16: bool | Literal["auto"] | None = Field(
        default="auto", description="auto: bf16 where the GPU supports it; null counts as false."
    )
    fp16: bool | None = None
    tf32: bool | Literal["auto"] | None = None
    gradient_checkpointing: bool | Literal["offload"] = Field(
        default=False, description="offload: checkpointed layer inputs wait in CPU memory (Axolotl's key)."
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    # Axolotl's tiled MLP keys (src/axolotl/utils/schemas/config.py, 0.19): `tiled_mlp: bool`,
    # `tiled_mlp_num_shards: int | None`; the same meaning here (dft_peft/memory/tiled_mlp.py),
    # except the default shard count: Axolotl uses ceil(seq_len / hidden_size) shards, we size
    # shards so one shard's MLP intermediates stay under 256 MiB (tiled_mlp.DEFAULT_SHARD_BUDGET_BYTES).
    tiled_mlp: bool = Field(
        default=False, description="run each decoder layer's MLP over sequence shards (long contexts)."
    )
    tiled_mlp_num_shards: int | None = Field(
        default=None, ge=1, description="shards per MLP call; unset: shards of at most 256 MiB of intermediates."
    )
    memory_check: bool = Field(
        default=True, description="false: `dft-peft train` skips the will-it-fit check on a CUDA GPU."
    )

    # --- several processes (torchrun / accelerate launch; see dft_peft/distributed.py) ----------
    fsdp_version: int | None = Field(default=None, description="2: FSDP2 (the only version supported).")
    fsdp_config: dict[str, Any] | None = Field(
        default=None, description="Axolotl's FSDP block (CUDA GPUs only; e.g. reshard_after_forward)."
    )
    deepspeed: str | dict[str, Any] | None = Field(default=None, description="DeepSpeed JSON (path or mapping), ZeRO stage 0-2.")
    ddp_find_unused_parameters: bool | None = None

    # --- checkpoints, logging, evaluation ------------------------------------------------------
    output_dir: str = "./model-out"
    logging_steps: int | None = Field(default=None, ge=1)
    save_steps: int | float | None = None
    saves_per_epoch: int | None = Field(default=None, ge=1)
    eval_steps: int | float | None = None
    evals_per_epoch: int | None = Field(default=None, ge=0, description="0: no evaluation during training.")
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
    loss_watchdog_threshold: float | None = Field(
        default=None, description="stop when the logged loss stays above this (see dft_peft/watchdog.py)"
    )
    loss_watchdog_patience: int | None = Field(default=None, ge=1, description="logged losses in a row (default 3)")
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
        return normalize_inputs(data, cls.model_fields)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: Any) -> Any:
        reject_bool_number(value, info.field_name, cls.model_fields[info.field_name].annotation)
        return value

    @field_validator("jagged_restart_warmup_steps", "jagged_restart_anneal_steps", mode="before")
    @classmethod
    def _false_is_unset(cls, value: Any) -> Any:
        return off_means_unset(value)

    @field_validator("fsdp_config")
    @classmethod
    def _fsdp_config_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return normalise_fsdp_config(value)

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_alias(cls, value: Any) -> Any:
        return OPTIMIZER_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("deepspeed", mode="before")
    @classmethod
    def _deepspeed_zero_stage(cls, value: Any) -> Any:
        return check_deepspeed(value)

    @field_validator("bf16", "tf32", "torch_compile", mode="before")
    @classmethod
    def _bool_or_auto(cls, value: Any) -> Any:
        if value is None or isinstance(value, bool) or value == "auto":
            return value
        raise ValueError("must be true, false or auto")

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _plain_checkpointing(cls, value: Any) -> Any:
        if isinstance(value, str) and value in ("offload_disk", "unsloth"):
            raise ValueError(
                f"must be true, false or offload (Axolotl's `{value}` mode is not supported by dft-peft)"
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
        return value if value is None else check_template_name(value)

    # ----------------------------------------------------------------------------- consistency

    @model_validator(mode="after")
    def _eot_tokens_reach_datasets(self) -> ConfigSchema:
        """Axolotl reads `eot_tokens` at the top level; the data layer reads it per entry."""
        if self.eot_tokens is not None:
            for entry in [*self.datasets, *(self.test_datasets or [])]:
                if entry.eot_tokens is None:
                    entry.eot_tokens = list(self.eot_tokens)
        return self

    @model_validator(mode="after")
    def _check_consistency(self) -> ConfigSchema:
        check_consistency(self)
        if self.pad_to_sequence_len is None:
            self.pad_to_sequence_len = self.sample_packing
        return self

    # -------------------------------------------------------------------------------- queries

    def loss_kwargs(self) -> dict[str, Any]:
        """The chosen objective's parameters, defaults filled in (e.g. {"dft_alpha": 1.0})."""
        if self._loss_params is None:
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
        return describe(self)
