"""Inject an objective into a Hugging Face causal LM: `patch_model(model, loss="dft")`.

The loss goes into the model, not into a trainer, so the same patch serves our runner, Axolotl,
TRL and a hand-written loop. The patched `forward` runs the decoder as the original does, then,
when labels are given, computes the objective from the final hidden states and the LM head
through the fused path: the `[tokens, vocab]` logits are never built in training. Without labels
(generation, evaluation of logits) the original forward runs untouched.

Every Hugging Face causal LM we target (Llama, Qwen2, Mistral, Gemma 1-3, Phi-3, ...) is a
decoder (`get_decoder()`) plus an output embedding (`get_output_embeddings()`) with optional
logit scaling / soft-capping in the config, so one generic forward covers them all.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dft_peft.losses.fused import LogitTransform, Plan, fused_loss_from_plan, make_plan
from dft_peft.losses.router_aux import router_aux_loss
from dft_peft.losses.stats import TokenStats

PATCH_ATTR = "_dft_peft_patch"


@dataclass
class PatchState:
    """What a patched model carries: its objective and the diagnostics gathered per mode."""

    loss: str
    params: dict[str, Any]
    plan_train: Plan
    plan_eval: Plan
    original_forward: Any
    forward_attr: str
    train_stats: TokenStats = field(default_factory=TokenStats)
    eval_stats: TokenStats = field(default_factory=TokenStats)


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers `*ForCausalLM` inside `model` (itself, or under a peft wrapper)."""
    inner = model
    # PeftModel -> LoraModel -> CausalLM; each exposes `get_base_model` or `.model`.
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    if not hasattr(inner, "get_output_embeddings") or not hasattr(inner, "get_decoder"):
        raise TypeError(
            f"patch_model needs a Hugging Face causal LM (with get_decoder/get_output_embeddings), "
            f"got {type(model).__name__}"
        )
    return inner


@functools.cache
def _peft_head_wrappers() -> tuple[Any, Any]:
    """peft's LoRA layer and modules_to_save wrapper classes, or () each without peft.

    Resolved once: the head is looked up on every forward pass."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # peft missing: plain heads only
        return (), ()
    return LoraLayer, ModulesToSaveWrapper


def head_weight_and_bias(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The effective weight and bias of the LM head, through peft's wrappers.

    `lora_modules_to_save: [lm_head]` wraps it in a ModulesToSaveWrapper (a trainable copy); a
    LoRA on the head adds `scaling * B @ A` (dropout on the head's input is not applied here).
    """
    LoraLayer, ModulesToSaveWrapper = _peft_head_wrappers()
    if ModulesToSaveWrapper and isinstance(head, ModulesToSaveWrapper):
        if getattr(head, "disable_adapters", False) or not head.active_adapters:
            return head_weight_and_bias(head.original_module)
        return head_weight_and_bias(head.modules_to_save[head.active_adapters[0]])
    if LoraLayer and isinstance(head, LoraLayer):
        base = head.get_base_layer()
        weight = base.weight
        if not head.disable_adapters and not head.merged:
            for name in head.active_adapters:
                if name in head.lora_A:
                    delta = head.lora_B[name].weight @ head.lora_A[name].weight
                    weight = weight + head.scaling[name] * delta.to(weight.dtype)
        return weight, base.bias
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or type(weight) is not nn.Parameter:
        raise TypeError(
            f"the LM head ({type(head).__name__}) has no plain [vocab, hidden] weight; "
            "a quantized lm_head is not supported by the fused loss"
        )
    return weight, getattr(head, "bias", None)


def _fused_forward(
    self: nn.Module,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: torch.FloatTensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    cache_position: torch.LongTensor | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    **kwargs: Any,
):
    """Patched `*ForCausalLM.forward`: the objective from hidden states when labels are given."""
    state: PatchState = getattr(self, PATCH_ATTR)
    shift_labels = kwargs.pop("shift_labels", None)
    decoder_inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        cache_position=cache_position,
    )
    if labels is None and shift_labels is None:
        return state.original_forward(**decoder_inputs, logits_to_keep=logits_to_keep, **kwargs)

    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    token_weights = kwargs.pop("token_weights", None)
    decoder_inputs.update(kwargs)
    outputs = self.get_decoder()(**decoder_inputs)
    weight, bias = head_weight_and_bias(self.get_output_embeddings())
    plan = state.plan_train if self.training else state.plan_eval
    ref_hidden = None
    if "ref_logits" in plan.spec.needs:
        ref_hidden = reference_hidden_states(self, decoder_inputs)
    loss = fused_loss_from_plan(
        plan,
        outputs[0],
        weight,
        shift_labels if shift_labels is not None else labels,
        num_items_in_batch=num_items_in_batch,
        shift=shift_labels is None,
        bias=bias,
        token_weights=token_weights,
        ref_hidden_states=ref_hidden,
    )
    aux = router_aux_loss(self, outputs, attention_mask)
    if aux is not None:
        loss = loss + aux.to(loss.device)
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
    )


def reference_hidden_states(causal_lm: nn.Module, decoder_inputs: dict[str, Any]) -> torch.Tensor:
    """Final hidden states of the frozen base model: the same weights with adapters disabled.

    Under LoRA the anchor costs a second forward without gradients and no copy of the weights.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in causal_lm.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError(
            "an anchored objective needs the base model as reference: wrap the model with a "
            "peft adapter (LoRA/QLoRA) so the base is the same model with the adapter disabled"
        )
    previous = [layer.disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        with torch.no_grad():
            inputs = dict(decoder_inputs, use_cache=False, past_key_values=None)
            if inputs.get("inputs_embeds") is not None:
                inputs["inputs_embeds"] = inputs["inputs_embeds"].detach()
            out = causal_lm.get_decoder()(**inputs)
    finally:
        for layer, was_disabled in zip(layers, previous):
            layer.enable_adapters(not was_disabled)
    return out[0]


def patch_model(
    model: nn.Module,
    loss: str = "dft",
    *,
    chunk_size: int | None = None,
    **loss_kwargs: Any,
) -> nn.Module:
    """Make `model(..., labels=...)` return objective `loss` through the fused head path.

    Works on a plain transformers causal LM (also 4-bit bitsandbytes) and on a peft model, before
    or after wrapping. Patching again replaces the objective. Returns `model` for chaining.
    """
    lm = causal_lm_of(model)
    transform = LogitTransform.from_config(getattr(lm, "config", None))
    existing: PatchState | None = getattr(lm, PATCH_ATTR, None)
    train_stats = existing.train_stats if existing else TokenStats()
    eval_stats = existing.eval_stats if existing else TokenStats()
    plan_train = make_plan(loss, loss_kwargs, transform=transform, chunk_size=chunk_size, stats=train_stats)
    plan_eval = Plan(plan_train.spec, plan_train.params, transform, chunk_size, eval_stats)
    if existing is not None:
        existing.loss, existing.params = loss, plan_train.params
        existing.plan_train, existing.plan_eval = plan_train, plan_eval
        return model
    # accelerate's device hooks replace `forward` and call `_old_forward`; patch beneath them.
    forward_attr = "_old_forward" if hasattr(lm, "_hf_hook") and hasattr(lm, "_old_forward") else "forward"
    original = getattr(lm, forward_attr)
    state = PatchState(loss, plan_train.params, plan_train, plan_eval, original, forward_attr, train_stats, eval_stats)
    setattr(lm, PATCH_ATTR, state)
    setattr(lm, forward_attr, types.MethodType(_fused_forward, lm))
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Restore the model's original forward (a no-op on a model that is not patched)."""
    lm = causal_lm_of(model)
    state: PatchState | None = getattr(lm, PATCH_ATTR, None)
    if state is None:
        return model
    if state.forward_attr == "forward" and "forward" in lm.__dict__:
        original = state.original_forward
        bound_to_class = getattr(original, "__func__", None) is type(lm).forward
        if bound_to_class:
            del lm.forward
        else:
            lm.forward = original
    else:
        setattr(lm, state.forward_attr, state.original_forward)
    delattr(lm, PATCH_ATTR)
    return model


def patch_state(model: nn.Module) -> PatchState | None:
    """The patch carried by `model`, or None."""
    try:
        return getattr(causal_lm_of(model), PATCH_ATTR, None)
    except TypeError:
        return None
