"""Tiny random causal LMs built from a config in the test process: no download, seconds to build."""

from __future__ import annotations

import torch
import transformers

VOCAB = 128

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {"head_dim": 8}),
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        {"head_dim": 8, "final_logit_softcapping": 2.0, "query_pre_attn_scalar": 8},
    ),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {"pad_token_id": 0}),
}


def tiny_causal_lm(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **extra, **overrides})
    config._attn_implementation = "eager"
    model = model_cls(config)
    # Random init gives near-uniform predictions; larger head weights make p vary across tokens
    # so DFT's weight differs from SFT's and the comparison can fail.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model.eval()


# Families the memory tests (lean norm, tiled MLP) also cover: built plainly (no head scaling).
MORE_ARCHITECTURES = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 8}),
    "gemma3": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 8},
    ),
}


def tiny_family_lm(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """`tiny_causal_lm` for ARCHITECTURES, else a plain tiny model of MORE_ARCHITECTURES."""
    if arch in ARCHITECTURES:
        return tiny_causal_lm(arch, seed, **overrides)
    config_cls, model_cls, extra = MORE_ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **extra, **overrides})
    config._attn_implementation = "eager"
    return model_cls(config).eval()


def batch(seed: int = 0, rows: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # right padding on the second row
    labels = input_ids.clone()
    labels[:, :4] = -100  # a "prompt"
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
