"""Attention as FlashAttention-2 holds it in memory, for the meta-device rehearsal.

On meta, `scaled_dot_product_attention` takes its math path and materialises the `[N, N]` scores
(6 GiB per layer at 4k tokens, 97 GiB at 16k), which no GPU run with flash-attention or efficient
SDPA does. While rehearsing, attention goes through this stand-in instead. Its memory is exactly
FlashAttention-2's (flash_attn 2.x `_flash_attn_forward` / `_flash_attn_backward`):

* forward: the output `[B, N, heads, D]` in the compute dtype; saved for backward: q, k, v (the
  tensors passed in, no copy), the output and the fp32 log-sum-exp `[B, heads, N]`;
* backward: dq, dk, dv in the compute dtype, plus its two fp32 temporaries, the dq accumulator
  `[B, N, heads, D]` and softmax_d `[B, heads, N]` (N rounded up to 128 as the kernel does).

The values are not attention (meta tensors hold none); only shapes, dtypes and lifetimes are.
GQA is native (k/v keep their kv heads), as with flash-attn; no mask is built (causal, unpadded).
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "dft_peft_rehearsal"  # the attention implementation name registered with transformers
ROUND = 128  # flash-attn rounds the sequence length of its fp32 backward buffers to 128


class _FlashLike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, heads, n, d = q.shape
        out = q.new_empty(b, n, heads, d)  # flash-attn returns [B, N, heads, D]
        lse = q.new_empty(b, heads, n, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        b, heads, n, d = q.shape
        rounded = -(-n // ROUND) * ROUND
        dq_accum = q.new_empty(b, rounded, heads, d, dtype=torch.float32)
        softmax_d = q.new_empty(b, heads, rounded, dtype=torch.float32)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del dq_accum, softmax_d
        return dq, dk, dv


def flash_like_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Any, **_kwargs: Any) -> tuple[torch.Tensor, None]:
    """A transformers attention function (`ALL_ATTENTION_FUNCTIONS` signature): q/k/v arrive as
    `[B, heads, N, D]`, the output leaves as `[B, N, heads, D]`, like flash_attention_forward."""
    return _FlashLike.apply(query, key, value), None


def use_flash_like_attention(model: torch.nn.Module) -> None:
    """Route `model`'s attention through the stand-in (registered once, under NAME: a name with "flash" in it would make transformers look for a flash-attn kernel)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, flash_like_attention)
    model.set_attn_implementation(NAME)
