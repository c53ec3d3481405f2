"""Write a merged causal LM as a GGUF file that llama.cpp and Ollama load, with gguf's own writer.

What llama.cpp's convert_hf_to_gguf.py does for these families, and nothing more:
- tensor names through gguf's name map for the architecture (`blk.N.attn_q.weight`, ...);
- for the `llama` architecture (Llama, SmolLM2, Mistral), the rows of q_proj and k_proj are
  permuted: llama.cpp rotates adjacent pairs of each head's dimensions, transformers the two
  halves; Qwen2 rotates halves in both (`neox` rope) and is written as it is;
- no `output.weight` when the head is tied to the embedding (llama.cpp reuses `token_embd`);
- hyperparameters under the architecture's keys, Llama-3's rope frequency factors as the
  `rope_freqs` tensor;
- 1-D tensors (norms, biases) in F32, matrices in F16 or Q8_0 (F16 where a row is not a multiple
  of Q8_0's 32-value block).
Tensors are converted and written one at a time, so the file never sits in memory whole.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from dft_peft.errors import UserError
from dft_peft.export.vocab import add_tokenizer


@dataclass(frozen=True)
class Family:
    arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's `llama` rope layout (see the module docstring)


# transformers `model_type` -> how llama.cpp stores it. Mistral is the llama architecture there.
FAMILIES = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
}

QUANTS = {
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}


def family_for(model_type: str | None) -> Family:
    """The GGUF family of a transformers model type, or the one line naming the supported ones."""
    if model_type not in FAMILIES:
        raise UserError(
            f"export: model type `{model_type}` cannot be exported to GGUF yet; supported: "
            f"{', '.join(sorted(FAMILIES))} (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5)."
        )
    return FAMILIES[model_type]


def quant_types(quant: str) -> tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]:
    if quant not in QUANTS:
        raise UserError(f"export: --quant `{quant}` is not supported; use one of {', '.join(QUANTS)}.")
    return QUANTS[quant]


# ----------------------------------------------------------------------------- hyperparameters


def _rope(config: Any) -> tuple[float, dict[str, Any]]:
    """(rope theta, scaling dict) from a transformers 5 `rope_parameters` or an older config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    merged["rope_type"] = kind
    return float(theta if theta is not None else 10000.0), merged


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hyperparameters(writer: gguf.GGUFWriter, config: Any, family: Family, vocab_size: int) -> None:
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta, rope = _rope(config)
    writer.add_rope_freq_base(theta)
    dim = head_dim(config)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    if family.arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(vocab_size)
        writer.add_rope_dimension_count(dim)
    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind == "llama3" and family.arch == gguf.MODEL_ARCH.LLAMA:
        pass  # written as the rope_freqs tensor
    elif kind != "default":
        raise UserError(f"export: rope scaling `{kind}` is not supported for GGUF export (default, linear, yarn, llama3 are).")


def llama3_rope_factors(config: Any) -> np.ndarray | None:
    """Llama 3.1's per-frequency rope scaling, as the factors llama.cpp reads from `rope_freqs`."""
    theta, rope = _rope(config)
    if rope["rope_type"] != "llama3":
        return None
    dim = head_dim(config)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


# ----------------------------------------------------------------------------- tensors


def permute_for_llama_cpp(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from transformers' rotate-halves to llama.cpp's adjacent pairs."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]  # fp32 values in llama.cpp's layout, computed when written

    def encoded(self) -> np.ndarray:
        return gguf.quants.quantize(self.load(), self.qtype)

    def byte_shape(self) -> tuple[int, ...]:
        if self.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return self.shape
        return gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype)

    def nbytes(self) -> int:
        itemsize = {gguf.GGMLQuantizationType.F32: 4, gguf.GGMLQuantizationType.F16: 2}.get(self.qtype, 1)
        return math.prod(self.byte_shape()) * itemsize


def _matrix_type(shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def plan_tensors(model: Any, family: Family, wanted: gguf.GGMLQuantizationType) -> list[PlannedTensor]:
    """Every tensor the file will hold, named and typed, with its values left to compute."""
    config = model.config
    name_map = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    planned: list[PlannedTensor] = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"export: tensor `{hf_name}` has no GGUF name for {family.arch.name.lower()}; this model cannot be exported.")
        heads = None
        if family.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = n_head
        elif family.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = n_kv

        def load(tensor: torch.Tensor = tensor, heads: int | None = heads) -> np.ndarray:
            values = tensor.detach().to("cpu", torch.float32).numpy()
            return permute_for_llama_cpp(values, heads) if heads else values

        shape = tuple(tensor.shape)
        planned.append(PlannedTensor(name, shape, _matrix_type(shape, wanted), load))
    factors = llama3_rope_factors(config) if family.arch == gguf.MODEL_ARCH.LLAMA else None
    if factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        planned.append(PlannedTensor(name, factors.shape, gguf.GGMLQuantizationType.F32, lambda f=factors: f))
    return planned


# ----------------------------------------------------------------------------- the file


def write_gguf(
    model: Any,
    tokenizer: Any,
    out: str | Path,
    quant: str = "f16",
    *,
    name: str | None = None,
    tokenizer_pre: str | None = None,
) -> Path:
    """Write `model` (a plain, merged transformers causal LM) and `tokenizer` to the GGUF `out`.

    The file is written under a temporary name beside `out` and renamed when complete, so an
    interrupted export never leaves a truncated GGUF where a good one was.
    """
    family = family_for(getattr(model.config, "model_type", None))
    file_type, wanted = quant_types(quant)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vocab_size = model.get_input_embeddings().weight.shape[0]

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[family.arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or out.stem)
    add_hyperparameters(writer, model.config, family, vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with tempfile.TemporaryDirectory(prefix="dft-peft-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        model.config.to_json_file(str(Path(folder) / "config.json"))  # special ids, as llama.cpp reads them
        add_tokenizer(writer, tokenizer, Path(folder), vocab_size, pre=tokenizer_pre)

    planned = plan_tensors(model, family, wanted)
    for tensor in planned:
        raw = tensor.byte_shape()
        dtype = np.float32 if tensor.qtype == gguf.GGMLQuantizationType.F32 else np.float16 if tensor.qtype == gguf.GGMLQuantizationType.F16 else np.uint8
        raw_dtype = None if dtype is not np.uint8 else tensor.qtype
        writer.add_tensor_info(tensor.name, raw, np.dtype(dtype), tensor.nbytes(), raw_dtype=raw_dtype)

    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer.write_header_to_file(path=staging)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with torch.no_grad():
            for tensor in planned:
                writer.write_tensor_data(tensor.encoded())
        writer.close()
        os.replace(staging, out)
    finally:
        writer.close()
        staging.unlink(missing_ok=True)
    return out
