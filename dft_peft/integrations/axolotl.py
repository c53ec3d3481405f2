"""Axolotl plugin: train with dft-peft's objectives inside real Axolotl.

In an Axolotl YAML::

    plugins:
      - dft_peft.integrations.axolotl.DFTPlugin
    loss: dft          # the default once the plugin is listed

Without the plugin Axolotl silently drops the unknown `loss:` key and trains plain
cross-entropy, so the plugin line is what matters.

What the plugin does:

- adds `loss` and the objectives' flat parameter keys (`dft_alpha`, ... — whatever
  `dft_peft.losses.registry.loss_param_names()` lists) to Axolotl's config schema,
  checking them with dft-peft's own messages (an unknown objective lists the
  available ones and suggests the closest);
- refuses settings that would fight over the loss (Liger's fused linear
  cross-entropy and token scaling, Cut Cross Entropy, chunked cross-entropy, RL /
  reward-model training) with a message saying what to remove;
- in `post_model_load` — the hook Axolotl runs once the model is final, LoRA /
  QLoRA adapter and Axolotl's own patches included, for every adapter type and for
  full fine-tuning, and before the trainer is built — calls
  `dft_peft.patch_model(model, loss=..., **params)`, so the model's forward returns
  the objective from dft-peft's chunked fused head (no full logits) and honours
  `num_items_in_batch` (gradient accumulation) and packed batches (sample packing);
- in `post_trainer_create` installs dft-peft's metrics callback, so each log line
  carries plain `ce` and mean target-token probability `p_mean` beside the loss.
"""

from __future__ import annotations

from typing import Any

try:
    from axolotl.integrations.base import BasePlugin
    from axolotl.utils.logging import get_logger
except ImportError as _exc:  # pragma: no cover - exercised without axolotl only
    raise ImportError(
        "dft_peft.integrations.axolotl is an Axolotl plugin and needs Axolotl: "
        "`pip install axolotl` (tested with axolotl==0.19.0; see "
        "scripts/axolotl-venv.sh). dft-peft itself works without it: use "
        "`dft-peft train` or `dft_peft.patch_model`."
    ) from _exc

from pydantic import BaseModel, Field, create_model, model_validator

from dft_peft.errors import UserError

LOG = get_logger("axolotl.integrations.dft_peft")

PLUGIN_PATH = "dft_peft.integrations.axolotl.DFTPlugin"
DEFAULT_LOSS = "dft"

# (config key, why it fights dft-peft's loss). Each is refused when truthy.
_FIGHTING_FLAGS: tuple[tuple[str, str], ...] = (
    (
        "liger_fused_linear_cross_entropy",
        "Liger's fused linear cross-entropy replaces the model's forward with plain CE",
    ),
    (
        "liger_use_token_scaling",
        "Liger's token scaling reweights Liger's fused CE, which the DFT plugin replaces",
    ),
    (
        "cut_cross_entropy",
        "Cut Cross Entropy replaces the model's forward with plain CE",
    ),
    (
        "chunked_cross_entropy",
        "chunked cross-entropy replaces the CE loss function",
    ),
    (
        "use_eaft",
        "Axolotl's EAFT computes its own loss from full logits; set `loss: eaft` instead (the "
        "same objective in dft-peft's fused path, with `eaft_alpha` / `eaft_k`)",
    ),
    (
        "orpo_alpha",
        "ORPO adds its own loss term",
    ),
    (
        "reward_model",
        "reward-model training has its own loss",
    ),
    (
        "process_reward_model",
        "process-reward-model training has its own loss",
    ),
)

# Plugins that replace the causal-LM loss themselves.
_FIGHTING_PLUGINS: tuple[tuple[str, str], ...] = (
    ("cut_cross_entropy", "Cut Cross Entropy replaces the model's forward with plain CE"),
)


def _registry():
    from dft_peft.losses import registry

    return registry


def loss_param_names() -> list[str]:
    """The flat YAML keys the registered objectives take (`dft_alpha`, ...), all objectives."""
    keys: set[str] = set()
    for names in _registry().loss_param_names().values():
        keys.update(names)
    return sorted(keys - {"loss"})


def _get(cfg: Any, key: str) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key)
    return getattr(cfg, key, None)


def loss_settings(cfg: Any) -> tuple[str, dict[str, Any]]:
    """(objective name, its parameters) from an Axolotl config (raw dict or DictDefault).

    Raises `UserError` with dft-peft's one-line message for an unknown objective,
    a parameter that does not belong to it, or a bad value.
    """
    name = _get(cfg, "loss")
    if name is None:
        name = DEFAULT_LOSS
    if not isinstance(name, str):
        raise UserError(f"`loss` must be the name of an objective, got {name!r}.")
    params = {key: _get(cfg, key) for key in loss_param_names() if _get(cfg, key) is not None}
    params = _without_axolotl_defaults(name, params)
    checked = _registry().validate_loss_params(name, params)
    if isinstance(checked, dict):
        params = checked
    return name, params


# Keys that are both an objective's parameter and a field of Axolotl's own schema, with the
# default Axolotl fills in on every validated config (`eaft_alpha: 1.0` even without EAFT).
AXOLOTL_SCHEMA_DEFAULTS = {"eaft_alpha": 1.0, "eaft_k": 20}


def _without_axolotl_defaults(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Drop another objective's parameter that only holds Axolotl's schema default, so that
    `loss: dft` is not refused for the `eaft_alpha: 1.0` Axolotl's validation adds."""
    own = _registry().loss_param_names().get(name, set())
    return {
        key: value
        for key, value in params.items()
        if key in own or AXOLOTL_SCHEMA_DEFAULTS.get(key, object()) != value
    }


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def fighting_settings(cfg: Any) -> list[str]:
    """One line per setting that would fight dft-peft over the loss: what to remove."""
    problems = []
    for key, why in _FIGHTING_FLAGS:
        if _get(cfg, key):
            problems.append(f"remove `{key}: {_yaml(_get(cfg, key))}` ({why})")
    rl = _get(cfg, "rl")
    if rl:
        problems.append(
            f"remove `rl: {rl}` (DFT is a supervised fine-tuning objective; "
            "RL trainers compute their own loss)"
        )
    for plugin in _get(cfg, "plugins") or []:
        for needle, why in _FIGHTING_PLUGINS:
            if needle in str(plugin):
                problems.append(f"remove `{plugin}` from `plugins:` ({why})")
    return problems


def check_config(cfg: Any) -> tuple[str, dict[str, Any]]:
    """Validate everything the plugin needs from `cfg`; raise `UserError` on the first problem."""
    problems = fighting_settings(cfg)
    if problems:
        raise UserError(
            "dft-peft's DFT plugin computes the loss itself; "
            + "; ".join(problems)
            + ", or drop the plugin to train plain cross-entropy."
        )
    name, params = loss_settings(cfg)
    needs = getattr(_registry().get_loss(name), "needs", ())
    if "ref_logits" in needs and not _get(cfg, "adapter"):
        raise UserError(
            f"loss `{name}` anchors to the base model, which it reads by disabling the adapter: "
            "set `adapter: lora` or `adapter: qlora`."
        )
    return name, params


class _DFTArgsBase(BaseModel):
    """Config keys the DFT plugin adds to Axolotl's schema."""

    loss: str | None = Field(
        default=DEFAULT_LOSS,
        json_schema_extra={
            "description": "Training objective from dft-peft (`dft`, ...). Defaults to "
            "`dft` when the DFT plugin is listed."
        },
    )

    @model_validator(mode="before")
    @classmethod
    def _check_dft_settings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            try:
                check_config(data)
            except UserError as exc:
                # pydantic turns ValueError into a ValidationError naming the message
                raise ValueError(str(exc)) from exc
        return data


def _build_args_model() -> type[BaseModel]:
    fields: dict[str, Any] = {
        name: (Any, Field(default=None, json_schema_extra={"description": "dft-peft objective parameter"}))
        for name in loss_param_names()
    }
    return create_model("DFTArgs", __base__=_DFTArgsBase, __module__=__name__, **fields)


DFTArgs = _build_args_model()


class DFTPlugin(BasePlugin):
    """Axolotl plugin that trains with dft-peft's objective (`loss: dft` by default)."""

    def get_input_args(self) -> str:
        return f"{__name__}.DFTArgs"

    def register(self, cfg: dict):
        # Raw, unparsed config: fail before any download or model load. The schema
        # validator repeats the check for configs built without this hook.
        try:
            check_config(cfg)
        except UserError as exc:
            raise ValueError(str(exc)) from exc

    def post_model_load(self, cfg, model):
        import dft_peft

        name, params = check_config(cfg)
        dft_peft.patch_model(model, loss=name, **params)
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        LOG.info(
            f"dft-peft: training objective `{name}`{' (' + shown + ')' if shown else ''} "
            f"patched into {type(model).__name__} (fused chunked head, no full logits)"
        )

    def post_trainer_create(self, cfg, trainer):
        import dft_peft
        from dft_peft.losses import patch_state

        if patch_state(trainer.model) is None:
            # Something between model load and trainer creation replaced the model
            # object: patch the one the trainer will call.
            name, params = check_config(cfg)
            dft_peft.patch_model(trainer.model, loss=name, **params)
            LOG.info(f"dft-peft: objective `{name}` patched into the trainer's model")
        # The patched forward consumes `num_items_in_batch`, so the trainer must pass it
        # (gradient accumulation then averages over all target tokens of the step).
        if hasattr(trainer, "model_accepts_loss_kwargs") and not trainer.model_accepts_loss_kwargs:
            trainer.model_accepts_loss_kwargs = True
        from dft_peft.training.metrics import install_metrics_callback

        install_metrics_callback(trainer)


__all__ = ["DFTPlugin", "DFTArgs", "check_config", "loss_settings", "fighting_settings"]
