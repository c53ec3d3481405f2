"""Which command-line arguments are config overrides and which are the command's own options.

An override is any `--option` that is not an option of the command actually run: `train
--seed=7` sets the config's `seed`, while `eval --seed=7` stays eval's sampling seed. A key that
shares its name with the command's option is reached as `--config.KEY=VALUE`.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Sequence

from dft_peft.errors import UserError

CONFIG_PREFIX = "--config."


def split_overrides(argv: Sequence[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """Separate `--key=value` / `--key value` config overrides from the options of the command run.

    Only the options of the command actually being run are kept back (`eval --seed` is eval's
    sampling seed, `train --seed` the config's `seed`). `--config.KEY=VALUE` is always a config
    override, which reaches a key that shares its name with the command's own option.
    """
    items = list(argv)
    command = next((item for item in items if item in _subparsers(parser)), None)
    own = _option_strings(parser)
    if command is not None:
        own |= _option_strings(_subparsers(parser)[command])
    known: list[str] = []
    overrides: list[str] = []
    i = 0
    seen_command = False
    while i < len(items):
        item = items[i]
        seen_command = seen_command or item == command
        name, sep, value = item.partition("=")
        own_name = _own_option(name, own)
        if not item.startswith("--") or item == "--" or not seen_command or own_name and not name.startswith(CONFIG_PREFIX):
            known.append(own_name + sep + value if own_name else item)
            i += 1
            continue
        key = name[len(CONFIG_PREFIX):] if name.startswith(CONFIG_PREFIX) else name[2:]
        if sep:
            overrides.append(f"{key}={value}")
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            overrides.append(f"{key}={items[i + 1]}")
            i += 1
        else:
            overrides.append(_bare_flag(item, key))
        i += 1
    return known, overrides


def _bare_flag(item: str, key: str) -> str:
    """`--sample_packing` alone means true for a true/false key; any other key needs a value."""
    from dft_peft.config import Config

    field = Config.model_fields.get(key.replace("-", "_"))
    if field is not None and bool in typing.get_args(field.annotation) + (field.annotation,):
        return f"{key}=true"
    if field is None:
        return f"{key}=true"  # an unknown key: the config's key check names it and the closest key
    raise UserError(f"command-line override `{item}` has no value; write `{item}=VALUE`.")


def _own_option(name: str, own: set[str]) -> str:
    """The command's option `name` refers to (`--max_new_tokens` is `--max-new-tokens`), or ''."""
    if name in own:
        return name
    dashed = "--" + name[2:].replace("_", "-") if name.startswith("--") else name
    return dashed if dashed in own else ""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {
        opt
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction)
        for opt in action.option_strings
    }


def note_config_key_clashes(parser: argparse.ArgumentParser) -> None:
    """Say in `--help` where a command's option shares its name with a config key."""
    from dft_peft.config import Config

    for sub in _subparsers(parser).values():
        for action in sub._actions:
            if action.dest in Config.model_fields and action.option_strings and action.help != argparse.SUPPRESS:
                note = f"this command's option, not the config key `{action.dest}` (set that with {CONFIG_PREFIX}{action.dest}=...)"
                action.help = f"{action.help}; {note}" if action.help else note
