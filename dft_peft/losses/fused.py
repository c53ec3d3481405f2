"""The chunked linear-head loss shared by every objective.

The naive path builds `[tokens, vocab]` logits (1 GB in bf16 for Llama-3-8B at 4096 tokens),
upcasts them to fp32 and keeps several such tensors alive for the backward pass. Here only rows
whose label is valid are projected, a chunk of rows at a time, in fp32; the gradient of each
chunk with respect to its logits is taken immediately (by autograd on the small objective
function), pushed through the head into the hidden states (and head weight, when it trains),
and the chunk's logits are dropped. The backward pass then only scales the stored gradients.
That costs the same three matmuls as the naive path and keeps one chunk of logits alive.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dft_peft.losses.registry import LossSpec, get_loss, validate_loss_params
from dft_peft.losses.stats import TokenStats

# Rows per chunk: at least 16M logit elements (64 MB fp32; 128 rows of Llama-3's 128k vocabulary),
# or 1/8 of the batch's valid rows when that is more. Each chunk streams the whole head weight
# twice (logits, then the hidden-state gradient), so chunks must be large enough for the matmuls
# to stay compute-bound (on a CPU, 64-row chunks made the loss 1.5x slower than the naive path);
# the fast path keeps one [rows, vocab] buffer per chunk, so the peak stays under a tenth of the
# naive path's, which holds about three [tokens, vocab] fp32 tensors.
#
# On CUDA a chunk is also capped at 64M logits (256 MB fp32, 512 rows of Llama-3's vocabulary):
# a 512-row bf16 matmul against the head is already compute-bound on current GPUs, and without
# the cap 1/8 of a 32k-token sequence would be 4,096 rows, two 2 GB buffers.
DEFAULT_CHUNK_ELEMENTS = 1 << 24
CHUNKS_PER_BATCH = 8
MAX_CHUNK_ELEMENTS_CUDA = 1 << 26


def chunk_rows(vocab: int, rows: int, device_type: str = "cpu") -> int:
    """Rows per chunk for `rows` valid rows of a `vocab`-wide head (see the constants above)."""
    floor = max(8, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1) // 8 * 8)
    share = (-(-rows // CHUNKS_PER_BATCH) + 7) // 8 * 8  # ceil(rows / 8), a multiple of 8
    chosen = max(floor, share)
    if device_type == "cuda":
        chosen = min(chosen, max(floor, MAX_CHUNK_ELEMENTS_CUDA // max(vocab, 1) // 8 * 8))
    return chosen


@dataclass(frozen=True)
class LogitTransform:
    """What a model config does to raw head outputs: Cohere's `logit_scale` (multiply), Granite's
    `logits_scaling` (divide, pass 1/x here) and Gemma-2/3's `final_logit_softcapping`."""

    scale: float | None = None
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return (self.scale is None or self.scale == 1.0) and not self.softcap

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale is not None and self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @classmethod
    def from_config(cls, config: Any) -> "LogitTransform":
        scale = getattr(config, "logit_scale", None)
        divisor = getattr(config, "logits_scaling", None)
        if divisor:
            scale = (scale or 1.0) / divisor
        return cls(scale=scale, softcap=getattr(config, "final_logit_softcapping", None))


@dataclass(frozen=True)
class Plan:
    """Everything about one loss call that is not a tensor."""

    spec: LossSpec
    params: dict[str, Any]
    transform: LogitTransform
    chunk_size: int | None
    stats: TokenStats | None
    fast: bool = True  # use `of_logp` where the objective has one (tests turn it off to compare)

    def rows_per_chunk(self, vocab: int, rows: int, device_type: str = "cpu") -> int:
        return self.chunk_size or chunk_rows(vocab, rows, device_type)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (the reference tests use it)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_loss_and_grad(
    raw_logits: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None,
    plan: Plan,
    want_grad: bool,
    extra: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted loss sum of one chunk and, if wanted, its gradient w.r.t. the raw logits.

    `raw_logits` is a fresh buffer owned by the caller; the fast path overwrites it with the
    gradient.
    """
    if plan.spec.of_logp is not None and plan.fast and plan.transform.is_identity and not extra:
        return _logp_objective_chunk(raw_logits, targets, token_weights, plan, want_grad)
    grad_ctx = torch.enable_grad() if want_grad else torch.no_grad()
    with grad_ctx:
        if want_grad:
            raw_logits.requires_grad_(True)
        logits = plan.transform(raw_logits)
        per_token = plan.spec.fn(logits, targets, **plan.params, **extra)
        weighted = per_token if token_weights is None else per_token * token_weights
        total = weighted.sum()
        grad = torch.autograd.grad(total, raw_logits)[0] if want_grad else None
    if plan.stats is not None:
        plan.stats.add(logits.detach(), targets, weighted.detach())
    return total.detach(), grad


def _logp_objective_chunk(
    logits: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None,
    plan: Plan,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Objectives of log p(target) only: d loss / d logits = g * (onehot - softmax), g = d loss / d logp.

    Autograd runs on the [n] vector; softmax and then the [n, V] gradient are formed in place in
    the logits buffer (subtract the row max, exp, normalise, scale, add g at the targets), so a
    chunk costs one [n, V] buffer.
    """
    target_logit = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    stats = plan.stats
    correct = logits.argmax(dim=-1).eq(targets) if stats is not None else None
    # Softmax in place: the logits buffer becomes the probabilities, with no [n, V] temporary.
    row_max = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(row_max).exp_()
    row_sum = probs.sum(dim=-1, keepdim=True)
    probs.div_(row_sum)
    logp = target_logit - (row_max + row_sum.log()).squeeze(1)
    with torch.enable_grad():
        logp_leaf = logp.detach().requires_grad_(want_grad)
        if plan.spec.of_logp_takes_targets:
            per_token = plan.spec.of_logp(logp_leaf, **plan.params, targets=targets)
        else:
            per_token = plan.spec.of_logp(logp_leaf, **plan.params)
        weighted = per_token if token_weights is None else per_token * token_weights
        total = weighted.sum()
        g = torch.autograd.grad(total, logp_leaf)[0] if want_grad else None
    if stats is not None:
        stats.add_values(weighted, logp, correct, torch.special.entr(probs).sum(dim=-1))
    if g is None:
        return total.detach(), None
    grad = probs.mul_(-g.unsqueeze(1))
    grad.scatter_add_(1, targets.unsqueeze(1), g.unsqueeze(1))
    return total.detach(), grad


class HeadProjector:
    """h @ W.T (+ b) in fp32 without an fp32 copy of a bf16/fp16 head where the device allows.

    CUDA's `torch.mm(..., out_dtype=float32)` accumulates and returns fp32 from bf16 operands.
    Elsewhere a low-precision head is upcast once per call (CPU training runs in fp32 anyway).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, cdtype: torch.dtype):
        self.weight = weight
        self.cdtype = cdtype
        self.mixed = weight.dtype != cdtype
        # meta: the memory rehearsal (dft_peft/memory/rehearsal.py) stands in for a CUDA run.
        self.out_dtype_mm = self.mixed and (weight.is_cuda or weight.is_meta)
        self.weight_c = weight if not self.mixed or self.out_dtype_mm else weight.to(cdtype)
        self.bias_c = None if bias is None else bias.to(cdtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.out_dtype_mm:
            try:
                out = torch.mm(h.to(self.weight.dtype), self.weight.t(), out_dtype=self.cdtype)
            except (TypeError, RuntimeError):  # older torch: fall back to one fp32 copy
                self.out_dtype_mm = False
                self.weight_c = self.weight.to(self.cdtype)
                return self.logits(h)
        else:
            out = h.to(self.cdtype) @ self.weight_c.t()
        return out if self.bias_c is None else out + self.bias_c

    def input_grad(self, grad_logits: torch.Tensor) -> torch.Tensor:
        if self.out_dtype_mm:
            return torch.mm(grad_logits.to(self.weight.dtype), self.weight, out_dtype=self.cdtype)
        return grad_logits @ self.weight_c


class _FusedLinearLossFn(torch.autograd.Function):
    """Sum of per-token losses over `hidden` rows; gradients computed during the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, ref_hidden, plan: Plan):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        want_grad = need_h or need_w or need_b
        cdtype = compute_dtype(hidden.dtype)
        proj = HeadProjector(weight, bias, cdtype)
        grad_h = torch.empty(hidden.shape, dtype=cdtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=cdtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=cdtype, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=cdtype, device=hidden.device)
        # On meta (the memory rehearsal of a CUDA run) chunk as on CUDA; autocast has no meta
        # device to switch off (torch.autocast("meta") raises), and nothing to switch off there.
        device_type = "cuda" if hidden.is_meta else hidden.device.type
        rows = plan.rows_per_chunk(weight.shape[0], hidden.shape[0], device_type)
        autocast_off = contextlib.nullcontext() if hidden.is_meta else torch.autocast(device_type, enabled=False)
        with autocast_off:
            for start in range(0, hidden.shape[0], rows):
                stop = start + rows
                h = hidden[start:stop]
                extra = {}
                if ref_hidden is not None:
                    with torch.no_grad():
                        extra["ref_logits"] = plan.transform(proj.logits(ref_hidden[start:stop]))
                w = None if token_weights is None else token_weights[start:stop].to(cdtype)
                loss_sum, g = chunk_loss_and_grad(
                    proj.logits(h), targets[start:stop], w, plan, want_grad, extra
                )
                total += loss_sum
                extra.clear()
                if g is None:
                    continue
                if need_h:
                    grad_h[start:stop] = proj.input_grad(g)
                if need_w:
                    grad_w.addmm_(g.t(), h.to(cdtype))
                if need_b:
                    grad_b += g.sum(0)
                del g  # free this chunk's [rows, vocab] buffer before the next one is allocated
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        return (
            _scaled(grad_h, grad_output, h_dtype),
            _scaled(grad_w, grad_output, w_dtype),
            _scaled(grad_b, grad_output, b_dtype),
            None,
            None,
            None,
            None,
        )


def _scaled(grad: torch.Tensor | None, grad_output: torch.Tensor, dtype: torch.dtype | None):
    """grad * grad_output in place (each stored gradient is used once): no second copy of a
    [vocab, hidden] head gradient, which for Llama-3-8B is 2 GB in fp32."""
    if grad is None:
        return None
    grad.mul_(grad_output.to(grad.dtype))
    return grad if grad.dtype == dtype else grad.to(dtype)


def shifted_valid_rows(
    labels: torch.Tensor, ignore_index: int, shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices of positions with a valid target, and those targets.

    Shifting is done on the labels (pad one ignore_index at the end), never on the hidden
    states, so `hidden.reshape(-1, H)` stays a view and nothing of size [tokens, H] is copied.
    """
    if shift:
        labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    flat = labels.reshape(-1)
    rows = (flat != ignore_index).nonzero().squeeze(1)
    return rows, flat.index_select(0, rows)


def _normalise(total: torch.Tensor, count: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
    """Divide by `num_items_in_batch` (exact gradient accumulation) or by this batch's count."""
    denom = count if num_items_in_batch is None else num_items_in_batch
    if not torch.is_tensor(denom):
        denom = torch.tensor(denom)
    denom = denom.to(device=total.device, dtype=total.dtype).clamp(min=1)
    return total / denom


def _aligned(t: torch.Tensor | None, labels: torch.Tensor, shift: bool) -> torch.Tensor | None:
    """Per-position tensor (same shape as labels) shifted like the labels and flattened."""
    if t is None:
        return None
    if shift:
        t = F.pad(t[..., 1:], (0, 1))
    return t.reshape(-1)


def fused_loss_from_plan(
    plan: Plan,
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: Any = None,
    ignore_index: int = -100,
    shift: bool = True,
    bias: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    ref_hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """`fused_linear_loss` with the objective already resolved and validated (the hot path)."""
    if "ref_logits" in plan.spec.needs and ref_hidden_states is None:
        raise ValueError(f"loss `{plan.spec.name}` needs `ref_hidden_states` (the base model's)")
    labels = labels.to(hidden_states.device)
    rows, targets = shifted_valid_rows(labels, ignore_index, shift)
    hidden_dim = hidden_states.shape[-1]
    hidden = hidden_states.reshape(-1, hidden_dim).index_select(0, rows)
    weights = _aligned(token_weights, labels, shift)
    if weights is not None:
        weights = weights.to(hidden_states.device).index_select(0, rows)
    ref = None
    if ref_hidden_states is not None:
        ref = ref_hidden_states.detach().reshape(-1, hidden_dim).index_select(0, rows)
    total = _FusedLinearLossFn.apply(hidden, lm_head_weight, bias, targets, weights, ref, plan)
    return _normalise(total, torch.tensor(rows.numel()), num_items_in_batch)


def make_plan(
    loss: str,
    loss_kwargs: dict[str, Any],
    *,
    transform: LogitTransform | None = None,
    chunk_size: int | None = None,
    stats: TokenStats | None = None,
) -> Plan:
    """Resolve and validate an objective once, so the per-batch path does no validation."""
    spec = get_loss(loss)
    params = validate_loss_params(loss, loss_kwargs)
    return Plan(spec, params, transform or LogitTransform(), chunk_size, stats)


def fused_linear_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    loss: str = "dft",
    *,
    num_items_in_batch: Any = None,
    ignore_index: int = -100,
    shift: bool = True,
    chunk_size: int | None = None,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    logit_softcap: float | None = None,
    token_weights: torch.Tensor | None = None,
    ref_hidden_states: torch.Tensor | None = None,
    stats: TokenStats | None = None,
    **loss_kwargs: Any,
) -> torch.Tensor:
    """The objective `loss` over an LM head, without ever building full logits.

    Args:
        hidden_states: `[..., T, H]` final hidden states (any float dtype; fp32 accumulation).
        lm_head_weight: `[V, H]`; gets a gradient when it requires one.
        labels: `[..., T]` Hugging Face labels, aligned with input_ids (`shift=True`) or already
            shifted (`shift=False`); `ignore_index` marks positions without a target.
        num_items_in_batch: divisor for the summed loss (the transformers convention that makes
            gradient accumulation exact); defaults to this batch's number of valid tokens.
        logit_scale / logit_softcap: what the model config applies to its logits.
        token_weights: optional per-position weights aligned with `labels` (rewards, scores).
        ref_hidden_states: the frozen reference model's hidden states, for objectives that
            anchor to it (projected chunk by chunk through the same head, without gradients).
        stats: a `TokenStats` that receives CE, mean target probability, accuracy and entropy.
        **loss_kwargs: the objective's parameters, e.g. `dft_alpha=0.5`.

    Returns a 0-dim fp32 tensor; 0 with zero gradients when no position has a target.
    """
    plan = make_plan(
        loss,
        loss_kwargs,
        transform=LogitTransform(scale=logit_scale, softcap=logit_softcap),
        chunk_size=chunk_size,
        stats=stats,
    )
    return fused_loss_from_plan(
        plan,
        hidden_states,
        lm_head_weight,
        labels,
        num_items_in_batch=num_items_in_batch,
        ignore_index=ignore_index,
        shift=shift,
        bias=bias,
        token_weights=token_weights,
        ref_hidden_states=ref_hidden_states,
    )
