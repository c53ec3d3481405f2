"""Segments -> `input_ids` / `labels` / `attention_mask` (+ `weights`), with length handling.

The whole row is tokenized as one string and character spans are mapped to tokens through the
offset mapping: tokenizing segments separately would change BPE merges at the seams (the ids
would differ from what the model sees at inference). A token is trainable when any of its
characters lies in a trainable segment, so a merged token at the prompt/response seam is learned
rather than lost. Tokenizers without offsets fall back to per-segment tokenization.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dft_peft.data.formats import FORMATS, RENDERS_OWN_SPECIAL_TOKENS, FormatContext, RowError, Segment
from dft_peft.data.report import TokenizeReport
from dft_peft.config.datasets import DatasetConfig
from dft_peft.errors import UserError, did_you_mean

IGNORE_INDEX = -100
EXCESS_LENGTH_STRATEGIES = ("drop", "truncate")


def check_excess_length_strategy(value: str) -> None:
    if value not in EXCESS_LENGTH_STRATEGIES:
        raise UserError(
            f"excess_length_strategy: `{value}` is not one of {', '.join(EXCESS_LENGTH_STRATEGIES)}."
            + did_you_mean(value, EXCESS_LENGTH_STRATEGIES)
        )


def default_prefix_ids(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before text by default (BOS for Llama-style, nothing for Qwen/GPT-2).

    Found by probing rather than reading `bos_token`, because many tokenizers define a BOS token
    they never add; prepending it anyway would train on inputs the model never sees at inference.
    """
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def supports_offsets(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "is_fast", False))


def encode_segments(
    batch: Sequence[Sequence[Segment]],
    tokenizer: Any,
    *,
    train_on_inputs: bool,
    prefix_ids: Sequence[int] = (),
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels for each row's segments; untrained tokens get IGNORE_INDEX."""
    if not batch:
        return []
    if not supports_offsets(tokenizer):
        return [_encode_per_segment(segs, tokenizer, train_on_inputs, prefix_ids) for segs in batch]
    texts = ["".join(text for text, _ in segs) for segs in batch]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for segs, text, ids, offsets in zip(batch, texts, enc["input_ids"], enc["offset_mapping"]):
        trained_chars = np.zeros(len(text) + 1, dtype=np.int64)
        pos = 0
        for seg_text, trainable in segs:
            if trainable:
                trained_chars[pos + 1 : pos + len(seg_text) + 1] = 1
            pos += len(seg_text)
        prefix_sum = np.cumsum(trained_chars)  # prefix_sum[e] - prefix_sum[s] = trained chars in [s, e)
        ids = list(ids)
        if train_on_inputs:
            labels = list(ids)
        else:
            off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            trainable = (prefix_sum[off[:, 1]] - prefix_sum[off[:, 0]]) > 0
            labels = np.where(trainable, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
        prefix = [] if (prefix_ids and _starts_with_prefix(ids, prefix_ids)) else list(prefix_ids)
        out.append((prefix + ids, ([IGNORE_INDEX] * len(prefix)) + labels))
    return out


def _starts_with_prefix(ids: Sequence[int], prefix: Sequence[int]) -> bool:
    """The text already carries the BOS (e.g. a row that spells out `<s>`): don't double it."""
    return list(ids[: len(prefix)]) == list(prefix)


def _encode_per_segment(
    segs: Sequence[Segment], tokenizer: Any, train_on_inputs: bool, prefix_ids: Sequence[int]
) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, trainable in segs:
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids += piece
        labels += piece if (trainable or train_on_inputs) else [IGNORE_INDEX] * len(piece)
    if prefix_ids and not _starts_with_prefix(ids, prefix_ids):
        ids = list(prefix_ids) + ids
        labels = [IGNORE_INDEX] * len(prefix_ids) + labels
    return ids, labels


@dataclass
class TokenizeOptions:
    """Settings shared by every dataset entry of a run."""

    sequence_len: int
    train_on_inputs: bool = False
    excess_length_strategy: str = "drop"
    chat_template: str | None = None  # top-level override, a dataset entry's own wins


def make_batch_fn(cfg: DatasetConfig, tokenizer: Any, opts: TokenizeOptions, source: str, report: TokenizeReport):
    """The `Dataset.map(batched=True, with_indices=True)` function for one dataset entry.

    Counts go into `report` as a side effect, which is why the map runs in one process.
    """
    from dft_peft.data.chat import resolve_chat_template

    fmt = FORMATS[cfg.type]
    template = None
    if cfg.type == "chat_template":
        template = resolve_chat_template(cfg.chat_template or opts.chat_template, tokenizer, f"dataset {source}")
    ctx = FormatContext(tokenizer=tokenizer, chat_template=template)
    prefix = [] if cfg.type in RENDERS_OWN_SPECIAL_TOKENS else default_prefix_ids(tokenizer)
    with_weights = cfg.weight_field is not None

    def batch_fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        keys = list(batch)
        rows = [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]
        segments, weights = [], []
        report.rows_in += len(rows)
        for row, index in zip(rows, indices):
            where = f"{source} row {index + 1}"  # 1-based: the line number in a .jsonl file
            try:
                segs = fmt(row, cfg, ctx)
            except RowError as err:
                raise UserError(f"{where}: {err}") from None
            if with_weights:
                weight = _row_weight(row, cfg, where)
                if cfg.min_weight is not None and weight < cfg.min_weight:
                    report.dropped_low_weight += 1
                    continue
                weights.append(weight)
            segments.append(segs)
        out: dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": []}
        if with_weights:
            out["weights"] = []
        encoded = encode_segments(segments, tokenizer, train_on_inputs=opts.train_on_inputs, prefix_ids=prefix)
        for i, (ids, labels) in enumerate(encoded):
            if len(ids) > opts.sequence_len:
                if opts.excess_length_strategy == "drop":
                    report.dropped_too_long += 1
                    continue
                ids, labels = ids[: opts.sequence_len], labels[: opts.sequence_len]
                report.truncated += 1
            trained = sum(1 for label in labels[1:] if label != IGNORE_INDEX)
            if trained == 0:
                report.dropped_no_trainable += 1
                continue
            report.rows_kept += 1
            report.total_tokens += len(ids)
            report.trainable_tokens += trained
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["attention_mask"].append([1] * len(ids))
            if with_weights:
                out["weights"].append([weights[i]] * len(ids))
        return out

    return batch_fn


def _row_weight(row: dict, cfg: DatasetConfig, where: str) -> float:
    value = row.get(cfg.weight_field)
    if value is None:
        raise UserError(f"{where}: missing field '{cfg.weight_field}' named by weight_field (add it or fix the row)")
    try:
        if isinstance(value, bool):
            raise TypeError
        weight = float(value)  # numbers, or numeric strings from a CSV
    except (TypeError, ValueError):
        raise UserError(f"{where}: field '{cfg.weight_field}' must be a number, got {value!r}") from None
    if weight != weight:  # NaN would poison every loss it touches
        raise UserError(f"{where}: field '{cfg.weight_field}' is NaN; give it a number")
    if abs(weight) > 3.4e38:  # inf, or inf once stored as float32: the adapter would end up NaN
        raise UserError(f"{where}: field '{cfg.weight_field}' is {value!r}, not a finite number; give it a finite weight")
    if weight < 0:  # a negative weight turns the loss into gradient ascent on that row
        raise UserError(
            f"{where}: field '{cfg.weight_field}' is {weight:g}; weights must be >= 0 (use min_weight to drop low rows)"
        )
    return weight


def token_features(with_weights: bool):
    """Fixed column types so datasets from different entries concatenate."""
    from datasets import Features, List, Value

    feats = {
        "input_ids": List(Value("int32")),
        "labels": List(Value("int32")),
        "attention_mask": List(Value("int8")),
    }
    if with_weights:
        feats["weights"] = List(Value("float32"))
    return Features(feats)


def tokenize_dataset(raw, cfg: DatasetConfig, tokenizer: Any, opts: TokenizeOptions, *, source: str, fingerprint: str):
    """Tokenize one loaded dataset entry; returns (dataset, report)."""
    check_excess_length_strategy(opts.excess_length_strategy)
    report = TokenizeReport()
    fn = make_batch_fn(cfg, tokenizer, opts, source, report)
    ds = raw.map(
        fn,
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=token_features(cfg.weight_field is not None),
        load_from_cache_file=False,  # counts come from running the function
        new_fingerprint=fingerprint,  # skip hashing the closure (tokenizer pickling is slow)
        desc=f"Tokenizing {source}",
    )
    return ds, report
