"""Which config values name a Hugging Face hub repo, and where the standard cache keeps one.

Shared by the model room (models, tokenizers, adapters) and the data room (datasets): both ask
"is `org/name` a hub id or a path here?" and "where would huggingface_hub have cached it?".
"""

from __future__ import annotations

import re
from pathlib import Path

# `org/name`: what the hub accepts as a repo id (and what is not a path on this machine).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(value: str | None) -> bool:
    """`org/name` that is not a file or folder here: looks like a hub repo id."""
    if not value or "://" in value or value.startswith((".", "/", "~")):
        return False
    return bool(HUB_ID.match(value)) and not Path(value).expanduser().exists()


def storage_folder(repo_id: str, repo_type: str = "model") -> Path:
    """The repo's folder in the standard Hugging Face cache (HF_HOME / HF_HUB_CACHE)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
