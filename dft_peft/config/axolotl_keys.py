"""Axolotl's key names (generated) and what dft-peft does with each one (kept here by hand).

The names come from `axolotl_keys.json`, which `scripts/gen_axolotl_keys.py` writes from the
installed Axolotl's own pydantic schema (`AxolotlInputConfig`, its dataset models and the models
its bundled plugins register); `tests/integration/test_axolotl_keys.py` fails when that file and
the installed Axolotl disagree. What is decided here, by hand, is the category of each key:

* implemented - a `Config` (or `DatasetConfig`) field: it does what it does in Axolotl;
* harmless    - accepted with whatever value, because it cannot change what a single-device
                LoRA run computes (worker counts, bookkeeping, an equivalent kernel), each with
                the reason `validate` prints;
* refused     - set to anything but off/Axolotl's default it is an error (a warning with
                `strict: false`), because ignoring it would change the result; each with its
                reason.

`tests/test_axolotl_key_table.py` checks that every generated key falls in exactly one category.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

# The hand-kept tables live in their own module; imported here so `axolotl_keys.HARMLESS_KEYS`
# (and REFUSED_KEYS, REFUSED_HINTS) keep working for every caller.
from dft_peft.config.axolotl_key_groups import HARMLESS_KEYS, REFUSED_HINTS, REFUSED_KEYS, by_reason

DATA_FILE = Path(__file__).with_name("axolotl_keys.json")


@lru_cache(maxsize=1)
def axolotl_tables() -> dict[str, Any]:
    """The generated tables (see scripts/gen_axolotl_keys.py)."""
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def axolotl_version() -> str:
    return axolotl_tables()["axolotl_version"]


@lru_cache(maxsize=1)
def plugin_of() -> dict[str, str]:
    """Plugin key -> the Axolotl plugin (`axolotl.integrations.x.XPlugin`) that adds it."""
    return {key: path for path, entry in axolotl_tables()["plugins"].items() for key in entry["keys"]}


@lru_cache(maxsize=1)
def axolotl_defaults() -> dict[str, Any]:
    """Key -> Axolotl's default value (None where it has none), core and plugin keys."""
    tables = axolotl_tables()
    out = {k: v["default"] for k, v in tables["config_keys"].items()}
    for entry in tables["plugins"].values():
        out.update({k: v["default"] for k, v in entry["keys"].items()})
    return out


@lru_cache(maxsize=1)
def declared_in() -> dict[str, str]:
    """Core key -> the class of Axolotl's schema that declares it (LoraConfig, ...)."""
    return {k: v["in"] for k, v in axolotl_tables()["config_keys"].items()}


@lru_cache(maxsize=1)
def axolotl_aliases() -> dict[str, str]:
    """Axolotl's alternative spelling -> the field name (`model_config` -> overrides_of_...)."""
    return {v["alias"]: k for k, v in axolotl_tables()["config_keys"].items() if "alias" in v}


@lru_cache(maxsize=1)
def all_axolotl_keys() -> frozenset[str]:
    """Every top-level key Axolotl 0.19 knows: core fields, their aliases, plugin keys."""
    tables = axolotl_tables()
    return frozenset(tables["config_keys"]) | frozenset(axolotl_aliases()) | frozenset(plugin_of())


@lru_cache(maxsize=1)
def axolotl_dataset_keys() -> dict[str, frozenset[str]]:
    """Dataset model (SFTDataset, DPODataset, ...) -> its entry keys."""
    return {name: frozenset(m["keys"]) for name, m in axolotl_tables()["dataset_keys"].items()}


@lru_cache(maxsize=1)
def chat_template_names() -> frozenset[str]:
    """The names of Axolotl's `ChatTemplate` enum."""
    return frozenset(axolotl_tables()["chat_templates"])


@lru_cache(maxsize=1)
def dataset_type_names() -> dict[str, str]:
    """Every dataset `type:` Axolotl resolves -> where Axolotl defines it."""
    out: dict[str, str] = {}
    for group in axolotl_tables()["dataset_types"].values():
        out.update(group)
    return out


def preference_dataset_types() -> dict[str, str]:
    return dict(axolotl_tables()["dataset_types"]["preference"])


# Keys of older Axolotl versions: not in the generated table, still in public configs.
LEGACY_KEYS = frozenset(k for k in (*HARMLESS_KEYS, *REFUSED_KEYS) if k not in all_axolotl_keys())

# ----------------------------------------------------------------------------- plugins

# Axolotl plugins dft-peft can stand in for: the plugin line is accepted with this info line.
ACCEPTED_PLUGINS = {
    "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin": (
        "dft-peft's fused loss already avoids the full logits (what Cut Cross-Entropy does)"
    ),
    "axolotl.integrations.liger.LigerPlugin": (
        "its kernels are applied through `liger_rms_norm`, `liger_glu_activation`, "
        "`liger_layer_norm`, `liger_rope` when liger-kernel is installed; the loss is dft-peft's "
        "fused loss"
    ),
    "axolotl.integrations.kernels.KernelsPlugin": (
        "its kernels (ScatterMoE, SonicMoE, the hub's) compute the model's own layers faster; "
        "dft-peft runs the model's own code"
    ),
    "axolotl.integrations.swanlab.SwanLabPlugin": (
        "SwanLab is a tracker dft-peft does not log to (it logs to tensorboard and wandb via "
        "`report_to`): logging only, the run is the same"
    ),
}


def plugin_path(name: str) -> str | None:
    """An Axolotl plugin as the generated table names it, however the config spells the module
    (`axolotl.integrations.liger.LigerPlugin`, `...liger.plugin.LigerPlugin`)."""
    plugins = axolotl_tables()["plugins"]
    if name in plugins:
        return name
    if not name.startswith("axolotl.integrations."):
        return None
    package = name.split(".")[2]
    cls = name.rsplit(".", 1)[-1]
    candidate = f"axolotl.integrations.{package}.{cls}"
    return candidate if candidate in plugins else None


# ----------------------------------------------------------------------------- dataset entries

DATASET_HARMLESS_KEYS = {
    "trust_remote_code": "datasets 3+ no longer runs dataset loading scripts; no effect",
    "preprocess_shards": "memory use of Axolotl's preprocessing only",
}
DATASET_REFUSED_KEYS = by_reason(
    {
        "selects a part of the dataset; dft-peft trains on all rows": ("shards", "shards_idx"),
        "per-turn or per-character training flags dft-peft does not implement (they change the "
        "masks)": ("message_field_training", "message_field_training_detail"),
        "reasoning traces inside the reply text and tool definitions are not passed to the template by "
        "dft-peft": ("split_thinking", "field_tools"),
        "fields of older Axolotl prompt types dft-peft does not implement": (
            "conversation", "field_human", "field_model", "input_format", "input_transform",
        ),
        "knowledge-distillation data (the `kd` plugin), not supervised fine-tuning": (
            "logprobs_field", "temperature",
        ),
        "a preference/reward dataset key (used with `rl:`); dft-peft does supervised "
        "fine-tuning": (
            "field_chosen", "field_rejected", "step_separator", "max_completion_length",
            "train_on_last_step_only",
        ),
        "pretraining/synthetic dataset keys; dft-peft reads files of rows": (
            "text_column", "skip", "length", "sequence_length", "min_input_id", "max_input_id",
            "seed",
        ),
    }
)


def dataset_key_category(key: str) -> tuple[str, str] | None:
    """('harmless'|'refused', reason) for an Axolotl dataset-entry key we do not implement."""
    if key in DATASET_HARMLESS_KEYS:
        return "harmless", DATASET_HARMLESS_KEYS[key]
    if key in DATASET_REFUSED_KEYS:
        return "refused", DATASET_REFUSED_KEYS[key]
    if any(key in keys for keys in axolotl_dataset_keys().values()):
        return "refused", "an Axolotl dataset option dft-peft does not implement"
    return None
