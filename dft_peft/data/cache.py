"""`dataset_prepared_path`: reuse tokenized (and packed) datasets across runs.

The folder name is a hash of everything that changes the result, so a stale cache is never
reused: the dataset entries, each data file's path/size/mtime (a hub dataset: the commit its
revision resolves to), the tokenizer's vocabulary, special tokens and chat template, the
preparation settings, and the source of this package (a code change invalidates caches even if
FORMAT_VERSION was not bumped). Writes go to a temp
folder renamed into place, so an interrupted run never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dft_peft.data import hub as hub_datasets
from dft_peft.data.formats import FORMAT_VERSION
from dft_peft.data.loading import resolve_files
from dft_peft.config.datasets import DatasetConfig

META_FILE = "prepared.json"


def _files_fingerprint(cfg: DatasetConfig) -> list[list[Any]]:
    if hub_datasets.is_hub_dataset(cfg.path):  # a hub dataset: the commit its revision resolves to
        return [["hub", cfg.path, hub_datasets.dataset_commit(cfg.path, cfg.revision)]]
    _, files = resolve_files(cfg)
    out = []
    for f in files:
        members = sorted(p for p in f.rglob("*") if p.is_file()) if f.is_dir() else [f]
        for m in members:
            st = m.stat()
            out.append([str(m.resolve()), st.st_size, st.st_mtime_ns])
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides the ids: vocabulary, special tokens, chat template, class."""
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    specials = {
        k: str(getattr(tokenizer, k, None))
        for k in ("bos_token", "eos_token", "pad_token", "unk_token", "padding_side")
    }
    h.update(json.dumps(specials, sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(type(tokenizer).__name__.encode())
    # Normalizer / pre-tokenizer / merges live in the backend; its JSON captures them.
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(repr(tokenizer("The quick brown fox, 123.")["input_ids"]).encode())
    return h.hexdigest()


def _code_fingerprint() -> str:
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def cache_key(
    datasets: Sequence[DatasetConfig],
    test_datasets: Sequence[DatasetConfig] | None,
    tokenizer: Any,
    settings: dict[str, Any],
) -> str:
    """Hex key for a preparation; identical inputs give the same key on every run."""
    payload = {
        "format_version": FORMAT_VERSION,
        "code": _code_fingerprint(),
        "datasets": [[d.model_dump(mode="json"), _files_fingerprint(d)] for d in datasets],
        "test_datasets": [[d.model_dump(mode="json"), _files_fingerprint(d)] for d in (test_datasets or [])],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenizer_name": str(getattr(tokenizer, "name_or_path", "")),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def load_prepared(prepared_path: str, key: str):
    """(train, eval or None, meta dict) from a previous run, or None when there is none."""
    import datasets

    folder = Path(prepared_path) / key
    meta_file = folder / META_FILE
    if not meta_file.is_file():  # written last: its presence means the folder is complete
        return None
    meta = json.loads(meta_file.read_text())
    train = datasets.load_from_disk(str(folder / "train"))
    eval_ds = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    return train, eval_ds, meta


def save_prepared(prepared_path: str, key: str, train, eval_ds, meta: dict[str, Any]) -> Path:
    """Write atomically: build in a temp folder next to the target, then rename it into place."""
    root = Path(prepared_path)
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache is as shareable as its parent
    try:
        train.save_to_disk(str(tmp / "train"))
        if eval_ds is not None:
            eval_ds.save_to_disk(str(tmp / "eval"))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if final.exists() and not (final / META_FILE).is_file():
            shutil.rmtree(final)  # a folder without its meta file is not ours to trust
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / META_FILE).is_file():
                raise
            shutil.rmtree(tmp)  # another run finished first; same key means same content
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
