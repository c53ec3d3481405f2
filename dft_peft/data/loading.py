"""Load a dataset entry from local files or the hub, and split off an eval set.

Local files: `datasets.load_dataset(<builder>, data_files=...)` reads json/csv/parquet/arrow
files, and `load_from_disk` reads a folder saved by `save_to_disk`. A hub id (`org/name`) goes
through `dft_peft.data.hub.load_hub_dataset` (`datasets.load_dataset` with Axolotl's keys).
"""

from __future__ import annotations

from pathlib import Path

from dft_peft.data import hub as hub_datasets
from dft_peft.config.datasets import DatasetConfig
from dft_peft.config.hub_ids import HUB_ID
from dft_peft.data.file_types import BUILDERS, DS_TYPE_BUILDER
from dft_peft.errors import UserError



def _is_saved_dataset(folder: Path) -> bool:
    """A `save_to_disk` folder (a Dataset or a DatasetDict)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def resolve_files(cfg: DatasetConfig) -> tuple[str, list[Path]]:
    """The builder and the data files of an entry; ("disk", [folder]) for a saved dataset.

    Also used by the cache to fingerprint the files' sizes and times.
    """
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise UserError(_missing_path_message(cfg.path))
    if cfg.data_files is not None:
        names = [cfg.data_files] if isinstance(cfg.data_files, str) else list(cfg.data_files)
        base = path if path.is_dir() else path.parent
        files = [Path(n) if Path(n).is_absolute() else base / n for n in names]
        for f in files:
            if not f.is_file():
                raise UserError(f"dataset {cfg.path}: data_files entry {f} does not exist; fix data_files")
    elif path.is_dir():
        if _is_saved_dataset(path):
            return "disk", [path]
        exts = {f".{cfg.ds_type}"} if cfg.ds_type else set(BUILDERS)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in exts)
        if not files:
            raise UserError(
                f"dataset folder {cfg.path} has no {'/'.join(sorted(exts))} files and is not a saved dataset; "
                "point path at a data file or set data_files"
            )
    else:
        files = [path]
    return _builder(cfg, files), files


def _builder(cfg: DatasetConfig, files: list[Path]) -> str:
    if cfg.ds_type:
        return DS_TYPE_BUILDER[cfg.ds_type]
    kinds = {BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if f.suffix.lower() not in BUILDERS)
        raise UserError(
            f"dataset {cfg.path}: cannot tell the file type of {bad.name}; set ds_type: to one of "
            "json, jsonl, csv, parquet, arrow"
        )
    if len(kinds) > 1:
        raise UserError(f"dataset {cfg.path}: mixes file types {sorted(kinds)}; set ds_type or data_files")
    return kinds.pop()


def _missing_path_message(path: str) -> str:
    if path.startswith(("hf://", "http://", "https://")) or (
        HUB_ID.match(path) and Path(path).suffix.lower() not in BUILDERS
    ):
        return (
            f"dataset path {path} is not a local file or folder; for a Hugging Face hub dataset write its repo id "
            "(`path: org/name`, with `data_files:` naming files inside it)"
        )
    return f"dataset path {path} does not exist; fix path (relative paths are from the current directory)"


def load_raw(cfg: DatasetConfig):
    """The entry's rows as a `datasets.Dataset`."""
    import datasets

    if hub_datasets.is_hub_dataset(cfg.path):  # `org/name`: a Hugging Face hub dataset repo
        return hub_datasets.load_hub_dataset(cfg)
    builder, files = resolve_files(cfg)
    check_not_empty(cfg, builder, files)
    try:
        if builder == "disk":
            loaded = datasets.load_from_disk(str(files[0]))
            if isinstance(loaded, datasets.DatasetDict):
                if cfg.split not in loaded:
                    raise UserError(
                        f"dataset {cfg.path} has no split `{cfg.split}` (it has {', '.join(loaded)}); set split:"
                    )
                loaded = loaded[cfg.split]
            return loaded
        loaded = datasets.load_dataset(builder, data_files={cfg.split: [str(f) for f in files]}, split=cfg.split)
    except UserError:
        raise
    except Exception as err:  # a malformed file: name it and the line, else keep the parser's reason
        found = first_bad_line(builder, files)
        if found:
            raise UserError(found) from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"dataset {cfg.path}: cannot read it as {builder}: {reason}") from None
    if len(loaded) == 0:
        raise UserError(first_bad_line(builder, files) or f"dataset {cfg.path} has no rows; add data to it")
    return loaded


def check_not_empty(cfg: DatasetConfig, builder: str, files: list[Path]) -> None:
    """An empty data file is a mistake (a failed export), not a dataset of zero rows."""
    for f in files:
        if builder != "disk" and f.is_file() and f.stat().st_size == 0:
            raise UserError(f"dataset file {f} is empty; put rows in it (one JSON object per line for .jsonl)")
        if builder in ("json", "csv") and f.is_file():
            # pyarrow reads bytes that are not UTF-8 without complaint and fails rows later, deep
            # inside tokenization; decoding once here (GB/s) names the line instead.
            raw = f.read_bytes()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = raw.count(b"\n", 0, exc.start) + 1
                raise UserError(
                    f"dataset file {f} line {line}: not UTF-8 text (byte {raw[exc.start]:#x}); save the file as UTF-8"
                ) from None


def first_bad_line(builder: str, files: list[Path]) -> str | None:
    """For JSON lines files: the first line that is not UTF-8 or not a JSON object, as one message.

    Run only after the fast reader failed (or found no rows), so good files are read once.
    """
    import json

    if builder != "json":
        return None
    for f in files:
        raw = f.read_bytes()
        if not raw.strip():
            return f"dataset file {f} has only blank lines; put rows in it (one JSON object per line)"
        if f.suffix.lower() == ".json":
            try:
                whole = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                whole = None
            if isinstance(whole, (list, dict)):
                continue
            if not raw.lstrip().startswith(b"{"):
                return f"dataset file {f} is not valid JSON (a list of objects, or one object per line)"
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"dataset file {f} line {number}: not UTF-8 text (byte {line[exc.start]:#x} at column {exc.start + 1}); save the file as UTF-8"
            try:
                row = json.loads(text)
            except ValueError as exc:
                return f"dataset file {f} line {number}: not valid JSON ({exc}); fix or remove the line"
            if not isinstance(row, dict):
                return f"dataset file {f} line {number}: a JSON {type(row).__name__}, not an object (`{{\"key\": ...}}`)"
    return None


def split_eval(ds, val_set_size: float, seed: int):
    """(train, eval) with `val_set_size` rows (a count >= 1) or fraction (< 1) held out; eval None if 0."""
    if not val_set_size:
        return ds, None
    if val_set_size < 0:
        raise UserError(f"val_set_size: {val_set_size} must be >= 0 (a fraction below 1 or a row count)")
    test_size: float | int = int(val_set_size) if val_set_size >= 1 else float(val_set_size)
    if isinstance(test_size, int) and test_size >= len(ds):
        raise UserError(
            f"val_set_size: {val_set_size} rows is not less than the {len(ds)} rows left after tokenization; lower it"
        )
    if len(ds) < 2:
        raise UserError(f"val_set_size: cannot split an eval set from {len(ds)} row(s); add data or set it to 0")
    try:
        parts = ds.train_test_split(test_size=test_size, seed=seed, shuffle=True)
    except ValueError as err:  # e.g. a fraction that rounds to 0 rows
        raise UserError(f"val_set_size: {val_set_size} does not fit {len(ds)} rows: {err}") from None
    return parts["train"], parts["test"]
