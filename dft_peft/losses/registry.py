"""The registry of training objectives, keyed by name.

An objective is a small function: fp32 logits of a chunk of valid tokens `[n, V]` and their
targets `[n]` (plus its own keyword parameters) -> per-token losses `[n]`. It never sees padding,
masking, chunking or normalisation: the fused path in `fused.py` owns those, so a new objective is
a few lines and inherits the memory savings and exact gradient accumulation for free.

Parameters are flat, globally unique names (`dft_alpha`, `asft_lambda`, ...) because they sit at
the top level of a user's YAML file next to Axolotl's own keys. Each objective declares them with
a pydantic model so `dft_alpha: 1.5` fails before any weights are loaded.

Third-party packages add objectives through the entry-point group `dft_peft.losses`: the entry
point is loaded (which runs its `@register_loss` decorators) the first time the registry is read.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from dft_peft.errors import UserError, did_you_mean
from dft_peft.losses.logprobs import target_logprobs

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dft_peft.losses"

Objective = Callable[..., torch.Tensor]


class NoParams(BaseModel):
    """Parameters of an objective that takes none."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class LossSpec:
    """A registered objective: its function, its parameter schema and what extra inputs it needs.

    `needs` names per-token inputs beyond logits and targets that the fused path must supply
    chunk by chunk (for example `ref_logits`, the frozen base model's logits for an anchor term).
    """

    name: str
    fn: Objective
    params: type[BaseModel] = NoParams
    needs: tuple[str, ...] = field(default=())
    description: str = ""
    # For objectives that depend only on log p(target): the same loss as a function of that
    # [n] vector. The fused path then forms the [n, V] gradient in place in two passes instead
    # of running autograd over the whole chunk of logits.
    of_logp: Objective | None = None
    # Whether `of_logp` also takes the chunk's `targets` (e.g. DFT keeping SFT's weight on
    # special tokens); read from its signature at registration.
    of_logp_takes_targets: bool = False

    @property
    def param_names(self) -> set[str]:
        return set(self.params.model_fields)


_REGISTRY: dict[str, LossSpec] = {}
_entry_points_loaded = False


def register_loss(
    name: str,
    *,
    params: type[BaseModel] = NoParams,
    needs: tuple[str, ...] = (),
) -> Callable[[Objective], Objective]:
    """Decorator: register `fn(logits, targets, **params) -> per-token losses` under `name`."""

    def decorator(fn: Objective) -> Objective:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            logger.warning("dft-peft: objective %r registered again; the newer one wins", name)
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = LossSpec(name, fn, params, tuple(needs), doc[0] if doc else "")
        return fn

    return decorator


def register_loss_of_logp(
    name: str, *, params: type[BaseModel] = NoParams
) -> Callable[[Objective], Objective]:
    """Decorator for objectives of the target log-probability alone: `fn(logp [n], **params)`.

    Registers both forms: the general `(logits, targets)` one, which any caller can use, and the
    `of_logp` one, which lets the fused path skip autograd over the vocabulary.
    """

    def decorator(fn: Objective) -> Objective:
        takes_targets = "targets" in inspect.signature(fn).parameters

        def on_logits(logits: torch.Tensor, targets: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            if takes_targets:
                kwargs["targets"] = targets
            return fn(target_logprobs(logits, targets), **kwargs)

        on_logits.__name__ = on_logits.__qualname__ = fn.__name__
        on_logits.__doc__ = fn.__doc__
        register_loss(name, params=params)(on_logits)
        _REGISTRY[name] = dataclasses.replace(_REGISTRY[name], of_logp=fn, of_logp_takes_targets=takes_targets)
        return fn

    return decorator


def _load_entry_points() -> None:
    """Import every `dft_peft.losses` entry point once; a broken plugin warns instead of crashing."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a third-party bug must not break training with built-ins
            logger.warning("dft-peft: could not load objective plugin %r: %s", ep.name, exc)
            continue
        if callable(obj) and ep.name not in _REGISTRY and not isinstance(obj, type):
            register_loss(ep.name)(obj)


def _ensure_builtins() -> None:
    # The built-ins registered themselves when `dft_peft.losses` imported `objectives`; the
    # plugins of other packages come in through their entry points, once.
    _load_entry_points()


def available_losses() -> list[str]:
    """Names of every registered objective, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def get_loss(name: str) -> LossSpec:
    """The objective registered as `name`; an unknown name lists the options and the closest."""
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        names = sorted(_REGISTRY)
        raise UserError(
            f"unknown loss `{name}`: available objectives are {', '.join(names)}."
            + did_you_mean(str(name), names)
        ) from None


def loss_param_names() -> dict[str, set[str]]:
    """Objective name -> the flat config keys it accepts (e.g. {"dft": {"dft_alpha"}})."""
    _ensure_builtins()
    return {name: spec.param_names for name, spec in _REGISTRY.items()}


def owner_of_param(key: str) -> str | None:
    """The objective that declares `key`, used to explain a parameter given to the wrong loss."""
    for name, keys in loss_param_names().items():
        if key in keys:
            return name
    return None


def validate_loss_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validate `params` for objective `name`; returns them with defaults filled in.

    Raises `UserError` (one line) for an unknown objective, a parameter that belongs to another
    objective, an unknown parameter, or a value out of range.
    """
    spec = get_loss(name)
    for key in params:
        if key in spec.param_names:
            continue
        owner = owner_of_param(key)
        if owner is not None:
            raise UserError(
                f"`{key}` is a parameter of loss `{owner}`, but `loss: {name}` is selected; "
                f"remove `{key}` or set `loss: {owner}`."
            )
        accepted = ", ".join(sorted(spec.param_names)) or "none"
        raise UserError(
            f"unknown parameter `{key}` for loss `{name}` (accepted: {accepted})."
            + did_you_mean(key, spec.param_names)
        )
    try:
        return _without_quiet_defaults(spec.params(**params))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or name
        raise UserError(
            f"loss `{name}`: `{key}` {err['msg'].lower()} (got {err.get('input')!r})."
        ) from None


def _without_quiet_defaults(model: BaseModel) -> dict[str, Any]:
    """The parameters as a dict, leaving out opt-in switches (fields marked `omit_default`) that
    are at their default, so adding such a switch does not change every run's saved parameters."""
    out = model.model_dump()
    for key, info in type(model).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("omit_default") and out.get(key) == info.default:
            out.pop(key, None)
    return out
