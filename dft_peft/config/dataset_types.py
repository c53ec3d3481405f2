"""Dataset `type:` names: dft-peft's formats, Axolotl's names for them, and Axolotl's others.

Axolotl's names come from the generated `axolotl_keys.json` (its prompt strategies, prompt-style
handlers and preference transforms). A name maps to one of our formats when the text it produces
is the same (`alpaca:instruct` and `alpaca_instruct` are `alpaca`, `alpaca_chat` is
`alpaca:chat`); any other Axolotl name is refused with the reason, never silently replaced.
"""

from __future__ import annotations

from dft_peft.config.axolotl_keys import dataset_type_names, preference_dataset_types
from dft_peft.errors import did_you_mean

# dft-peft's formats by name. The config validates `type:` before any data code is imported, so
# the built-in names (`dft_peft/data/formats.py`, `alpaca_styles.py`) are listed here, and
# `data.segments.register` declares any other format as it registers it: a new format stays one
# decorated function. tests/test_layers.py checks the built-ins against the data room's registry.
BUILTIN_FORMAT_NAMES = frozenset({
    "alpaca", "completion", "input_output", "chat_template",
    "alpaca:chat", "alpaca:chatml", "alpaca:phi",
    "alpaca_instruct.load_no_prompt", "alpaca_chat.load_no_prompt", "alpaca_chat.load_concise",
})
FORMAT_NAMES: set[str] = set(BUILTIN_FORMAT_NAMES)


def declare_format(name: str) -> None:
    """Make `name` a valid `type:` (called by the data room's format registry)."""
    FORMAT_NAMES.add(name)


def forget_format(name: str) -> None:
    """Undo `declare_format` for a format that is not built in (tests register and remove one)."""
    if name not in BUILTIN_FORMAT_NAMES:
        FORMAT_NAMES.discard(name)

# Axolotl's name -> the dft-peft format producing the same text.
AXOLOTL_TYPE_ALIASES = {
    "alpaca:instruct": "alpaca",
    "alpaca_instruct": "alpaca",
    "alpaca_chat": "alpaca:chat",
    "chat_template.load": "chat_template",
}

SHAREGPT_HINT = (
    "ShareGPT types were removed from Axolotl (0.19 refuses them too); write `type: chat_template` with "
    "`field_messages: conversations` and `message_property_mappings: {role: from, content: value}` "
    "(`from: human` / `from: gpt` are mapped to user / assistant)"
)

CONVERT_HINT = "convert the rows to `type: chat_template` (a messages list) or `type: alpaca`"


def type_category(name: str) -> tuple[str, str]:
    """(`implemented` | `refused` | `unknown`, our format name or the reason) for a `type:`."""
    if name in FORMAT_NAMES:
        return "implemented", name
    if name in AXOLOTL_TYPE_ALIASES:
        return "implemented", AXOLOTL_TYPE_ALIASES[name]
    if name.split(":")[0].split(".")[0] in ("sharegpt", "sharegpt_jokes"):
        return "refused", SHAREGPT_HINT
    preference = preference_dataset_types()
    if name in preference and not name.startswith("ebft"):
        return "refused", (
            f"a preference-data transform Axolotl uses with `{preference[name]}`; dft-peft does "
            "supervised fine-tuning (pick the objective with `loss:`)"
        )
    if name in preference:
        return "refused", "an EBFT transform (`rl: ebft`); dft-peft does supervised fine-tuning"
    if name in dataset_type_names():
        return "refused", f"an Axolotl prompt format dft-peft does not implement; {CONVERT_HINT}"
    return "unknown", ""


def resolve_type(name: str) -> str:
    """The dft-peft format for a `type:` value, or a ValueError naming the reason."""
    kind, detail = type_category(name)
    if kind == "implemented":
        return detail
    if kind == "refused":
        raise ValueError(f"dataset type `{name}` is not supported: {detail}.")
    known = set(FORMAT_NAMES) | set(AXOLOTL_TYPE_ALIASES)
    hint = did_you_mean(name, known) or did_you_mean(name, dataset_type_names())
    raise ValueError(f"unknown dataset type `{name}`; dft-peft's: {', '.join(sorted(FORMAT_NAMES))}." + hint)
