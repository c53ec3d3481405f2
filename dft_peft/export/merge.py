"""Merge a trained LoRA adapter into its base model: one function behind `merge-lora` and `export`.

The base model is loaded in full precision (never 4-bit, whatever the config trains with): LoRA's
update is added to the real weights, and a merged 4-bit model would be rounded twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_merged(cfg: Any, adapter_dir: str | Path | None = None) -> tuple[Any, Any]:
    """(merged model, tokenizer): the config's base model with the adapter (default: output_dir)
    folded into its weights, as a plain transformers model."""
    from dft_peft.model.loading import load_for_inference

    model, tokenizer = load_for_inference(cfg, adapter_dir or cfg.output_dir)
    return model.merge_and_unload(), tokenizer


def merge_lora(cfg: Any, adapter_dir: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Write the merged model and its tokenizer as safetensors (default: output_dir/merged)."""
    out = Path(out or Path(cfg.output_dir) / "merged")
    merged, tokenizer = load_merged(cfg, adapter_dir)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
