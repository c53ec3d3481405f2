"""Where a model comes from: a local folder, a `.gguf` file, `pkg://` GGUF, or a Hugging Face hub id.

A hub id is downloaded with `huggingface_hub` into the standard cache (`HF_HOME`/`HF_HUB_CACHE`),
as Axolotl, TRL and transformers do, so a model fetched by any of them is reused here and the
other way round. `huggingface_hub` itself honours `HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_TOKEN` and
a saved `hf auth login`; we only choose which files to fetch and turn its exceptions into one
line that says what to do.

Why the repo is listed before downloading: many repos carry the same weights two or three times
(safetensors, PyTorch `.bin`, `original/*.pth`, GGUF, ONNX). Fetching only what loading needs
saves tens of GB on an 8B model, and the listing gives the sizes for the disk-space check.
"""

from __future__ import annotations

import difflib
import errno
import fnmatch
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dft_peft.config.hub_ids import is_hub_id, storage_folder
from dft_peft.errors import UserError, closest

logger = logging.getLogger(__name__)

Kind = Literal["model", "config", "tokenizer", "adapter"]

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "*.tiktoken", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
    "chat_template.json", "spiece.model", "sentencepiece*.model", "tekken.json",
)
_CONFIG_FILES = ("config.json", "generation_config.json")
_KIND_KEY = {"model": "base_model", "config": "base_model_config", "tokenizer": "tokenizer_config", "adapter": "lora_model_dir"}


def local_source(cfg, key: str) -> str | None:
    """`cfg.<key>` (base_model_config, tokenizer_config, lora_model_dir) as a local folder:
    unchanged when it is a path, fetched into the cache when it is a hub id."""
    value = getattr(cfg, key)
    if not is_hub_id(value):
        return value
    kind = next(k for k, v in _KIND_KEY.items() if v == key)
    revision = getattr(cfg, "model_revision", None) if value == getattr(cfg, "base_model", None) else None
    return str(fetch(value, kind, revision=revision))


# ----------------------------------------------------------------------------- which files


def choose_files(
    repo_files: list[str], kind: Kind, *, gguf_file: str | None = None, repo_id: str = "", key: str | None = None
) -> list[str]:
    """The files loading needs, from the repo's listing.

    Top-level files only: `original/` folders hold a second copy of the weights in another format.
    """
    key = key or _KIND_KEY[kind]
    if gguf_file:
        if gguf_file not in repo_files:
            ggufs = sorted(f for f in repo_files if f.endswith(".gguf"))
            raise UserError(
                f"gguf_file `{gguf_file}` is not in `{repo_id}` (its GGUF files: {', '.join(ggufs) or 'none'})."
                + (f" Did you mean `{closest(gguf_file, ggufs)}`?" if closest(gguf_file, ggufs) else "")
            )
        return [gguf_file]
    top = [f for f in repo_files if "/" not in f]

    def matching(*patterns: str) -> list[str]:
        return [f for f in top if any(fnmatch.fnmatch(f, p) for p in patterns)]

    if kind == "config":
        return matching(*_CONFIG_FILES)
    if kind == "tokenizer":
        return matching(*_TOKENIZER_FILES, "config.json")
    if kind == "adapter":
        if "adapter_config.json" not in top:
            raise UserError(f"{key} `{repo_id}` on the hub has no adapter_config.json; point it at a PEFT adapter repo.")
        weights = matching("adapter_model.safetensors") or matching("adapter_model.bin")
        return sorted(set(matching("*.json", *_TOKENIZER_FILES) + weights))
    weights = matching("*.safetensors", "*.safetensors.index.json")
    if not weights:
        weights = matching("*.bin", "*.bin.index.json")
    if not weights:
        ggufs = sorted(f for f in repo_files if f.endswith(".gguf"))
        if ggufs:
            raise UserError(
                f"{key} `{repo_id}` holds GGUF files only: add `gguf_file:` naming one of "
                f"{', '.join(ggufs[:6])}{' ...' if len(ggufs) > 6 else ''} (it is converted to safetensors once)."
            )
        raise UserError(
            f"{key} `{repo_id}` has no safetensors or PyTorch weights at its top level "
            f"(files: {', '.join(top[:8])}); check the repo id."
        )
    other_index = "*.bin.index.json" if weights[0].endswith((".safetensors", ".safetensors.index.json")) else "*.safetensors.index.json"
    extras = [f for f in matching(*_CONFIG_FILES, *_TOKENIZER_FILES, "*.json") if not fnmatch.fnmatch(f, other_index)]
    return sorted(set(extras + weights))


# ----------------------------------------------------------------------------- download


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int


def fetch(
    repo_id: str, kind: Kind = "model", *, revision: str | None = None, gguf_file: str | None = None, key: str | None = None
) -> Path:
    """A local folder holding what `kind` needs from hub repo `repo_id`, downloading what is missing.

    With `HF_HUB_OFFLINE=1` nothing is requested: the cache must hold the files already.
    """
    from huggingface_hub import constants

    key = key or _KIND_KEY[kind]
    if constants.is_offline_mode():
        return _from_cache(repo_id, kind, revision, gguf_file, key, reason="HF_HUB_OFFLINE=1 is set")
    try:
        sha, listing = _list_repo(repo_id, revision)
        wanted = choose_files([f.path for f in listing], kind, gguf_file=gguf_file, repo_id=repo_id, key=key)
        _check_disk_space(repo_id, sha, [f for f in listing if f.path in wanted])
        return _download(repo_id, sha, revision, wanted)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one line or is re-raised
        problem = _explain(exc, repo_id, key, revision)
        if problem == "offline":
            return _from_cache(repo_id, kind, revision, gguf_file, key, reason=f"the hub ({constants.ENDPOINT}) is unreachable")
        if problem is None:
            raise
        raise UserError(problem) from exc


def _list_repo(repo_id: str, revision: str | None) -> tuple[str, list[RemoteFile]]:
    """(commit sha, files with sizes) of the repo at `revision`, in one request."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    files = [RemoteFile(s.rfilename, int(s.size or (s.lfs.size if s.lfs else 0) or 0)) for s in info.siblings or []]
    return str(info.sha), files


def _download(repo_id: str, sha: str, revision: str | None, wanted: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    snapshot = storage_folder(repo_id) / "snapshots" / sha
    missing = [f for f in wanted if not (snapshot / f).exists()]
    if missing:
        logger.info("dft-peft: downloading %d file(s) of %s@%s into the Hugging Face cache", len(missing), repo_id, sha[:12])
    folder = snapshot_download(repo_id, revision=sha, allow_patterns=wanted)
    if revision and revision != sha:
        _remember_ref(repo_id, revision, sha)
    elif not revision:
        _remember_ref(repo_id, "main", sha)
    return Path(folder)


def _remember_ref(repo_id: str, revision: str, sha: str) -> None:
    """Write refs/<revision> -> sha: we download by sha (one consistent commit), and an offline
    run later asks for the branch name, as the user's config does."""
    ref = storage_folder(repo_id) / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text() != sha:
            ref.write_text(sha)
    except OSError:
        pass


def _check_disk_space(repo_id: str, sha: str, files: list[RemoteFile]) -> None:
    """Fail before the download when the cache's disk cannot hold the files not yet cached
    (huggingface_hub only warns, then fails half way with a bare OSError)."""
    from huggingface_hub import constants

    snapshot = storage_folder(repo_id) / "snapshots" / sha
    needed = sum(f.size for f in files if not (snapshot / f.path).exists())
    cache = Path(constants.HF_HUB_CACHE)
    probe = next((p for p in (cache, *cache.parents) if p.exists()), None)
    if probe is None or needed == 0:
        return
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise UserError(_disk_full_message(repo_id, needed, free))


def _disk_full_message(repo_id: str, needed: int | None, free: int | None) -> str:
    from huggingface_hub import constants

    amounts = f"needs {_gb(needed)} free, has {_gb(free)}" if needed is not None and free is not None else "the disk filled up"
    return (
        f"not enough disk space to download `{repo_id}` into the Hugging Face cache {constants.HF_HUB_CACHE}: "
        f"{amounts}; free some space (`hf cache rm` removes cached repos) or set HF_HOME to a bigger disk."
    )


def _gb(n: int | None) -> str:
    return f"{(n or 0) / 1e9:.2f} GB" if (n or 0) >= 1e8 else f"{(n or 0) / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- the cache


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    ref = storage_folder(repo_id) / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def _from_cache(repo_id: str, kind: Kind, revision: str | None, gguf_file: str | None, key: str, *, reason: str) -> Path:
    """The cached snapshot when it holds every file `kind` needs; else one line naming what is missing."""
    from huggingface_hub import constants

    sha = _cached_commit(repo_id, revision)
    snapshot = storage_folder(repo_id) / "snapshots" / sha if sha else None
    offline_hint = (
        "HF_HUB_OFFLINE=1 trains from the cache, so download it first where the hub is reachable "
        f"(`hf download {repo_id}`) or copy the cache folder {constants.HF_HUB_CACHE}"
    )
    if snapshot is None or not snapshot.is_dir():
        raise UserError(
            f"{key} `{repo_id}`{'@' + revision if revision else ''}: {reason} and the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} holds nothing of it; {offline_hint}."
        )
    listing = _cached_listing(repo_id, sha)
    if listing is None:  # fetched by another tool: trust what is there
        listing = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]
    wanted = choose_files(listing, kind, gguf_file=gguf_file, repo_id=repo_id, key=key)
    missing = [f for f in wanted if not (snapshot / f).exists()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"{key} `{repo_id}`: {reason} and the cache lacks {shown}; {offline_hint}.")
    return snapshot


def _cached_listing(repo_id: str, sha: str) -> list[str] | None:
    """The repo's file list as snapshot_download saved it (trees/<sha>.json), or None."""
    try:
        from huggingface_hub._tree_cache import read_tree_cache
    except ImportError:  # older huggingface_hub: no tree cache
        return None
    entries = read_tree_cache(str(storage_folder(repo_id)), sha)
    return list(entries) if entries else None


def cached_repo_ids(repo_type: str = "model") -> list[str]:
    """Repo ids with a folder in the cache (`models--org--name`), for 'did you mean'."""
    from huggingface_hub import constants

    prefix = f"{repo_type}s--"
    try:
        names = os.listdir(constants.HF_HUB_CACHE)
    except OSError:
        return []
    return sorted(n[len(prefix) :].replace("--", "/", 1) for n in names if n.startswith(prefix))


# ----------------------------------------------------------------------------- errors


def _explain(exc: BaseException, repo_id: str, key: str, revision: str | None) -> str | None:
    """One line for a hub failure; "offline" when the cache should be tried; None for a bug."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login = (
        "run `hf auth login` (or set HF_TOKEN) with a token of an account that has accepted the model's "
        f"licence at {constants.ENDPOINT}/{repo_id}"
    )
    if isinstance(exc, GatedRepoError):
        return f"{key} `{repo_id}` is gated: you need to accept its licence and log in; {login}."
    if isinstance(exc, RevisionNotFoundError):
        return f"{key} `{repo_id}` has no revision `{revision}`; fix model_revision (a branch, tag or commit sha)."
    if isinstance(exc, RepositoryNotFoundError):
        if exc.response is not None and exc.response.status_code == 401 and _has_token():
            return f"{key} `{repo_id}`: the hub refused your token (401); {login}."
        near = difflib.get_close_matches(repo_id, cached_repo_ids(), n=3, cutoff=0.5)
        hint = f" Cached models that look close: {', '.join(near[:3])}." if near else ""
        return (
            f"{key} `{repo_id}` was not found on {constants.ENDPOINT}: check the id (org/name as on the hub's "
            f"page){_no_folder(repo_id)}; if it is private, run `hf auth login` (or set HF_TOKEN) as an account that "
            f"can see it.{hint}"
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return _disk_full_message(repo_id, None, None)
    if isinstance(exc, (httpx2.ConnectError, httpx2.TimeoutException, httpx2.RemoteProtocolError, OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return "offline"
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        if status == 401 or status == 403:
            return f"{key} `{repo_id}`: the hub refused access ({status}); {login}."
        if isinstance(status, int) and status >= 500:
            return "offline"
        return f"{key} `{repo_id}`: the hub answered {status}: {str(exc).strip().splitlines()[0]}"
    return None


def _no_folder(value: str) -> str:
    """A hub id is also a relative path: say that no such folder exists either (a mistyped path)."""
    return f", and there is no folder `{value}` here" if "/" in value else ""


def _has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None
