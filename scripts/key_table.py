"""Print the README's Axolotl key table, counted from dft-peft's own key categories.

    python scripts/key_table.py

The README's table under "Axolotl configs, as written" is this script's output, pasted;
tests/test_axolotl_key_table.py fails when the two differ, so a key moved from refused to
implemented shows up in the README in the same change.
"""

from __future__ import annotations

from collections import Counter

from dft_peft.config.axolotl_keys import (
    DATASET_HARMLESS_KEYS, LEGACY_KEYS, axolotl_dataset_keys, axolotl_tables, chat_template_names,
    dataset_type_names, plugin_of,
)
from dft_peft.config.chat_templates import JINJA, REFUSED_TEMPLATES, TOKENIZER_DEFAULT
from dft_peft.config.dataset_types import type_category
from dft_peft.config.datasets import DatasetConfig
from dft_peft.config.keys import key_category

ROWS = (("implemented", "implemented"), ("harmless", "accepted, no effect (reason shown by `validate`)"),
        ("refused", "refused, with the reason"))


def _top_level() -> tuple[Counter, Counter]:
    tables = axolotl_tables()
    core = set(tables["config_keys"]) | {v["alias"] for v in tables["config_keys"].values() if "alias" in v}
    plugins = set(plugin_of()) - core
    return Counter(key_category(k)[0] for k in core), Counter(key_category(k)[0] for k in plugins)


def _dataset_entries() -> tuple[Counter, Counter]:
    every = set().union(*axolotl_dataset_keys().values())
    sft = set(axolotl_dataset_keys()["SFTDataset"])

    def category(key: str) -> str:
        if key in DatasetConfig.model_fields or key == "chat_template_jinja":  # see keys.fold_dataset_jinja
            return "implemented"
        return "harmless" if key in DATASET_HARMLESS_KEYS else "refused"

    return Counter(category(k) for k in every), Counter(category(k) for k in sft)


def _templates() -> Counter:
    return Counter(
        "refused" if name in REFUSED_TEMPLATES else "implemented" for name in chat_template_names()
    )


def _types() -> Counter:
    return Counter(type_category(name)[0] for name in dataset_type_names())


def table() -> str:
    core, plugins = _top_level()
    entries, sft = _dataset_entries()
    templates, types = _templates(), _types()
    special = sum(1 for n in (TOKENIZER_DEFAULT, JINJA) if n in chat_template_names())
    lines = [
        "| | top-level keys (core + plugins) | dataset-entry keys (all models; SFT) | chat templates | dataset types |",
        "|---|---|---|---|---|",
    ]
    for cat, label in ROWS:
        tmpl = (f"{templates[cat] - special} + `tokenizer_default`, `jinja`" if cat == "implemented"
                else str(templates[cat]) if templates[cat] else "-")
        typ = str(types[cat]) if types[cat] else "-"
        lines.append(f"| {label} | {core[cat]} + {plugins[cat]} | {entries[cat]} ({sft[cat]}) | {tmpl} | {typ} |")
    lines.append(
        f"| total in Axolotl {axolotl_tables()['axolotl_version']} | {sum(core.values())} + {sum(plugins.values())} "
        f"| {sum(entries.values())} ({sum(sft.values())}) | {sum(templates.values())} | {sum(types.values())} |"
    )
    legacy = Counter(key_category(k)[0] for k in LEGACY_KEYS)
    lines.append("")
    lines.append(
        f"Also {len(LEGACY_KEYS)} keys of older Axolotl versions that public configs still carry "
        f"({legacy['implemented']} implemented, {legacy['harmless']} accepted as 0.19 ignores them too, "
        f"{legacy['refused']} refused)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
