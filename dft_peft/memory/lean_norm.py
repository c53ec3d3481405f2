"""A memory-lean RMSNorm for the decoder: same forward, a backward that keeps no fp32 copies.

Hugging Face's RMSNorms compute in fp32: `x.to(float32)` is saved for backward (4 bytes per value,
1 GiB for Llama-3.1-8B at 64k tokens, per norm), and their backward makes several more fp32
`[N, H]` temporaries. Under gradient checkpointing the recomputed layer holds both its norms'
fp32 copies while its backward runs the norm's own: at 64k tokens that was the step's peak
(issue 20: 2 GiB saved + 4 GiB of fp32 temporaries in `layers.0`'s backward).

`LeanRMSNormFunction` computes the same output with the same ops, row chunk by row chunk (the
norm is per row, so chunking changes no value), saves only the input as it came (half precision:
the very tensor the residual keeps anyway) and the fp32 `rstd` `[..., 1]`, and its backward
recomputes the fp32 row chunk from them, so its fp32 temporaries are bounded by
`CHUNK_ELEMENTS`. The backward is the analytic gradient of the same expression (autograd's own
chain, in the same dtypes); it differs from autograd's by rounding only.

Two forms, as the installed transformers 5.x write them (`apply_lean_norm` swaps only instances of
exactly these classes, and only after `form_matches` has checked on a probe that the class still
computes what the form reproduces):
* "llama": `weight * (x.float() * rstd).to(x.dtype)` (Llama, Mistral, Qwen2, Qwen3, Phi-3);
* "gemma": `(x.float() * rstd * (1 + weight.float())).type_as(x)` (Gemma, Gemma 2, Gemma 3).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

CHUNK_ELEMENTS = 1 << 24  # rows per chunk: fp32 temporaries of at most 64 MiB each

NORM_CLASSES = {  # (module, class name) -> form
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"): "llama",
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"): "llama",
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"): "llama",
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm"): "llama",
    ("transformers.models.phi3.modeling_phi3", "Phi3RMSNorm"): "llama",
    ("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm"): "gemma",
    ("transformers.models.gemma2.modeling_gemma2", "Gemma2RMSNorm"): "gemma",
    ("transformers.models.gemma3.modeling_gemma3", "Gemma3RMSNorm"): "gemma",
}


def _rows(x: torch.Tensor) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, x.shape[-1]))


def _norm_chunk(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's forward on rows `x`: (output, fp32 rstd)."""
    xf = x.to(torch.float32)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    normed = xf * rstd
    if gemma:
        return (normed * (1.0 + weight.float())).type_as(x), rstd
    return weight * normed.to(x.dtype), rstd


class LeanRMSNormFunction(torch.autograd.Function):
    """RMSNorm saving only the input and the fp32 rstd; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
        hidden = x.shape[-1]
        flat = x.reshape(-1, hidden)
        out_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
        out = torch.empty(flat.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(flat.shape[0], 1, dtype=torch.float32, device=x.device)
        step = _rows(x)
        for start in range(0, flat.shape[0], step):
            out[start:start + step], rstd[start:start + step] = _norm_chunk(flat[start:start + step], weight, eps, gemma)
        ctx.save_for_backward(x, weight, rstd)
        ctx.gemma = gemma
        return out.view(*x.shape[:-1], hidden)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        gemma = ctx.gemma
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        hidden = x.shape[-1]
        flat, grads = x.reshape(-1, hidden), grad_out.reshape(-1, hidden)
        grad_x = torch.empty_like(flat) if need_x else None
        # weight-gradient accumulator: the dtype autograd forms that gradient in (fp32 at least)
        acc = torch.float32 if gemma else torch.promote_types(torch.float32, grad_out.dtype)
        grad_w = torch.zeros(hidden, dtype=acc, device=x.device) if need_w else None
        scale = (1.0 + weight.float()) if gemma else None
        step = _rows(x)
        for start in range(0, flat.shape[0], step):
            rows, g, r = flat[start:start + step], grads[start:start + step], rstd[start:start + step]
            xf = rows.to(torch.float32)
            normed = xf * r
            if gemma:  # out = (normed * (1 + w)).type_as(x)
                gf = g.to(torch.float32)
                if need_w:
                    grad_w += (gf * normed).to(acc).sum(0)
                grad_normed = gf * scale
            else:  # out = w * normed.to(x.dtype); autograd casts each grad back to its input's dtype
                if need_w:
                    grad_w += (g * normed.to(x.dtype)).to(acc).sum(0)
                grad_normed = (g * weight).to(x.dtype).to(torch.float32)
            if need_x:  # d/dx of x * rsqrt(mean(x^2) + eps)
                dot = (grad_normed * xf).sum(-1, keepdim=True)
                grad_x[start:start + step] = (grad_normed * r - xf * (r.pow(3) * dot / hidden)).to(x.dtype)
        grad_x = grad_x.view_as(x) if need_x else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_x, grad_w, None, None


def _eps(module: nn.Module) -> float:
    return module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps


def _lean_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return LeanRMSNormFunction.apply(hidden_states, self.weight, _eps(self), self._lean_form == "gemma")


_LEAN: dict[type, type] = {}  # HF norm class -> its lean subclass (or None when the probe disagreed)


def form_matches(cls: type, form: str) -> bool:
    """Whether `cls`'s own forward and backward equal `form`'s on a small float64 CPU probe
    (its own generator: the global RNG is left as found)."""
    def lean(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return LeanRMSNormFunction.apply(x, module.weight, _eps(module), form == "gemma")

    gen = torch.Generator().manual_seed(0)
    try:
        with torch.device("cpu"), torch.enable_grad():
            hf = cls(16, eps=1e-5).to(torch.float64)
            with torch.no_grad():
                hf.weight.normal_(generator=gen)
            x = torch.randn(5, 16, dtype=torch.float64, generator=gen).requires_grad_(True)
            g = torch.randn(5, 16, dtype=torch.float64, generator=gen)
            results = []
            for forward in (cls.forward, lean):
                out = forward(hf, x)
                results.append((out.detach(), *torch.autograd.grad(out, (x, hf.weight), g)))
    except (TypeError, RuntimeError, AttributeError):  # changed signature or forward: not ours
        return False
    return all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(*results))


def _lean_subclass(cls: type, form: str) -> type:
    name = f"Lean{cls.__name__}"
    sub = globals().get(name)
    if sub is None:
        sub = type(name, (cls,), {"forward": _lean_forward, "_lean_form": form, "__module__": __name__})
        globals()[name] = sub  # picklable by name
    return sub


def lean_class(cls: type) -> type | None:
    """The lean subclass for HF norm class `cls`, or None when `cls` is not one this reproduces."""
    if cls not in _LEAN:
        form = None
        for (module_name, class_name), candidate in NORM_CLASSES.items():
            try:
                if getattr(importlib.import_module(module_name), class_name) is cls:
                    form = candidate
            except ImportError:
                continue
        _LEAN[cls] = _lean_subclass(cls, form) if form and form_matches(cls, form) else None
    return _LEAN[cls]


def apply_lean_norm(model: nn.Module) -> int:
    """Make every supported RMSNorm of `model` lean (in place, parameters untouched); returns how
    many. Instances with their own `forward` (hooks of another library) are left alone."""
    count = 0
    for module in model.modules():
        if "forward" in vars(module) or getattr(module, "_lean_form", None):
            continue
        sub = lean_class(type(module)) if type(module).__name__.endswith("RMSNorm") else None
        if sub is not None:
            module.__class__ = sub
            count += 1
    return count
