"""Tiled MLP: each decoder layer's MLP runs over shards of the sequence, so its
[tokens, intermediate] activations exist for one shard at a time.

Why: the MLP's intermediates are the largest activations of a decoder layer. For Llama-3-8B
(intermediate 14336) at 32k tokens, gate, up and act(gate) * up are 3 x 32k x 14336 x 2 bytes =
2.8 GB in bf16, built at once in the forward pass and again when gradient checkpointing recomputes
the layer. The MLP acts on every token independently, so it can run on slices of the sequence:
the forward pass keeps only the MLP's input, and the backward pass recomputes and
back-propagates one slice at a time. The peak becomes one shard's intermediates; the price is one
more MLP forward per step (three instead of two under gradient checkpointing). The idea is
Arctic's TiledMLP (also in Axolotl and Unsloth); this is our own code, without DeepSpeed.

Exactness: the recomputation restores the CPU (and CUDA) random state saved before each shard,
so dropout inside the MLP (peft's LoRA dropout) draws the same masks, and the autocast state of
the forward pass. The input gradient is written slice by slice into one preallocated tensor;
parameter (LoRA) gradients accumulate into `.grad` as in PyTorch's reentrant checkpointing, so,
like it, this supports `loss.backward()` but not `torch.autograd.grad(loss, params)`.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dft_peft.errors import UserError
from dft_peft.memory.recompute_state import autocast_state, replay_autocast

DEFAULT_SHARD_BUDGET_BYTES = 256 * 2**20
"""Bytes allowed for one shard's MLP intermediates when `num_shards` is not given. 256 MiB keeps
the shard GEMMs large (Llama-3-8B in bf16: ~3.1k tokens a shard, so a 4k sequence runs in 2
shards, 32k in 11) while the MLP's share of the activation peak stays a fixed, small amount at any
sequence length. Arctic's rule (shards of `hidden_size` tokens) ignores the intermediate size
and makes many small shards on big models; a byte budget tracks what is actually held."""

INTERMEDIATES_PER_TOKEN = 3
"""gate, up and act(gate) * up: the [tokens, intermediate] tensors one MLP call holds at once."""

SUPPORTED_MLPS = {
    "LlamaMLP": "llama",
    "MistralMLP": "mistral",
    "Qwen2MLP": "qwen2",
    "Qwen3MLP": "qwen3",
    "GemmaMLP": "gemma",
    "Gemma2MLP": "gemma2",
    "Gemma3MLP": "gemma3",
    "Phi3MLP": "phi3",
}
"""MLP classes (by name, so no modeling file is imported) that map each token independently."""


def mlp_shard_count(
    seq_len: int,
    intermediate_size: int,
    dtype_bytes: int,
    num_shards: int | None = None,
    *,
    batch_size: int = 1,
    budget_bytes: int = DEFAULT_SHARD_BUDGET_BYTES,
) -> int:
    """How many sequence shards one MLP call uses; the planner calls this too, so both agree.

    With `num_shards` given, that, clamped to [1, seq_len]. Otherwise the fewest shards whose
    intermediates (INTERMEDIATES_PER_TOKEN x batch_size x shard_len x intermediate_size x
    dtype_bytes) fit `budget_bytes`, again at most one shard per position.
    """
    if seq_len <= 1:
        return 1
    if num_shards is None:
        need = INTERMEDIATES_PER_TOKEN * batch_size * seq_len * intermediate_size * dtype_bytes
        num_shards = math.ceil(need / max(1, budget_bytes))
    return max(1, min(int(num_shards), seq_len))


def _run_shards(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int, rng: list | None = None):
    """`run` over `n` shards of dim -2, written into one output tensor (no torch.cat copy).
    Appends each shard's (CPU, CUDA) random state to `rng` before it runs."""
    out_views: tuple[torch.Tensor, ...] = ()
    out = None
    for i, shard in enumerate(x.tensor_split(n, dim=-2)):
        if rng is not None:
            rng.append((torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None))
        y = run(shard)
        if out is None:
            out = y.new_empty(x.shape[:-1] + y.shape[-1:])
            out_views = out.tensor_split(n, dim=-2)
        out_views[i].copy_(y)
        del y
    return out


class TiledMLPFunction(torch.autograd.Function):
    """`run(x)` over `num_shards` sequence shards keeping only `x`; see the module docstring.

    `anchor` is a 0-element leaf that requires grad, passed when `x` does not, so that the
    backward pass still reaches this function and the MLP's LoRA weights get their gradients.
    """

    @staticmethod
    def forward(ctx, run: Callable, num_shards: int, x: torch.Tensor, anchor: torch.Tensor | None):
        device = x.device
        ctx.run, ctx.num_shards = run, num_shards
        ctx.autocast = autocast_state(device.type)
        ctx.rng = []
        ctx.save_for_backward(x)
        with torch.no_grad():
            return _run_shards(run, x, num_shards, ctx.rng)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[2]
        n, device = ctx.num_shards, x.device
        grad_x = torch.zeros_like(x) if needs_x else None
        grad_views = grad_x.tensor_split(n, dim=-2) if needs_x else [None] * n
        shards = zip(x.tensor_split(n, dim=-2), grad_out.tensor_split(n, dim=-2), ctx.rng, grad_views)
        for shard, grad, (cpu_rng, cuda_rng), grad_view in shards:
            shard = shard.detach().requires_grad_(needs_x)
            with torch.random.fork_rng(devices=[device] if cuda_rng is not None else []):
                torch.set_rng_state(cpu_rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state(cuda_rng, device)
                with torch.enable_grad(), replay_autocast(device.type, ctx.autocast):
                    out = ctx.run(shard)
            if out.requires_grad:
                torch.autograd.backward(out, grad)  # LoRA grads accumulate into .grad here
            if needs_x and shard.grad is not None:
                grad_view.copy_(shard.grad)
            del out, shard
        return None, None, grad_x, None


@dataclass(frozen=True)
class _Tiling:
    num_shards: int | None
    budget_bytes: int


def _intermediate_size(mlp: torch.nn.Module) -> int:
    """down_proj's input width (what the weights say, LoRA- or 4-bit-wrapped or not)."""
    width = getattr(getattr(mlp, "down_proj", None), "in_features", None)
    return int(width or getattr(mlp, "intermediate_size", None) or mlp.config.intermediate_size)


def _tiled_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward installed on each tiled MLP: shard count from this call's actual shape."""
    tiling: _Tiling = self._dft_tiling
    original = self._dft_untiled_forward
    if x.dim() < 2:
        return original(x)
    seq_len = x.shape[-2]
    batch = x.numel() // max(1, seq_len * x.shape[-1])
    n = mlp_shard_count(
        seq_len, _intermediate_size(self), x.element_size(), tiling.num_shards,
        batch_size=batch, budget_bytes=tiling.budget_bytes,
    )  # fmt: skip
    if n == 1:
        return original(x)
    if not torch.is_grad_enabled():  # eval, or the first pass of reentrant checkpointing
        return _run_shards(original, x, n)
    if not x.requires_grad and not any(p.requires_grad for p in self.parameters()):
        with torch.no_grad():
            return _run_shards(original, x, n)
    anchor = None if x.requires_grad else torch.empty(0, device=x.device, requires_grad=True)
    return TiledMLPFunction.apply(original, n, x, anchor)


def _model_type(model: torch.nn.Module) -> str:
    try:
        config = model.config
    except AttributeError:
        config = None
    return str(getattr(config, "model_type", None) or type(model).__name__)


def apply_tiled_mlp(
    model: torch.nn.Module,
    num_shards: int | None = None,
    shard_budget_bytes: int = DEFAULT_SHARD_BUDGET_BYTES,
) -> int:
    """Run every decoder layer's `mlp` through `TiledMLPFunction`; returns how many MLPs are tiled.

    Works on a bare transformers model or through a peft wrapper (the MLP modules are found by
    walking all modules). `num_shards=None` picks the count per call with `mlp_shard_count` from
    the real sequence length and `shard_budget_bytes`. Idempotent: calling again only updates the
    settings. The untiled forward stays at `mlp._dft_untiled_forward`.
    Raises UserError when a decoder layer's MLP is not a supported (token-wise) class.
    """
    if num_shards is not None and num_shards < 1:
        raise UserError(
            f"tiled_mlp_num_shards must be at least 1 (got {num_shards}); leave it unset to choose per batch"
        )
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("DecoderLayer")]
    mlps = [(n, m.mlp) for n, m in layers if isinstance(getattr(m, "mlp", None), torch.nn.Module)]
    supported = ", ".join(SUPPORTED_MLPS.values())
    model_type = _model_type(model)
    if not mlps:
        raise UserError(
            f"tiled_mlp: model type `{model_type}` has no decoder-layer MLP that can be tiled; "
            f"supported model types: {supported}. Set `tiled_mlp: false` for this model."
        )
    for name, mlp in mlps:
        if type(mlp).__name__ not in SUPPORTED_MLPS:
            raise UserError(
                f"tiled_mlp does not support model type `{model_type}` (`{name}.mlp` is "
                f"{type(mlp).__name__}); supported model types: {supported}. Set `tiled_mlp: false`."
            )
    for _, mlp in mlps:
        if "_dft_untiled_forward" not in vars(mlp):
            mlp._dft_untiled_forward = mlp.forward
            mlp.forward = types.MethodType(_tiled_forward, mlp)
        mlp._dft_tiling = _Tiling(num_shards, shard_budget_bytes)
    return len(mlps)


__all__ = ["DEFAULT_SHARD_BUDGET_BYTES", "TiledMLPFunction", "apply_tiled_mlp", "mlp_shard_count"]
