"""Counts from data preparation, so silent row loss (too long, nothing to train on) is visible.

The trainer logs `summary()`; the cache stores `to_dict()` so a cached run reports the same numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class TokenizeReport:
    """What happened to the rows of one or more datasets on the way to token ids."""

    rows_in: int = 0
    rows_kept: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_no_trainable: int = 0
    dropped_low_weight: int = 0
    total_tokens: int = 0
    # Tokens whose label takes part in the loss (label != -100, first token of a row excluded
    # because nothing precedes it to predict it).
    trainable_tokens: int = 0

    def __add__(self, other: TokenizeReport) -> TokenizeReport:
        return TokenizeReport(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> TokenizeReport:
        return cls(**{f.name: int(data.get(f.name, 0)) for f in fields(cls)})

    def summary(self) -> str:
        """One log line."""
        parts = [f"{self.rows_kept}/{self.rows_in} rows kept"]
        for name in ("dropped_too_long", "truncated", "dropped_no_trainable", "dropped_low_weight"):
            if getattr(self, name):
                parts.append(f"{name.replace('_', ' ')}: {getattr(self, name)}")
        parts.append(f"{self.total_tokens} tokens ({self.trainable_tokens} trained)")
        return ", ".join(parts)


@dataclass
class PackingReport:
    """How well `sample_packing` filled its bins (1.0 = no padding at all)."""

    rows: int = 0
    bins: int = 0
    tokens: int = 0
    capacity: int = 0

    @property
    def efficiency(self) -> float:
        return self.tokens / self.capacity if self.capacity else 0.0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        return f"packed {self.rows} rows into {self.bins} bins ({self.efficiency:.1%} full)"
