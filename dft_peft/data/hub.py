"""Datasets from the Hugging Face hub: `datasets: - path: org/name` with Axolotl's keys.

Loaded through `datasets.load_dataset` into its usual cache; the commit a revision resolves to
goes into the prepared-data cache key, so a new upload is never mistaken for the old one.
"""

from __future__ import annotations

import re
from pathlib import Path

from dft_peft.errors import UserError
from dft_peft.config.hub_ids import is_hub_id, storage_folder
from dft_peft.data.file_types import BUILDERS, DS_TYPE_BUILDER

_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow")


def is_hub_dataset(path: str) -> bool:
    """A `datasets:` path that names a hub dataset repo (not a local file, folder or file name)."""
    return is_hub_id(path) and not path.lower().endswith(_DATA_SUFFIXES)


def load_hub_dataset(cfg):
    """A `datasets:` entry from the hub through `datasets.load_dataset`, as Axolotl loads it:
    `name` is the dataset's config, `data_files` picks files inside the repo, `split` a split,
    `revision` a branch, tag or commit. With `ds_type` the files are read with that builder
    (`hf://datasets/<repo>@<revision>/<file>`), for repos whose files lack a telling extension."""
    import datasets
    from huggingface_hub import constants

    kwargs = {"split": cfg.split}
    if cfg.ds_type:
        names = [cfg.data_files] if isinstance(cfg.data_files, str) else list(cfg.data_files or ["**"])
        rev = f"@{cfg.revision}" if cfg.revision else ""
        files = [f"hf://datasets/{cfg.path}{rev}/{n}" for n in names]
        source, kwargs = DS_TYPE_BUILDER[cfg.ds_type], {**kwargs, "data_files": {cfg.split: files}}
    else:
        source = cfg.path
        # Files named without a split would all land in `train`; `split:` names the split they make.
        data_files = {cfg.split: cfg.data_files} if isinstance(cfg.data_files, (str, list)) else cfg.data_files
        kwargs.update(name=cfg.name, revision=cfg.revision, data_files=data_files)
    if constants.is_offline_mode() and cfg.data_files is not None:
        cached = _cached_dataset_files(cfg)
        if cached:  # datasets' own cache misses entries with data_files offline; the hub cache has the files
            source, kwargs = cached[0], {"data_files": {cfg.split: cached[1]}, "split": cfg.split}
    try:
        return datasets.load_dataset(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - one line naming the entry; --debug keeps the cause
        raise UserError(_dataset_error(cfg, exc, constants.ENDPOINT)) from exc


def _cached_dataset_files(cfg) -> tuple[str, list[str]] | None:
    """(builder, local files) of `data_files` in the hub cache's snapshot of the dataset, when all are there."""
    revision = cfg.revision or "main"
    folder = storage_folder(cfg.path, "dataset")
    ref = folder / "refs" / revision
    sha = revision if re.fullmatch(r"[0-9a-f]{40}", revision) else (ref.read_text().strip() if ref.is_file() else None)
    if sha is None or not (folder / "snapshots" / sha).is_dir():
        return None
    snapshot = folder / "snapshots" / sha
    files: list[str] = []
    for pattern in [cfg.data_files] if isinstance(cfg.data_files, str) else list(cfg.data_files):
        found = sorted(str(p) for p in snapshot.glob(pattern) if p.is_file())
        if not found:
            return None
        files += found
    kinds = {DS_TYPE_BUILDER[cfg.ds_type]} if cfg.ds_type else {BUILDERS.get(Path(f).suffix.lower()) for f in files}
    return (kinds.pop(), files) if len(kinds) == 1 and None not in kinds else None


def _dataset_error(cfg, exc: BaseException, endpoint: str) -> str:
    from huggingface_hub import constants

    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = f"dataset {cfg.path}"
    names = {type(e).__name__ for e in _causes(exc)}
    if {"DatasetNotFoundError", "RepositoryNotFoundError"} & names and "GatedRepoError" not in names:
        return (
            f"{where} was not found on {endpoint}: check the id (org/name as on the hub); if it is private or gated, "
            f"run `hf auth login` (or set HF_TOKEN) with an account that can open {endpoint}/datasets/{cfg.path}"
        )
    if "GatedRepoError" in names or "gated" in text.lower():
        return f"{where} is gated: accept its terms at {endpoint}/datasets/{cfg.path} and run `hf auth login` (or set HF_TOKEN)"
    if constants.is_offline_mode() or {"ConnectError", "ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError"} & names:
        return (
            f"{where}: the hub is unreachable or HF_HUB_OFFLINE=1 is set, and the datasets cache "
            f"({datasets_cache()}) does not hold it with these settings; load it once where the hub is reachable "
            f"(HF_HUB_OFFLINE=1 then uses the cache) or point path at local files ({text})"
        )
    if "split" in text.lower():
        return f"{where}: {text}; fix split:"
    if isinstance(exc, FileNotFoundError) or "FileNotFound" in " ".join(names):
        return f"{where}: {text}; check data_files (paths inside the repo) and revision"
    return f"{where}: cannot load it from the hub: {text}"


def _causes(exc: BaseException):
    seen = 0
    while exc is not None and seen < 10:
        yield exc
        exc = exc.__cause__ or exc.__context__
        seen += 1


def datasets_cache() -> str:
    import datasets

    return str(datasets.config.HF_DATASETS_CACHE)


def dataset_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a hub dataset's `revision` resolves to (for the prepared-data cache key).

    Offline, the cached ref of `datasets`' own download (or None when there is none).
    """
    from huggingface_hub import HfApi, constants

    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    if not constants.is_offline_mode():
        try:
            return str(HfApi().dataset_info(repo_id, revision=revision).sha)
        except Exception:  # noqa: BLE001 - load_dataset reports the failure with its own words
            pass
    ref = storage_folder(repo_id, "dataset") / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None
