"""Which keys a config may hold: ours, an objective's parameters, Axolotl's, or typos.

No key is ever dropped silently: a typo is an error with the closest key (from every key dft-peft
or Axolotl knows), an Axolotl key that would change the run is an error (a warning with
`strict: false`), and an Axolotl key that cannot change it, or is left empty, off or at
Axolotl's default, is accepted and listed by `validate` with the reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from dft_peft.config.axolotl_keys import (
    ACCEPTED_PLUGINS,
    HARMLESS_KEYS,
    LEGACY_KEYS,
    REFUSED_HINTS,
    REFUSED_KEYS,
    all_axolotl_keys,
    axolotl_defaults,
    axolotl_version,
    dataset_key_category,
    plugin_of,
    plugin_path,
)
from dft_peft.config.datasets import DatasetConfig
from dft_peft.config.normalize import INPUT_ONLY_KEYS
from dft_peft.config.schema import ConfigSchema
from dft_peft.losses.registry import loss_param_names
from dft_peft.errors import UserError, closest, did_you_mean

UNSET = "unset"
GENERIC_REFUSAL = "an Axolotl option dft-peft does not implement"


def loss_param_owners() -> dict[str, str]:
    """Every objective parameter key -> the objective that declares it."""
    return {key: name for name, keys in loss_param_names().items() for key in keys}


def supported_keys() -> set[str]:
    return set(ConfigSchema.model_fields) | set(INPUT_ONLY_KEYS)


def is_axolotl_key(key: str) -> bool:
    """Whether `key` is an Axolotl option (0.19's schema, its plugins', or an older version's)."""
    return key in all_axolotl_keys() or key in LEGACY_KEYS


def key_category(key: str) -> tuple[str, str]:
    """(`implemented` | `harmless` | `refused` | `unknown`, reason) for a top-level key."""
    if key in supported_keys():
        return "implemented", "a dft-peft key"
    if key in loss_param_owners():
        return "implemented", f"a parameter of `loss: {loss_param_owners()[key]}`"
    if key in HARMLESS_KEYS:
        return "harmless", HARMLESS_KEYS[key]
    if key in REFUSED_KEYS:
        return "refused", REFUSED_KEYS[key]
    if is_axolotl_key(key):
        return "refused", GENERIC_REFUSAL
    return "unknown", ""


def is_off(key: str, value: Any) -> bool:
    """Whether a value means the feature is unused, so that ignoring the key is exact.

    Axolotl's example files list many keys left empty (`deepspeed:`), off (`group_by_length:
    false`) or at Axolotl's own default (`save_safetensors: true`); those must not stop a config.
    """
    default = axolotl_defaults().get(key)
    if value is None or value == default and isinstance(default, (bool, int, float, str)):
        return True
    if isinstance(default, bool) and default:
        return False  # off is false only where Axolotl's default is false (save_safetensors: true)
    if value is False:
        return True
    if isinstance(value, (str, list, dict)) and not value:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def unknown_key_message(key: str, candidates: set[str]) -> str:
    """The closest key of every key dft-peft or Axolotl knows, and what it is."""
    near = closest(key, candidates | all_axolotl_keys() | LEGACY_KEYS)
    if near in candidates:
        hint = did_you_mean(key, {near})
    else:
        if near:
            hint = f" Did you mean `{near}` (an Axolotl option; {key_category(near)[1]})?"
        else:
            hint = (
                f" It is neither a dft-peft option nor one of Axolotl {axolotl_version()}'s "
                "(or its plugins'); remove it."
            )
    return f"unknown key `{key}`.{hint}"


def check_override_key(key: str) -> None:
    supported = supported_keys() | set(loss_param_owners())
    if key in supported or is_axolotl_key(key):
        return
    raise UserError(f"command-line override `--{key}`: {unknown_key_message(key, supported)}")


def listed_plugins(raw: Mapping[Any, Any]) -> set[str]:
    """The Axolotl plugins a config lists, as the generated table names them."""
    plugins = raw.get("plugins")
    if not isinstance(plugins, list):
        return set()
    return {path for p in plugins if isinstance(p, str) and (path := plugin_path(p))}


def refusal(key: str) -> str:
    hint = REFUSED_HINTS.get(key)
    reason = key_category(key)[1]
    return f"{reason}; {hint}" if hint and hint not in reason else reason


def _raise_or_warn(label: str, unsupported: list[str], strict: bool, ignored: dict[str, str]) -> None:
    if unsupported and strict:
        if len(unsupported) == 1:
            key = unsupported[0]
            raise UserError(
                f"{label}: `{key}` is an Axolotl option dft-peft does not support ({refusal(key)}); "
                "remove it (or set `strict: false` to ignore it with a warning)."
            )
        names = ", ".join(f"`{k}`" for k in unsupported)
        raise UserError(
            f"{label}: {names} are Axolotl options dft-peft does not support "
            f"(`{unsupported[0]}`: {refusal(unsupported[0])}); remove them "
            "(or set `strict: false` to ignore them with a warning)."
        )
    for key in unsupported:
        warnings.warn(
            f"{label}: ignoring `{key}`, an Axolotl option dft-peft does not support "
            f"({refusal(key)}; strict: false).",
            UserWarning,
            stacklevel=5,
        )
        ignored[key] = "not supported, ignored (strict: false)"


def sort_keys(
    raw: dict[Any, Any], label: str, strict: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """Split top-level keys into schema fields, objective parameters and ignored Axolotl keys.

    Raises for typos (always) and for Axolotl keys that would change the run (unless
    `strict: false`). A plugin's key is read by Axolotl only when the plugin is listed under
    `plugins:`; without it Axolotl ignores the key, and so does dft-peft.
    """
    supported = supported_keys()
    owners = loss_param_owners()
    plugins = listed_plugins(raw)
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
        kind, reason = key_category(key)
        if key in supported:
            fields[key] = value
        elif key in owners:
            if value is not None:  # an empty `dft_alpha:` means "use the default"
                loss_params[key] = value
        elif kind == "harmless":
            ignored[key] = reason
        elif kind == "refused":
            plugin = plugin_of().get(key)
            if is_off(key, value):
                ignored[key] = UNSET
            elif plugin and plugin not in plugins:
                short = plugin.rsplit(".", 1)[-1]
                ignored[key] = f"read only by Axolotl's {short}, which `plugins:` does not list"
            else:
                unsupported.append(key)
        else:
            typos.append(key)
    if typos:
        candidates = supported | set(owners)
        first = unknown_key_message(typos[0], candidates)
        more = f" (also unknown: {', '.join(f'`{k}`' for k in typos[1:])})" if typos[1:] else ""
        raise UserError(f"{label}: {first}{more}")
    _raise_or_warn(label, unsupported, strict, ignored)
    fields = sort_dataset_keys(fields, label, strict, ignored)
    return fields, loss_params, ignored


def sort_dataset_keys(
    fields: dict[str, Any], label: str, strict: bool, ignored: dict[str, str]
) -> dict[str, Any]:
    """Axolotl's dataset-entry keys that `DatasetConfig` does not hold: accepted or refused.

    Keys that are neither dft-peft's nor Axolotl's stay in the entry, so that the schema names
    them as typos with the closest dataset key.
    """
    ours = set(DatasetConfig.model_fields)
    out = dict(fields)
    for list_key in ("datasets", "test_datasets"):
        entries = fields.get(list_key)
        if not isinstance(entries, list):
            continue
        sorted_entries = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                sorted_entries.append(entry)
                continue
            entry = fold_dataset_jinja(dict(entry))
            kept: dict[str, Any] = {}
            refused: list[str] = []
            for key, value in entry.items():
                category = None if key in ours else dataset_key_category(str(key))
                if category is None:
                    kept[key] = value
                elif category[0] == "harmless":
                    ignored[f"{list_key}[{i}].{key}"] = category[1]
                elif is_off(str(key), value):
                    ignored[f"{list_key}[{i}].{key}"] = UNSET
                else:
                    refused.append(key)
            if refused:
                where = f"{list_key}[{i}].{refused[0]}"
                reason = dataset_key_category(refused[0])[1]  # type: ignore[index]
                if strict:
                    raise UserError(
                        f"{label}: `{where}` is an Axolotl dataset option dft-peft does not "
                        f"support ({reason}); remove it (or set `strict: false` to ignore it with "
                        "a warning)."
                    )
                for key in refused:
                    warnings.warn(
                        f"{label}: ignoring `{list_key}[{i}].{key}`, an Axolotl dataset option "
                        f"dft-peft does not support (strict: false).",
                        UserWarning,
                        stacklevel=5,
                    )
                    ignored[f"{list_key}[{i}].{key}"] = "not supported, ignored (strict: false)"
            sorted_entries.append(kept)
        out[list_key] = sorted_entries
    return out


def fold_dataset_jinja(entry: dict[str, Any]) -> dict[str, Any]:
    """A dataset entry's `chat_template_jinja` is its template (Axolotl: `chat_template: jinja`)."""
    jinja = entry.pop("chat_template_jinja", None)
    if jinja and entry.get("chat_template") in (None, "jinja"):
        entry["chat_template"] = jinja
    elif entry.get("chat_template") == "jinja":
        raise UserError("a dataset entry with `chat_template: jinja` needs `chat_template_jinja`.")
    return entry


def drop_axolotl_plugins(
    fields: dict[str, Any], label: str, strict: bool, ignored: dict[str, str]
) -> dict[str, Any]:
    """Axolotl's own plugins (`axolotl.integrations.*`): the ones dft-peft stands in for are
    accepted with an info line; the others cannot run here: error, or warn and drop."""
    plugins = fields.get("plugins")
    if not isinstance(plugins, list):
        return fields
    axolotl = [p for p in plugins if isinstance(p, str) and p.startswith("axolotl.")]
    if not axolotl:
        return fields
    refused = []
    for name in axolotl:
        path = plugin_path(name)
        if path in ACCEPTED_PLUGINS:
            ignored[f"plugins: {name}"] = ACCEPTED_PLUGINS[path]
        else:
            refused.append(name)
    if refused and strict:
        known = "an Axolotl plugin" if plugin_path(refused[0]) else "not a plugin Axolotl ships"
        raise UserError(
            f"{label}: `plugins: {refused[0]}` is {known} dft-peft does not support; remove it "
            "(or set `strict: false` to ignore it with a warning)."
        )
    for name in refused:
        warnings.warn(
            f"{label}: ignoring Axolotl plugin `{name}` (strict: false).", UserWarning, stacklevel=4
        )
        ignored[f"plugins: {name}"] = "not supported, ignored (strict: false)"
    kept = [p for p in plugins if p not in axolotl]
    return {**fields, "plugins": kept or None}
