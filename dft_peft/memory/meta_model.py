"""The configured model, built on the meta device: shapes and dtypes as training has them, no bytes.

`load_model` on a CUDA card with `load_in_4bit` gives a transformers causal LM whose decoder
linears are bitsandbytes `Linear4bit` layers holding a `Params4bit`: the weight packed two 4-bit
codes per byte, `[(out * in + 1) // 2, 1]` uint8, plus a `QuantState` (one absmax per 64 weights,
stored as uint8 with a second fp32 absmax per 256 blocks under double quantization, a 16-entry fp32
code book, an fp32 offset). Embeddings, head and norms stay in the compute dtype. This module
builds exactly that on `torch.device("meta")`, so the real `attach_adapter` (peft's k-bit
preparation, our bf16 embedding restore, LoRA) and the real bitsandbytes autograd function
(dequantize per call, matmul) run on it. Nothing is read from disk but the model's config.
"""

from __future__ import annotations

from typing import Any

import torch

NF4_BLOCK = 64  # bitsandbytes' 4-bit block size (one absmax per 64 weights)
NESTED_BLOCK = 256  # double quantization: one fp32 absmax per 256 first-level absmax bytes


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def meta_quant_state(out_features: int, in_features: int, dtype: torch.dtype, quant_type: str, nested: bool):
    """A bitsandbytes `QuantState` with meta tensors of the sizes `Params4bit` quantization makes."""
    from bitsandbytes.functional import QuantState

    n = out_features * in_features
    blocks = -(-n // NF4_BLOCK)
    code = _meta(16, dtype=torch.float32)
    if not nested:
        return QuantState(_meta(blocks, dtype=torch.float32), torch.Size([out_features, in_features]), code,
                          NF4_BLOCK, quant_type, dtype)
    state2 = QuantState(_meta(-(-blocks // NESTED_BLOCK), dtype=torch.float32), code=_meta(256, dtype=torch.float32),
                        blocksize=NESTED_BLOCK, dtype=torch.float32)
    return QuantState(_meta(blocks, dtype=torch.uint8), torch.Size([out_features, in_features]), code, NF4_BLOCK,
                      quant_type, dtype, offset=_meta(dtype=torch.float32), state2=state2)


def quant_state_bytes(state: Any) -> int:
    """Bytes of a QuantState's tensors (absmax, code book, offset, nested state)."""
    total = 0
    for name in ("absmax", "code", "offset"):
        t = getattr(state, name, None)
        if torch.is_tensor(t):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    return total + (quant_state_bytes(nested) if nested is not None else 0)


def quantize_linears_4bit(model: torch.nn.Module, dtype: torch.dtype, quant_type: str, nested: bool) -> int:
    """Swap every decoder `nn.Linear` (not the head) for a meta `Linear4bit` holding packed uint8
    weights and a quant state, as bitsandbytes leaves them after quantizing on the GPU."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, compress_statistics=nested, quant_type=quant_type,
                                      device="meta")
            packed = _meta((child.in_features * child.out_features + 1) // 2, 1, dtype=torch.uint8)
            state = meta_quant_state(child.out_features, child.in_features, dtype, quant_type, nested)
            layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=NF4_BLOCK,
                                             compress_statistics=nested, quant_type=quant_type, module=layer,
                                             bnb_quantized=True)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(_meta(child.out_features, dtype=dtype), requires_grad=False)
            setattr(parent, name, layer)
            swapped += 1
    return swapped


def build_meta_model(cfg: Any, config: dict[str, Any], dtype: torch.dtype, *, layers: int | None = None):
    """The base causal LM of `cfg` on meta, quantized as `load_model` would on a CUDA card.

    `layers` overrides `num_hidden_layers` (the rehearsal runs a few layers and extrapolates).
    Returns (model, bytes of the quantization states, which are not parameters).
    """
    import transformers

    fields = dict(config)
    if layers is not None:
        fields["num_hidden_layers"] = layers
    fields.pop("quantization_config", None)
    model_type = fields.pop("model_type", "llama")
    hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    hf_config.use_cache = False
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    state_bytes = 0
    if cfg.load_in_4bit:
        quantize_linears_4bit(model, dtype, cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant)
        model.config.quantization_config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=dtype,
        )
        model.is_loaded_in_4bit = True  # what peft's prepare_model_for_kbit_training looks for
        state_bytes = sum(quant_state_bytes(p.quant_state) for p in model.parameters()
                          if getattr(p, "quant_state", None) is not None)
    elif cfg.load_in_8bit:
        from dft_peft.errors import UserError

        raise UserError("memory rehearsal: load_in_8bit is not rehearsed yet; the planner's estimate stands.")
    return model, state_bytes
