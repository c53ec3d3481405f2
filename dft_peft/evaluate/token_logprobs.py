"""The training rows' target-token log-probabilities under a model: rows tokenized exactly as
training tokenizes them (same prompt format, same trained tokens), then p(y_t) from the final
hidden states and the LM head, a chunk of trained positions at a time, through the fused path's
own projector: the `[tokens, vocab]` logits of a batch are never built. Used by `inspect` and by
the prior check before training."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dft_peft.data.loading import load_raw
from dft_peft.data.tokenize import TokenizeOptions, tokenize_dataset
from dft_peft.errors import UserError
from dft_peft.evaluate.labels import display_path
from dft_peft.losses.fused import HeadProjector, LogitTransform, compute_dtype, shifted_valid_rows
from dft_peft.losses.objectives import target_logprobs as chunk_target_logprobs
from dft_peft.losses.patch import causal_lm_of, head_weight_and_bias

IGNORE_INDEX = -100
# Rows of the LM head projected at once: ~4M logits (16 MB in fp32), at least 8 rows.
CHUNK_ELEMENTS = 1 << 22


@dataclass
class Rows:
    """Tokenized rows (ids and labels aligned as in training), and where they came from."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)


def load_rows(cfg: Any, tokenizer: Any, dataset: str | Path | None = None, max_rows: int | None = 200) -> Rows:
    """The first `max_rows` rows of the config's training data (or of `dataset`, formatted like
    the config's first dataset entry), tokenized exactly as `dft-peft train` does."""
    entries = list(cfg.datasets or [])
    if not entries:
        raise UserError("datasets: is empty; inspect needs a dataset entry (or --dataset FILE with one entry to copy)")
    if dataset is not None:
        if not Path(dataset).exists():
            raise UserError(f"--dataset {dataset}: file not found")
        entries = [entries[0].model_copy(update={"path": str(dataset), "data_files": None, "ds_type": None})]
    opts = TokenizeOptions(
        sequence_len=cfg.sequence_len,
        train_on_inputs=cfg.train_on_inputs,
        excess_length_strategy=cfg.excess_length_strategy,
        chat_template=cfg.chat_template_jinja or cfg.chat_template,
    )
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    for i, entry in enumerate(entries):
        remaining = None if max_rows is None else max_rows - len(ids)
        if remaining is not None and remaining <= 0:
            break
        raw = load_raw(entry)
        if remaining is not None and len(raw) > remaining:
            raw = raw.select(range(remaining))
        key = hashlib.sha256(repr((entry.path, len(raw), opts, getattr(tokenizer, "name_or_path", ""))).encode()).hexdigest()[:16]
        ds, _ = tokenize_dataset(raw, entry, tokenizer, opts, source=entry.path, fingerprint=f"dft-peft-inspect-{key}-{i}")
        ids.extend(list(map(int, r)) for r in ds["input_ids"])
        labels.extend(list(map(int, r)) for r in ds["labels"])
    if not ids:
        raise UserError("no rows with trained tokens left after tokenization; check the dataset and sequence_len")
    source = display_path(str(dataset)) if dataset is not None else ", ".join(display_path(e.path) for e in entries)
    return Rows(ids, labels, source)


# ----------------------------------------------------------------------------- probabilities


def _pad_batch(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int):
    length = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    lab = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long)
    for i, (r, l) in enumerate(zip(ids, labels)):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        lab[i, : len(l)] = torch.tensor(l)
    return input_ids, mask, lab


@torch.no_grad()
def target_logprobs(
    model: Any,
    rows: Rows,
    *,
    batch_size: int = 8,
    chunk_rows: int | None = None,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(ln p(y_t), y_t) for every trained token of `rows`, in row order then position order.

    `model` is a transformers causal LM, optionally inside a peft wrapper (the adapter is active).
    The decoder runs a right-padded batch; only positions whose (shifted) label is a target are
    projected through the LM head, `chunk_rows` of them at a time, in fp32.
    """
    lm = causal_lm_of(model)
    decoder = lm.get_decoder()
    weight, bias = head_weight_and_bias(lm.get_output_embeddings())
    # fp32 logits without an fp32 copy of a bf16 head on CUDA, as in training
    head = HeadProjector(weight, bias, compute_dtype(weight.dtype))
    transform = LogitTransform.from_config(lm.config)
    device = weight.device
    per_chunk = chunk_rows or max(8, CHUNK_ELEMENTS // max(weight.shape[0], 1))
    out_lp: list[np.ndarray] = []
    out_ids: list[np.ndarray] = []
    for start in range(0, len(rows), batch_size):
        input_ids, mask, labels = _pad_batch(
            rows.input_ids[start : start + batch_size], rows.labels[start : start + batch_size], pad_id
        )
        hidden = decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)[0]
        positions, targets = shifted_valid_rows(labels.to(device), IGNORE_INDEX, True)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        for s in range(0, hidden.shape[0], per_chunk):
            logits = transform(head.logits(hidden[s : s + per_chunk]))
            t = targets[s : s + per_chunk]
            lp = chunk_target_logprobs(logits, t)
            out_lp.append(lp.double().cpu().numpy())
            out_ids.append(t.cpu().numpy())
        del hidden
    if not out_lp:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(out_lp), np.concatenate(out_ids).astype(np.int64)
