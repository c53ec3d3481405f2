"""Batch tokenized rows into tensors.

Unpacked rows are right-padded and get an `attention_mask`. Packed rows get `position_ids` and
deliberately NO `attention_mask`: transformers 5.x only detects packing from `position_ids` when
the mask is None (`masking_utils._preprocess_mask_arguments`), and then builds a block-diagonal
causal mask (sdpa/eager/flex). Padding of packed rows is given its own restarting positions, so
it forms a separate block that no real token attends to, and -100 labels.

Packed batches also carry `use_cache=False` (a plain bool): the model skips packing detection
whenever a KV cache object exists, and `use_cache` defaults to True from the model config, so a
forward without it silently lets rows attend across their boundaries. `model(**batch)` (as the HF
Trainer calls it) picks the flag up; code that moves batch values to a device must skip non-tensors.

flash-attention only switches to varlen for packed input when the batch has ONE row
(`modeling_flash_attention_utils._is_packed_sequence` requires batch_size == 1); with
`flatten=True` the collator concatenates the micro-batch into a single row for that case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dft_peft.data.tokenize import IGNORE_INDEX


def pad_id_of(tokenizer: Any) -> int:
    """The pad id; tokenizers without one (Llama) pad with EOS, which is masked out anyway."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _pad(rows: Sequence[Sequence], length: int, value, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=dtype)
    return out


class DataCollator:
    """Callable turning a list of dataset rows into a batch dict of tensors."""

    def __init__(
        self,
        pad_token_id: int,
        *,
        sample_packing: bool,
        pad_to_sequence_len: bool,
        sequence_len: int | None,
        flatten: bool = False,
    ) -> None:
        if pad_to_sequence_len and not sequence_len:
            raise ValueError("pad_to_sequence_len needs sequence_len")
        self.pad_token_id = pad_token_id
        self.sample_packing = sample_packing
        self.pad_to_sequence_len = pad_to_sequence_len
        self.sequence_len = sequence_len
        self.flatten = flatten

    def _target_len(self, longest: int, rows: int = 1) -> int:
        if self.pad_to_sequence_len:
            return max(longest, self.sequence_len * rows)
        return longest

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if self.sample_packing and self.flatten:
            return self._flat(features)
        ids = [f["input_ids"] for f in features]
        length = self._target_len(max(len(x) for x in ids))
        batch = {
            "input_ids": _pad(ids, length, self.pad_token_id, torch.long),
            "labels": _pad([f["labels"] for f in features], length, IGNORE_INDEX, torch.long),
        }
        if "weights" in features[0]:
            batch["token_weights"] = _pad([f["weights"] for f in features], length, 0.0, torch.float32)
        if self.sample_packing:
            positions = [_positions_with_pad(f["position_ids"], length) for f in features]
            batch["position_ids"] = torch.as_tensor(positions, dtype=torch.long)
            batch["use_cache"] = False
        else:
            batch["attention_mask"] = _pad([[1] * len(x) for x in ids], length, 0, torch.long)
        return batch

    def _flat(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """All packed rows of the micro-batch as one row (flash-attention varlen)."""
        ids = [t for f in features for t in f["input_ids"]]
        length = self._target_len(len(ids), len(features))
        batch = {
            "input_ids": _pad([ids], length, self.pad_token_id, torch.long),
            "labels": _pad([[t for f in features for t in f["labels"]]], length, IGNORE_INDEX, torch.long),
            "position_ids": torch.as_tensor(
                [_positions_with_pad([p for f in features for p in f["position_ids"]], length)], dtype=torch.long
            ),
        }
        if "weights" in features[0]:
            batch["token_weights"] = _pad([[w for f in features for w in f["weights"]]], length, 0.0, torch.float32)
        batch["use_cache"] = False
        return batch


def _positions_with_pad(positions: Sequence[int], length: int) -> list[int]:
    """Padding continues as its own sequence (0, 1, ...), so it is a separate attention block."""
    positions = list(positions)
    return positions + list(range(length - len(positions)))


def make_collator(
    tokenizer: Any,
    *,
    sample_packing: bool,
    pad_to_sequence_len: bool = False,
    sequence_len: int | None = None,
    flatten: bool = False,
) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """The collator for `prepare_datasets` output.

    `flatten=True` (packed data only) concatenates the micro-batch into one row; use it with
    `attn_implementation: flash_attention_2/3` and micro_batch_size > 1, where transformers
    does not derive varlen boundaries for batches of several rows.
    """
    return DataCollator(
        pad_id_of(tokenizer),
        sample_packing=sample_packing,
        pad_to_sequence_len=pad_to_sequence_len,
        sequence_len=sequence_len,
        flatten=flatten,
    )
