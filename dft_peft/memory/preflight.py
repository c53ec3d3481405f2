"""The rehearsal, where users meet it: `dft-peft validate` prints it, `train` checks with it.

`validate config.yml --gpu-memory 16GB` prints, under the planner's estimate, the peak of the real
step rehearsed on the meta device and the longest `sequence_len` that fits, found by bisection over
rehearsals. `train` on a CUDA machine rehearses the configured step once before loading any
weights (Llama-3.1-8B on 2 CPU cores: ~4 s to build the meta model, ~4-8 s per step at 2k-8k
tokens, longer with many tiled-MLP shards) and stops with one line when it does not fit; where
the rehearsal cannot run (a model it does not build), the planner's check stands.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from dft_peft.errors import UserError
from dft_peft.memory import planner
from dft_peft.memory.rehearsal import Rehearser
from dft_peft.model.shape import model_config

logger = logging.getLogger("dft_peft")

GiB = 1 << 30
ATTENTION_NOTE = "attention rehearsed as FlashAttention-2 holds it (q, k, v, out, fp32 logsumexp)"


def config_of(cfg: Any, model_path: str | Path | None = None) -> dict[str, Any]:
    """The model's config.json mapping, from where the planner reads it."""
    if model_path is not None and not cfg.base_model_config:
        return model_config(str(model_path))
    return model_config(cfg.base_model, revision=cfg.model_revision, base_model_config=cfg.base_model_config,
                        gguf_file=getattr(cfg, "gguf_file", None))


def rehearsal_report(cfg: Any, gpu_memory: int | None = None, *, search: bool = True) -> str:
    """A few lines: the rehearsed peak in parts, host RAM for offloaded inputs, and the longest
    sequence_len that fits `gpu_memory` (default 16 GiB)."""
    budget = gpu_memory or (planner.cuda_memory() or (16 * GiB, ""))[0]
    start = time.perf_counter()
    rehearser = Rehearser(cfg, config_of(cfg))
    step = rehearser.step(cfg.sequence_len)
    parts = step.parts
    big = ", ".join(f"{name.split(' (')[0]} {size / GiB:.2f}" for name, size in parts.items() if size >= GiB // 10)
    lines = [
        f"# rehearsed: the real step on the meta device ({ATTENTION_NOTE}; CUDA context, fragmentation, cuBLAS "
        "workspace modelled, not yet calibrated on a GPU)",
        f"peak {step.total / GiB:.2f} GiB at sequence_len {step.sequence_len} ({big} GiB)"
        + (f"; host RAM (pinned) for offloaded inputs {step.host_pinned / GiB:.2f} GiB" if step.host_pinned else ""),
    ]
    if search:
        shape, setup = planner.plan_for(cfg)
        hint = planner.longest_sequence_len(shape, setup, budget)
        longest, runs = rehearser.longest(budget, hint=hint)
        lines.append(
            f"{budget / GiB:.0f} GiB: {'fits' if step.total <= budget else 'does NOT fit'}; longest sequence_len that fits "
            f"(rehearsed, multiples of 1024): {longest or 'none'} ({runs} rehearsals, {time.perf_counter() - start:.0f} s)"
        )
    return "\n".join(lines)


def check_fits(cfg: Any, model_path: str | Path | None = None) -> None:
    """`train`'s pre-flight on a CUDA machine: rehearse the configured step and stop with one line
    when its peak exceeds the card. Falls back to the planner's check when it cannot rehearse."""
    card = planner.cuda_memory()
    if card is None or not getattr(cfg, "memory_check", True):
        return
    try:
        rehearser = Rehearser(cfg, config_of(cfg, model_path))
        step = rehearser.step(cfg.sequence_len)
    except UserError:
        return planner.check_fits(cfg, model_path)
    except Exception as exc:  # a model the meta build does not cover: the formulas still apply
        logger.info("memory rehearsal not run (%s); using the planner's estimate", str(exc).splitlines()[0][:200])
        return planner.check_fits(cfg, model_path)
    logger.info("memory rehearsal: peak %.2f GiB of %.2f GiB (%.1f s)", step.total / GiB, card[0] / GiB,
                step.seconds + rehearser.build_seconds)
    if step.total <= card[0]:
        return
    raise UserError(
        f"rehearsed peak GPU memory {step.total / GiB:.2f} GiB exceeds the {card[0] / GiB:.2f} GiB of {card[1]}: lower "
        "sequence_len or micro_batch_size, or set activation_offloading: true and tiled_mlp: true; `dft-peft validate "
        "--gpu-memory` shows the longest sequence_len that fits; memory_check: false trains anyway."
    )
