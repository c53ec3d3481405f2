"""Will it fit, answered by running the real training step on the meta device.

The planner (planner.py) adds up formulas; this runs dft-peft's own code instead. The configured
model is built from its config on `torch.device("meta")` with 4-bit weights as bitsandbytes stores
them (meta_model.py), the adapter attached by the real `attach_adapter`, activation memory applied
by the real `apply_activation_memory` (checkpointing, offload, tiled MLP), the objective patched in
by the real `patch_model`, and one forward and backward of one micro-batch of `sequence_len`
tokens runs through the same code as a training step. Every op computes shapes and dtypes only;
PyTorch's `MemTracker` records what would be live, op by op, and the peak by category.

What meta cannot show is modelled, one named constant each, to be calibrated on a GPU:
* attention: a stand-in keeping exactly what FlashAttention-2 saves (meta_attention.py), since
  meta's SDPA would materialise [N, N] scores no GPU kernel builds;
* CUDA_CONTEXT_BYTES, ALLOCATOR_FRAGMENTATION, CUBLAS_WORKSPACE_BYTES below;
* optimizer states: counted from the trainable parameters as the optimizer allocates them
  (bitsandbytes' 8-bit AdamW: two uint8 moments + fp32 absmax per 256 values for tensors of at
  least 4096 values, fp32 moments below), live for the whole step from the second step on;
* gradients are present from the start of the pass, as in every micro-batch after the first of an
  accumulating step (with accumulation 1 this overstates by at most the gradients' size).

Every token counts as labelled (meta's `nonzero` assumes all elements non-zero): the worst case.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from dft_peft.losses import patch_model
from dft_peft.memory import planner
from dft_peft.memory.activations import apply_activation_memory
from dft_peft.memory.host_ledger import host_ledger
from dft_peft.memory.mem_tracking import TrainableOnlyMemTracker, category_bytes
from dft_peft.memory.meta_attention import use_flash_like_attention
from dft_peft.memory.meta_model import build_meta_model
from dft_peft.model.adapter import attach_adapter

GiB = 1 << 30
MiB = 1 << 20

CUDA_CONTEXT_BYTES = planner.CUDA_CONTEXT_BYTES  # driver context + library handles (outside torch)
ALLOCATOR_FRAGMENTATION = planner.ALLOCATOR_SLACK  # reserved / allocated - 1 of the caching allocator
CUBLAS_WORKSPACE_BYTES = 32 * MiB  # cuBLAS workspace torch allocates per handle (Hopper size; 8 MiB before)
BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes 8-bit optimizers keep 32-bit states for smaller tensors
BNB_8BIT_BLOCK = 256  # one fp32 absmax per 256 values per moment


@dataclass
class Rehearsal:
    """The rehearsed peak of one training step, in parts (bytes)."""

    sequence_len: int
    parts: dict[str, int] = field(default_factory=dict)
    host_pinned: int = 0  # peak host (pinned) memory of offloaded tensors
    layers_run: int = 0
    layers: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def table(self) -> str:
        width = max(len(k) for k in self.parts)
        lines = [f"  {name:<{width}}  {size / GiB:>7.2f} GiB" for name, size in self.parts.items()]
        lines.append(f"  {'total (peak)':<{width}}  {self.total / GiB:>7.2f} GiB")
        if self.host_pinned:
            lines.append(f"  host RAM (pinned) for offloaded inputs: {self.host_pinned / GiB:.2f} GiB")
        return "\n".join(lines)


def optimizer_state_bytes(optimizer: str, numels: list[int]) -> int:
    """Bytes of the optimizer's states for trainable tensors of `numels` values."""
    if "8bit" in optimizer:
        total = 0
        for n in numels:
            if n < BNB_8BIT_MIN_SIZE:
                total += 8 * n
            else:
                total += 2 * n + 2 * 4 * -(-n // BNB_8BIT_BLOCK)
        return total
    per = planner.OPTIMIZER_STATE_BYTES.get(optimizer, 8)
    return per * sum(numels)


def compute_dtype(cfg: Any) -> torch.dtype:
    """The training dtype a CUDA card would use: bf16 unless the config says fp16 or fp32."""
    if cfg.fp16 and cfg.bf16 is not True:
        return torch.float16
    if cfg.bf16 is False or (cfg.bf16 is None and not cfg.fp16):
        return torch.float32
    return torch.bfloat16


def prepared_model(cfg: Any, config: dict[str, Any], layers: int | None):
    """The model `train` would train, on meta: (model, bytes of quantization states)."""
    model, state_bytes = build_meta_model(cfg, config, compute_dtype(cfg), layers=layers)
    use_flash_like_attention(model)
    with warnings.catch_warnings():  # transformers 5.2x renames gradient checkpointing; not the user's concern here
        warnings.filterwarnings("ignore", message=".*checkpointing.*deprecated", category=FutureWarning)
        model = attach_adapter(model, cfg)
    apply_activation_memory(model, cfg)
    patch_model(model, loss=cfg.loss, **_meta_loss_kwargs(cfg))
    model.train()
    return model, state_bytes


def _meta_loss_kwargs(cfg: Any) -> dict[str, Any]:
    """The objective's parameters without token ids (they need a tokenizer; memory does not)."""
    return {k: v for k, v in cfg.loss_kwargs().items() if not k.endswith("token_ids")} if hasattr(cfg, "loss_kwargs") else {}


def autocast_like_adapters(trainable: list[torch.nn.Parameter], dtype: torch.dtype) -> int:
    """Hold the fp32 adapter weights in the compute dtype for the rehearsal; returns the bytes
    that puts back on the books (fp32 weights and gradients are what a GPU run holds).

    On a GPU the Trainer runs the step under `torch.autocast(bf16)`: peft's LoRA then multiplies
    the layer input as it is (bf16, the same storage the base layer saved) by a bf16 cast of its
    fp32 weights. Autocast has no meta device, and without it peft casts every LoRA input to fp32
    (an fp32 copy per adapted linear, 4.7 GiB at 32k tokens for Llama-3.1-8B) that no GPU run
    makes. Weights of the compute dtype reproduce autocast's activations exactly; the weights'
    and gradients' own bytes are corrected by the returned amount (2 bytes per value each)."""
    if dtype == torch.float32:
        return 0
    extra = 0
    for p in trainable:
        if p.dtype == torch.float32:
            extra += p.numel() * (4 - torch.tensor([], dtype=dtype).element_size())
            p.data = p.data.to(dtype)
    return extra


class Rehearser:
    """The configured model, built on meta once, rehearsed at as many sequence lengths as asked."""

    def __init__(self, cfg: Any, config: dict[str, Any], *, layers: int | None = None):
        start = time.perf_counter()
        self.cfg, self.layers = cfg, int(config.get("num_hidden_layers", 0))
        self.model, self.state_bytes = prepared_model(cfg, config, layers)
        self.layers_run = layers or self.layers
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast_extra = autocast_like_adapters(self.trainable, compute_dtype(cfg))
        for p in self.trainable:  # gradients held from the start, as in an accumulating step
            p.grad = torch.empty_like(p)
        self.build_seconds = time.perf_counter() - start

    def step(self, sequence_len: int) -> Rehearsal:
        """One forward and backward of one micro-batch of `sequence_len` tokens."""
        import torch.fx.experimental._config as fx_config

        start = time.perf_counter()
        ids = torch.zeros(self.cfg.micro_batch_size, sequence_len, dtype=torch.long, device="meta")
        tracker = TrainableOnlyMemTracker()
        tracker.track_external(self.model)
        previous = fx_config.meta_nonzero_assume_all_nonzero
        fx_config.meta_nonzero_assume_all_nonzero = True  # every token labelled: the worst case
        try:
            with host_ledger() as ledger, tracker:
                loss = self.model(input_ids=ids, labels=ids).loss
                loss.backward()
                del loss
        finally:
            fx_config.meta_nonzero_assume_all_nonzero = previous
        peak = category_bytes(tracker)
        parts = {
            "weights (4-bit + quant states, embeddings, head, norms)":
                peak.pop("parameters") + peak.pop("buffers") + self.state_bytes + self.autocast_extra,
            "adapter gradients": peak.pop("gradients") + self.autocast_extra,
            "optimizer states": optimizer_state_bytes(self.cfg.optimizer, [p.numel() for p in self.trainable]),
            "activations (saved for backward)": peak.pop("activations"),
            "temporaries": sum(peak.values()),
            "cuBLAS workspace (modelled)": CUBLAS_WORKSPACE_BYTES,
        }
        parts["allocator fragmentation (modelled)"] = int(ALLOCATOR_FRAGMENTATION * sum(parts.values()))
        parts["CUDA context (modelled)"] = CUDA_CONTEXT_BYTES
        return Rehearsal(sequence_len, parts, ledger.peak, self.layers_run, self.layers, time.perf_counter() - start)

    def longest(self, budget: int, *, multiple: int = 1024, hint: int | None = None) -> tuple[int | None, int]:
        """The longest `sequence_len` (a multiple of `multiple`) whose rehearsed peak fits `budget`
        bytes, by bisection over rehearsals; `hint` (e.g. the planner's answer) seeds the bracket.
        Returns (length or None, rehearsals run)."""
        runs = 0

        def fits(units: int) -> bool:
            nonlocal runs
            runs += 1
            return self.step(units * multiple).total <= budget

        if not fits(1):
            return None, runs
        lo = 1
        hi = max(2, (hint or 8 * multiple) // multiple)
        while fits(hi):
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo * multiple, runs


def rehearse(cfg: Any, config: dict[str, Any], sequence_len: int | None = None, *, layers: int | None = None) -> Rehearsal:
    """One training step of `cfg` on meta at `sequence_len` (default: the config's) tokens;
    `layers` runs only that many decoder layers (tests use small models instead)."""
    rehearser = Rehearser(cfg, config, layers=layers)
    result = rehearser.step(sequence_len or cfg.sequence_len)
    result.seconds += rehearser.build_seconds
    return result
