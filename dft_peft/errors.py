"""User-facing errors.

A `UserError` is bad input the user can fix (a mistyped key, a missing file, a row without its
field). The CLI prints its message as one line and exits with code 2, without a traceback unless
`--debug` is given, so every message must name the key or file and say what to do.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: printed as one line by the CLI, exit code 2."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most similar to `name`, if any is close enough to be a likely typo."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' Did you mean `x`?' or '' — appended to unknown-name errors."""
    match = closest(name, candidates)
    return f" Did you mean `{match}`?" if match else ""
