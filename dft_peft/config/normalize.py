"""Fold Axolotl's alternative spellings of a key into the one field dft-peft keeps.

Axolotl accepts several names for some settings (old boolean attention switches, internal field
names, `bnb_config_kwargs`); a config written with any of them must mean the same here.
"""

from __future__ import annotations

import typing
import warnings
from collections.abc import Mapping
from typing import Any

# Axolotl's older boolean attention switches, mapped to `attn_implementation` as Axolotl does.
LEGACY_ATTENTION_FLAGS = {
    "flash_attention": "flash_attention_2",
    "sdp_attention": "sdpa",
    "eager_attention": "eager",
    "flex_attention": "flex_attention",
}

# Axolotl's internal field names, which it also accepts as keys (populate_by_name).
KEY_ALIASES = {
    "type_of_model": "model_type", "revision_of_model": "model_revision",
    "model_config": "overrides_of_model_config",  # Axolotl's alias of its own field
    "adam_eps": "adam_epsilon",  # older Axolotl spelling
}

# Axolotl's `bnb_config_kwargs` entries that have a dft-peft key.
BNB_KWARGS = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant")

# Axolotl's switches that select one of our objectives: `use_eaft: true` means `loss: eaft`.
LOSS_SWITCHES = {"use_eaft": "eaft"}

# Axolotl 0.19's `activation_offloading` (src/axolotl/utils/schemas/config.py: `Literal["legacy",
# "disk"] | bool`; Axolotl itself rewrites `gradient_checkpointing: offload` into
# `gradient_checkpointing: true` + `activation_offloading: true`). What each value does there and here:
# * `legacy`: Unsloth's offloaded gradient checkpointer, each checkpointed layer input copied to CPU
#   and back for the recomputation: exactly our `gradient_checkpointing: offload`.
# * `true`: TRL's OffloadActivations, saved-tensor hooks moving every saved activation to CPU; under
#   gradient checkpointing the saved activations are the checkpointed layer inputs, so the GPU
#   memory is that of our offload (TRL also streams the copies; we copy asynchronously, pinned).
# * `hidden_states` (newer Axolotl spelling of the same idea): the checkpointed hidden states,
#   which are what our offload moves.
# * `disk`: the layer inputs go to files on disk; refused, dft-peft keeps them in (pinned) RAM.
ACTIVATION_OFFLOADING_AS_OFFLOAD = (True, "legacy", "hidden_states")

# Keys accepted on input and folded into other fields by `Config._normalize_inputs`.
INPUT_ONLY_KEYS = (
    frozenset(LEGACY_ATTENTION_FLAGS) | frozenset(KEY_ALIASES) | {"bnb_config_kwargs"} | frozenset(LOSS_SWITCHES)
    | {"activation_offloading", "batch_size", "bfloat16", "float16"}
)


def normalize_inputs(data: Any, model_fields: Mapping[str, Any]) -> Any:
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
    fold_legacy_attention(data)
    fold_bnb_kwargs(data)
    fold_loss_switches(data)
    fold_activation_offloading(data)
    fold_batch_size(data)
    fold_dtype_spellings(data)
    if data.get("chat_template_jinja") and not data.get("chat_template"):
        data["chat_template"] = "jinja"  # Axolotl does the same
    # An empty `key:` means "not set" in Axolotl files: use our default where null is no value.
    for key in [k for k, v in data.items() if v is None]:
        field = model_fields.get(key)
        if field is not None and not accepts_none(field.annotation):
            del data[key]
    return data


def pop_switch(data: dict[str, Any], key: str) -> bool:
    """Remove an Axolotl on/off switch from `data`: True when it is on (unset and false are off)."""
    value = data.pop(key, None)
    if value is None or value is False:
        return False
    if value is not True:
        raise ValueError(f"`{key}` must be true or false (got {value!r}).")
    return True


def fold_legacy_attention(data: dict[str, Any]) -> None:
    chosen = data.get("attn_implementation")
    flags = []
    for flag, impl in LEGACY_ATTENTION_FLAGS.items():
        if pop_switch(data, flag):
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


def fold_loss_switches(data: dict[str, Any]) -> None:
    """Axolotl's `use_eaft: true` -> `loss: eaft` (its `eaft_alpha` / `eaft_k` are that loss's own keys)."""
    for switch, loss in LOSS_SWITCHES.items():
        if not pop_switch(data, switch):
            continue
        chosen = data.get("loss")
        if chosen is not None and chosen != loss:
            raise ValueError(
                f"`{switch}: true` means `loss: {loss}`, which conflicts with `loss: {chosen}`; keep one."
            )
        data["loss"] = loss


def fold_activation_offloading(data: dict[str, Any]) -> None:
    """`activation_offloading: true | legacy | hidden_states` means `gradient_checkpointing: offload`
    (see ACTIVATION_OFFLOADING_AS_OFFLOAD); `false`/null leaves checkpointing as written."""
    if "activation_offloading" not in data:
        return
    value = data.pop("activation_offloading")
    if value is None or value is False:
        return
    if value == "disk":
        raise ValueError(
            "activation_offloading: `disk` is not supported (dft-peft offloads layer inputs to RAM, not to files); "
            "use `activation_offloading: true`."
        )
    if value not in ACTIVATION_OFFLOADING_AS_OFFLOAD or isinstance(value, int) and value is not True:
        raise ValueError(f"activation_offloading: must be true, false, legacy, hidden_states or disk, not `{value}`.")
    if data.get("gradient_checkpointing") is False:
        raise ValueError(
            "activation_offloading: true offloads the checkpointed layer inputs, but gradient_checkpointing is false; "
            "drop `gradient_checkpointing: false`."
        )
    data["gradient_checkpointing"] = "offload"


def fold_batch_size(data: dict[str, Any]) -> None:
    """Axolotl's older `batch_size` (rows per optimizer step on one device) as the accumulation it
    implies: Axolotl sets `gradient_accumulation_steps = batch_size // micro_batch_size`
    (utils/config normalize_config) and refuses both keys together (check_gas_bsz)."""
    batch = data.pop("batch_size", None)
    if batch is None:
        return
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"`batch_size` must be a whole number of rows per optimizer step (got {batch!r}).")
    if data.get("gradient_accumulation_steps") is not None:
        raise ValueError(
            "`batch_size` and `gradient_accumulation_steps` are both set; keep one (Axolotl refuses both too)."
        )
    micro = data.get("micro_batch_size")
    micro = 1 if micro is None else micro  # the schema's (and Axolotl's) default
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
        return  # the schema names the bad micro_batch_size; batch_size is gone with it
    if batch < micro:
        raise ValueError(
            f"`batch_size` {batch} is smaller than `micro_batch_size` {micro}; raise batch_size to a "
            "multiple of micro_batch_size, or lower micro_batch_size."
        )
    if batch % micro:
        warnings.warn(
            f"batch_size {batch} is not a multiple of micro_batch_size {micro}: gradient_accumulation_steps "
            f"= {batch // micro} ({batch // micro * micro} rows per optimizer step), as Axolotl rounds down.",
            UserWarning,
            stacklevel=2,
        )
    data["gradient_accumulation_steps"] = batch // micro


def fold_dtype_spellings(data: dict[str, Any]) -> None:
    """Axolotl's older dtype switches, where they mean one of our settings exactly.

    * `bfloat16: true`: Axolotl loads the model in bf16 and trains with `bf16 = bf16 or bfloat16`
      (resolve_dtype, the trainer builder): that is `bf16: true`.
    * `float16: true`: Axolotl loads the weights in fp16 but leaves mixed precision to `fp16`, and a
      resolved `bf16` wins over it. With `fp16: true` or `bf16: true` it therefore changes nothing;
      alone it means fp16 weights trained without mixed precision (no loss scaling), which
      dft-peft does not do, so it is refused with the setting to use instead.
    """
    if pop_switch(data, "bfloat16"):
        if data.get("bf16") is False or data.get("fp16") is True:
            raise ValueError(
                "`bfloat16: true` (Axolotl's older spelling of `bf16: true`) conflicts with "
                "`bf16: false` / `fp16: true`; keep one."
            )
        data["bf16"] = True
    if pop_switch(data, "float16") and data.get("bf16") is not True and data.get("fp16") is not True:
        raise ValueError(
            "`float16: true` loads the model in fp16 and trains it without mixed precision (Axolotl's "
            "meaning), which dft-peft does not do; use `fp16: true` (fp16 mixed precision) or `bf16: true`."
        )


def fold_bnb_kwargs(data: dict[str, Any]) -> None:
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


def accepts_none(annotation: Any) -> bool:
    """Whether a field's type includes None (so an empty `key:` is a value, not "unset")."""
    if annotation is Any or annotation is None or annotation is type(None):
        return True
    return type(None) in typing.get_args(annotation)
