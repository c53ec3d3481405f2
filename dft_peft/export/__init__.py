"""Out of dft-peft: the merged model (`merge-lora`), a GGUF file for llama.cpp and Ollama with an
Ollama Modelfile beside it (`export --format gguf`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dft_peft.errors import UserError
from dft_peft.export.merge import load_merged, merge_lora

__all__ = ["ExportResult", "export_gguf", "load_merged", "merge_lora", "SUPPORTED_ARCHITECTURES"]

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ExportResult:
    gguf: Path
    modelfile: Path
    replaced: bool  # an earlier file at that path was replaced

    def summary(self) -> str:
        size = self.gguf.stat().st_size / 2**20
        note = " (replaced the earlier file)" if self.replaced else ""
        return f"GGUF written to {self.gguf} ({size:.1f} MiB){note}; Ollama Modelfile: {self.modelfile}"


def default_gguf_path(cfg: Any, quant: str) -> Path:
    """output_dir/gguf/<output_dir name>-<quant>.gguf: beside the adapter, in its own folder with
    the Modelfile."""
    out_dir = Path(cfg.output_dir)
    return out_dir / "gguf" / f"{out_dir.name}-{quant}.gguf"


def _source_gguf(cfg: Any) -> Path | None:
    """The GGUF file the base model was converted from, if it was one (no download)."""
    from dft_peft.model import source

    base = str(cfg.base_model)
    if base.startswith(source.PKG_SCHEME):
        return source.package_file(base)
    path = Path(base).expanduser()
    if path.suffix == ".gguf":
        return path
    gguf_file = getattr(cfg, "gguf_file", None)
    if gguf_file and path.is_dir():
        return path / gguf_file
    return None


def export_gguf(cfg: Any, adapter: str | Path | None = None, out: str | Path | None = None, quant: str = "f16") -> ExportResult:
    """Merge the adapter into the base model and write it as GGUF, plus an Ollama Modelfile.

    The architecture and quantization are checked from the base model's config before anything
    heavy is loaded, so an unsupported model fails in a second with the list of supported ones.
    """
    from importlib.util import find_spec

    if find_spec("gguf") is None:
        raise UserError("export: the `gguf` package is needed; run `pip install 'dft-peft[gguf]'`.")
    from transformers import AutoConfig

    from dft_peft.export.gguf import family_for, quant_types, write_gguf
    from dft_peft.export.modelfile import write_modelfile
    from dft_peft.export.vocab import source_gguf_pre
    from dft_peft.model.source import resolve_model_path

    quant_types(quant)
    model_path = resolve_model_path(cfg.base_model, cfg.model_revision, getattr(cfg, "gguf_file", None))
    family_for(AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code).model_type)
    target = Path(out) if out else default_gguf_path(cfg, quant)
    if target.suffix != ".gguf":
        raise UserError(f"export: --out `{target}` should end in .gguf.")
    replaced = target.exists()
    merged, tokenizer = load_merged(cfg, adapter)
    name = f"{Path(str(cfg.base_model)).stem} + {Path(str(adapter or cfg.output_dir)).name} (dft-peft)"
    write_gguf(merged, tokenizer, target, quant, name=name, tokenizer_pre=source_gguf_pre(_source_gguf(cfg)))
    return ExportResult(gguf=target, modelfile=write_modelfile(target, tokenizer), replaced=replaced)
