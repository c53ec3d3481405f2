"""Dataset file types: which `datasets` builder reads a file, by extension or by `ds_type`.
Shared by local loading and hub datasets."""

from __future__ import annotations

# extension -> datasets builder
BUILDERS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
DS_TYPE_BUILDER = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet", "arrow": "arrow"}
