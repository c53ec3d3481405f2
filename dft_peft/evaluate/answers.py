"""Maths answers: the final answer extracted from a generation or a reference row, and compared.

* extraction: the last `#### N` line (GSM8K) or `\\boxed{...}`, whichever comes last; failing
  both, the last number in the text;
* comparison: `,` `$` `%` and trailing zeros stripped, `\\frac{a}{b}` and `a/b` read as fractions,
  equal when the floats differ by at most 1e-6 (relative for numbers above 1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

TOLERANCE = 1e-6
STOP_MARKERS = ("\n### Instruction", "\n### Input", "\n### Response", "\n\n\n\n")

# ----------------------------------------------------------------------------- answers

_HASH_LINE = re.compile(r"####[ \t]*([^\n]*)")
_HASH_DONE = re.compile(r"####[^\n]*\d[^\n]*\n")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*[-+]?(?:\d+(?:\.\d+)?|\.\d+))?")


def _boxed_contents(text: str) -> list[tuple[int, str]]:
    """(position, content) of each `\\boxed{...}`, with nested braces balanced."""
    found = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append((m.start(), text[m.end() : i - 1]))
    return found


def _plain_number(num: str) -> str:
    """`+5.00` -> `5`, `-0.750` -> `-0.75`, `.5` -> `0.5`, `-0` -> `0`."""
    num = num.strip().lstrip("+")
    sign = "-" if num.startswith("-") else ""
    num = num.lstrip("-")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    num = num.lstrip("0") or "0"
    if num.startswith("."):
        num = "0" + num
    return num if num == "0" else sign + num


def normalize_answer(text: str | None) -> str | None:
    """The answer in a canonical form: a plain number (`1234`, `-0.75`), a fraction (`3/4`), or,
    for a non-numeric answer, the cleaned text; None when nothing is left."""
    if text is None:
        return None
    s = str(text).strip()
    s = _TEXT.sub(r"\1", s)
    s = _FRAC.sub(r"\1/\2", s)
    s = s.replace("{,}", "").replace("\\!", "").replace("\\,", "").replace("−", "-")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = _THOUSANDS.sub("", s)
    m = _NUMBER.search(s)
    if m:
        value = m.group(0)
        if "/" in value:
            top, bottom = (part.strip() for part in value.split("/", 1))
            return f"{_plain_number(top)}/{_plain_number(bottom)}"
        return _plain_number(value)
    s = s.strip().strip(".").strip()
    return s or None


def to_number(answer: str | None) -> float | None:
    """The value of a normalized answer (fractions divided out), or None when not numeric."""
    if answer is None:
        return None
    try:
        if "/" in answer:
            top, bottom = answer.split("/", 1)
            return float(top) / float(bottom) if float(bottom) != 0 else None
        return float(answer)
    except ValueError:
        return None


def extract_answer(text: str | None) -> str | None:
    """The model's final answer, normalized: the last `#### ...` or `\\boxed{...}`, else the last
    number in the text; None when there is none."""
    if not text:
        return None
    candidates = [(m.start(), m.group(1)) for m in _HASH_LINE.finditer(text)] + _boxed_contents(text)
    for _, content in sorted(candidates, key=lambda c: c[0], reverse=True):
        answer = normalize_answer(content)
        if answer is not None:
            return answer
    numbers = _NUMBER.findall(_THOUSANDS.sub("", _FRAC.sub(r"\1/\2", text)))
    return normalize_answer(numbers[-1]) if numbers else None


def is_correct(predicted: str | None, reference: str | None) -> bool:
    """Numbers equal within 1e-6 (relative above 1); non-numeric answers compared as text."""
    if predicted is None or reference is None:
        return False
    a, b = to_number(predicted), to_number(reference)
    if a is not None and b is not None:
        return abs(a - b) <= TOLERANCE * max(1.0, abs(b))
    return predicted.strip().lower() == reference.strip().lower()


def reference_answer(row: Mapping[str, Any], messages_field: str = "messages") -> str | None:
    """The row's reference: its `answer` field (GSM8K's full solution is read at `####`), else
    the `#### N` that ends `output`, else the last assistant message's."""
    answer = row.get("answer")
    if answer is not None and str(answer).strip():
        text = str(answer)
        m = list(_HASH_LINE.finditer(text))
        return normalize_answer(m[-1].group(1) if m else text)
    texts = []
    if row.get("output"):
        texts.append(str(row["output"]))
    messages = row.get(messages_field)
    if isinstance(messages, list):
        texts += [str(m.get("content", "")) for m in messages if isinstance(m, Mapping) and m.get("role") in ("assistant", "gpt")]
    for text in reversed(texts):
        m = list(_HASH_LINE.finditer(text))
        if m:
            return normalize_answer(m[-1].group(1))
        boxed = _boxed_contents(text)
        if boxed:
            return normalize_answer(boxed[-1][1])
    return None


def truncate_generation(text: str) -> str:
    """Cut the text after the first complete `#### N` line or before a stop marker."""
    cut = len(text)
    m = _HASH_DONE.search(text)
    if m:
        cut = m.end() - 1
    for marker in STOP_MARKERS:
        i = text.find(marker)
        if 0 <= i < cut:
            cut = i
    return text[:cut].rstrip()
