"""Data preparation: dataset files -> prompt format -> token ids + labels -> packing -> collator.

`prepare_datasets` is the one entry point the trainer calls; each step lives in its own module
(`loading`, `formats`/`chat`, `tokenize`, `packing`, `cache`, `collator`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dft_peft.data.collator import make_collator
from dft_peft.data.formats import FORMATS, alpaca_prompt
from dft_peft.data.report import PackingReport, TokenizeReport
from dft_peft.config.datasets import DatasetConfig
from dft_peft.errors import UserError

__all__ = [
    "DatasetConfig",
    "FORMATS",
    "PackingReport",
    "PreparedData",
    "TokenizeReport",
    "alpaca_prompt",
    "make_collator",
    "prepare_datasets",
]

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """What the trainer gets: datasets ready for `make_collator`, plus counts to log."""

    train: Any  # datasets.Dataset
    eval: Any | None
    report: TokenizeReport  # the `datasets:` entries (before the val split)
    eval_report: TokenizeReport | None = None  # the `test_datasets:` entries, if any
    packing: PackingReport | None = None  # train split packing, if sample_packing
    from_cache: bool = False

    def summary(self) -> str:
        lines = [f"train data: {self.report.summary()}"]
        if self.eval_report is not None:
            lines.append(f"test_datasets: {self.eval_report.summary()}")
        if self.packing is not None:
            lines.append(self.packing.summary())
        n_eval = len(self.eval) if self.eval is not None else 0
        lines.append(f"{len(self.train)} train examples, {n_eval} eval examples")
        if self.from_cache:
            lines.append("(loaded from dataset_prepared_path)")
        return "\n".join(lines)


def prepare_datasets(
    datasets: list[DatasetConfig],
    tokenizer,
    *,
    sequence_len: int,
    train_on_inputs: bool = False,
    sample_packing: bool = False,
    val_set_size: float = 0.0,
    test_datasets: list[DatasetConfig] | None = None,
    prepared_path: str | None = None,
    seed: int = 42,
    chat_template: str | None = None,
    excess_length_strategy: str = "drop",
    deduplicate: bool = False,
) -> PreparedData:
    """Load, format, tokenize, split and (optionally) pack the configured datasets.

    With `prepared_path`, the result is cached under a key of every input that affects it and
    reused by later runs with the same inputs.
    """
    from dft_peft.data import cache
    from dft_peft.data.tokenize import TokenizeOptions, check_excess_length_strategy

    check_excess_length_strategy(excess_length_strategy)
    if not datasets:
        raise UserError("datasets: is empty; add at least one entry with a path and a type")
    if sequence_len < 2:
        raise UserError(f"sequence_len: {sequence_len} is too small; use at least 2 (typically 512-4096)")
    if test_datasets and val_set_size:
        raise UserError("set either val_set_size or test_datasets, not both (test_datasets is the eval set)")

    settings = {
        "sequence_len": sequence_len,
        "train_on_inputs": train_on_inputs,
        "sample_packing": sample_packing,
        "val_set_size": val_set_size,
        "seed": seed,
        "chat_template": chat_template,
        "excess_length_strategy": excess_length_strategy,
        **({"deduplicate": True} if deduplicate else {}),  # absent when off: earlier caches stay valid
    }
    key = cache.cache_key(datasets, test_datasets, tokenizer, settings)
    if prepared_path:
        hit = cache.load_prepared(prepared_path, key)
        if hit is not None:
            train, eval_ds, meta = hit
            log.info("Loaded prepared datasets from %s/%s", prepared_path, key)
            return PreparedData(
                train=train,
                eval=eval_ds,
                report=TokenizeReport.from_dict(meta["report"]),
                eval_report=TokenizeReport.from_dict(meta["eval_report"]) if meta.get("eval_report") else None,
                packing=PackingReport(**meta["packing"]) if meta.get("packing") else None,
                from_cache=True,
            )

    opts = TokenizeOptions(
        sequence_len=sequence_len,
        train_on_inputs=train_on_inputs,
        excess_length_strategy=excess_length_strategy,
        chat_template=chat_template,
    )
    train, report = _tokenize_all(datasets, tokenizer, opts, f"{key}-train")
    if deduplicate:  # Axolotl's dataset_exact_deduplication: identical token rows, before the eval split
        train = drop_duplicate_rows(train, "train")
    log.info("Train data: %s", report.summary())
    if len(train) == 0:
        raise UserError(f"no training rows left after tokenization ({report.summary()}); {_empty_hint(report)}")

    eval_report = None
    if test_datasets:
        eval_ds, eval_report = _tokenize_all(test_datasets, tokenizer, opts, f"{key}-test")
        if deduplicate:
            eval_ds = drop_duplicate_rows(eval_ds, "test")
        log.info("Test data: %s", eval_report.summary())
        if len(eval_ds) == 0:
            raise UserError(
                f"no test_datasets rows left after tokenization ({eval_report.summary()}); {_empty_hint(eval_report)}"
            )
    else:
        from dft_peft.data.loading import split_eval

        train, eval_ds = split_eval(train, val_set_size, seed)

    packing = None
    if sample_packing:
        from dft_peft.data.packing import pack_dataset

        train, packing = pack_dataset(train, sequence_len)
        log.info("Train %s", packing.summary())
        if eval_ds is not None:
            eval_ds, _ = pack_dataset(eval_ds, sequence_len)

    if prepared_path:
        meta = {
            "report": report.to_dict(),
            "eval_report": eval_report.to_dict() if eval_report else None,
            "packing": packing.to_dict() if packing else None,
            "settings": settings,
        }
        where = cache.save_prepared(prepared_path, key, train, eval_ds, meta)
        log.info("Saved prepared datasets to %s", where)
    return PreparedData(train=train, eval=eval_ds, report=report, eval_report=eval_report, packing=packing)


def _tokenize_all(configs: Sequence[DatasetConfig], tokenizer, opts, fingerprint: str):
    """Tokenize every entry and concatenate, aligning the optional `weights` column."""
    import datasets as hf_datasets

    from dft_peft.data.loading import load_raw
    from dft_peft.data.tokenize import tokenize_dataset

    parts, total = [], TokenizeReport()
    for i, cfg in enumerate(configs):
        raw = load_raw(cfg)
        ds, rep = tokenize_dataset(raw, cfg, tokenizer, opts, source=cfg.path, fingerprint=f"{fingerprint}-{i}")
        parts.append(ds)
        total = total + rep
    if any("weights" in p.column_names for p in parts):
        # Entries without weight_field count with weight 1, so entries can be mixed.
        parts = [p if "weights" in p.column_names else _with_unit_weights(p) for p in parts]
    merged = parts[0] if len(parts) == 1 else hf_datasets.concatenate_datasets(parts)
    return merged, total


def drop_duplicate_rows(ds, name: str):
    """The rows of `ds` whose tokens (ids, labels, weights) no earlier row has, first copy kept.

    As Axolotl's `dataset_exact_deduplication`: a row repeated in the data counts once."""
    import hashlib

    columns = [c for c in ("input_ids", "labels", "weights") if c in ds.column_names]
    seen: set[str] = set()
    keep = []
    for index, row in enumerate(ds.select_columns(columns)):
        digest = hashlib.sha256(repr([row[c] for c in columns]).encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            keep.append(index)
    if len(keep) < len(ds):
        log.info("dataset_exact_deduplication: %d of %d %s rows were exact duplicates, dropped", len(ds) - len(keep), len(ds), name)
        ds = ds.select(keep)
    return ds


def _with_unit_weights(ds):
    from dft_peft.data.tokenize import token_features

    return ds.map(
        lambda b: {"weights": [[1.0] * len(x) for x in b["input_ids"]]},
        batched=True,
        features=token_features(True),
        desc="Adding unit weights",
    )


def _empty_hint(report: TokenizeReport) -> str:
    if report.dropped_too_long:
        return "raise sequence_len or set excess_length_strategy: truncate"
    if report.dropped_no_trainable:
        return "check roles_to_train / the output fields, or set train_on_inputs: true"
    if report.dropped_low_weight:
        return "lower min_weight"
    return "check the dataset files"
