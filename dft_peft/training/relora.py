"""`relora: true`: ReLoRA (https://arxiv.org/abs/2307.05695) as Axolotl 0.19 runs it
(src/axolotl/monkeypatch/relora.py, written anew here).

Every `jagged_restart_steps` optimizer steps, before the next step: each LoRA layer's update
scale * B @ A is added into its base weight (a 4-bit or 8-bit base is dequantized, added to and
quantized again), LoRA starts over (A random, B zero, so the model's function is unchanged), and
Adam's moments of the LoRA weights are pruned (`relora_prune_method`, `relora_prune_ratio`) so
the next adapter does not inherit the last one's momentum. The learning rate dips around each
restart through `dft_peft/training/jagged_schedule.py`.

What a run leaves: the adapter of the last cycle, and `relora_base_weights.safetensors` beside it
(and in each checkpoint): the merged weights of every LoRA-wrapped module, under the base model's
names, which replace the base model's before the adapter is attached. A resumed run loads them,
and so do generate, eval, merge and GGUF export (`dft_peft.model.loading.load_for_inference`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from dft_peft.config import Config
from dft_peft.errors import UserError
from dft_peft.model.relora_weights import (
    BASE_WEIGHTS,
    base_weights,
    dequantized_weight,
    load_base_weights,
    lora_layers,
    set_base_weight,
)
from dft_peft.training.checkpoint_folders import write_atomically
from dft_peft.training.distributed import is_main_process

logger = logging.getLogger("dft_peft")

# Axolotl's defaults for `relora_prune_ratio`: a near-full reset for `reset`, else 0.9.
FULL_RESET_RATIO = 0.999
DEFAULT_PRUNE_RATIO = 0.9
# Adam's moments: torch's names, and bitsandbytes' 8-bit optimizers'.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "state1", "state2")


# ----------------------------------------------------------------------------- merge


def _adapter(layer: Any) -> str:
    active = layer.active_adapter
    if isinstance(active, list):
        if len(active) != 1:
            raise UserError(f"relora: a LoRA layer has {len(active)} active adapters; ReLoRA restarts exactly one.")
        active = active[0]
    return active


@torch.no_grad()
def merge_and_restart(model: Any, *, cpu_offload: bool = False, seed: int = 0) -> int:
    """Add every LoRA layer's scale * B @ A into its base weight, then re-initialise the layer's
    LoRA (peft's init: A random, B zero). Returns the number of layers merged.

    The re-initialisation draws from a generator seeded with `seed`, so every process of a
    distributed run draws the same A, and the training's own random stream is left untouched."""
    layers = lora_layers(model)
    devices = sorted({layer.get_base_layer().weight.device for layer in layers.values()} - {torch.device("cpu")}, key=str)
    with torch.random.fork_rng(devices=[d.index or 0 for d in devices if d.type == "cuda"]):
        torch.manual_seed(seed)
        for layer in layers.values():
            adapter = _adapter(layer)
            base_layer = layer.get_base_layer()
            weight = base_layer.weight
            device = torch.device("cpu") if cpu_offload else weight.device
            delta = layer.get_delta_weight(adapter).detach().to(device, torch.float32)
            merged = dequantized_weight(weight, device).to(torch.float32) + delta
            set_base_weight(base_layer, weight, merged)
            layer.reset_lora_parameters(adapter, True)
    return len(layers)


# ----------------------------------------------------------------------------- optimizer state


def prune_mask(values: torch.Tensor, method: str, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """True where a moment is kept. `magnitude`: those above the `ratio` quantile of |value|
    (Axolotl's torch.quantile, computed with kthvalue, which has no size limit); `random` and
    `reset`: each kept with probability 1 - ratio."""
    flat = values.detach().flatten().to(torch.float32)
    if method == "magnitude":
        magnitude = flat.abs()
        k = int(ratio * (flat.numel() - 1)) + 1  # the lower neighbour of the linear-interpolated quantile
        threshold = magnitude.kthvalue(k).values
        return (magnitude > threshold).view(values.shape)
    draws = torch.rand(flat.shape, generator=generator, device="cpu").to(values.device)
    return (draws > ratio).view(values.shape)


def _quantized_moments(state: dict, key: str) -> torch.Tensor | None:
    """bitsandbytes' 8-bit moments (`state1` codes into `qmap1`, scaled by block `absmax1`), as floats."""
    index = key[-1]
    qmap, absmax = state.get(f"qmap{index}"), state.get(f"absmax{index}")
    codes = state[key]
    if qmap is None:
        return None
    values = qmap[codes.long()].to(torch.float32)
    if absmax is not None:
        block = -(-codes.numel() // absmax.numel())
        values = values.flatten() * absmax.float().repeat_interleave(block)[: codes.numel()]
    return values.view(codes.shape)


@torch.no_grad()
def prune_optimizer_state(optimizer: Any, params: list[torch.nn.Parameter], *, method: str, ratio: float, seed: int = 0) -> tuple[int, int]:
    """Zero Adam's moments of `params` as Axolotl's `reset_optimizer` does. Returns (zeroed, total)."""
    generator = torch.Generator().manual_seed(seed)
    state_of = getattr(optimizer, "state", {})
    zeroed = total = 0
    for param in params:
        state = state_of.get(param) or {}
        for key in MOMENT_KEYS:
            value = state.get(key)
            if not torch.is_tensor(value) or value.numel() == 0:
                continue
            if value.is_floating_point():
                value.mul_(prune_mask(value, method, ratio, generator).to(value.dtype))
                zeroed += int((value == 0).sum())
            else:  # 8-bit codes: choose by the moments' real magnitude, write the code of 0.0
                moments = _quantized_moments(state, key)
                if moments is None:
                    continue
                qmap = state[f"qmap{key[-1]}"]
                value[~prune_mask(moments, method, ratio, generator)] = int(qmap.abs().argmin())
                zeroed += int((_quantized_moments(state, key) == 0).sum())
            total += value.numel()
    logger.info("relora: %d of %d optimizer moments zeroed (%.1f%%)", zeroed, total, 100 * zeroed / max(total, 1))
    return zeroed, total


# ----------------------------------------------------------------------------- callback


class ReLoRACallback(TrainerCallback):
    """Merge, restart and prune every `jagged_restart_steps` steps; keep the merged base weights
    with every checkpoint and the final adapter; log `num_lora_restarts`."""

    def __init__(self, cfg: Config, resume: str | None = None):
        self.every = cfg.jagged_restart_steps
        self.cpu_offload = bool(cfg.relora_cpu_offload)
        self.method = cfg.relora_prune_method or "magnitude"
        default = FULL_RESET_RATIO if self.method == "reset" else DEFAULT_PRUNE_RATIO
        self.ratio = cfg.relora_prune_ratio if cfg.relora_prune_ratio is not None else default
        self.seed = cfg.seed
        self.resume = resume
        self.restarts = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.resume:
            saved = Path(self.resume) / BASE_WEIGHTS
            if not saved.is_file():
                raise UserError(f"relora: {self.resume} has no {BASE_WEIGHTS} (the merged base weights); resume from a checkpoint of this ReLoRA run.")
            load_base_weights(model, saved)
            self.restarts = max(0, (state.global_step - 1) // self.every)  # the restart at a saved step comes after its save
            logger.info("relora: merged base weights loaded from %s", saved)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == 0 or state.global_step % self.every:
            return
        seed = self.seed + state.global_step
        layers = merge_and_restart(model, cpu_offload=self.cpu_offload, seed=seed)
        params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        prune_optimizer_state(_inner_optimizer(optimizer), params, method=self.method, ratio=self.ratio, seed=seed)
        self.restarts += 1
        logger.info("relora: restart %d at step %d (%d LoRA layers merged)", self.restarts, state.global_step, layers)

    def on_save(self, args, state, control, model=None, **kwargs):
        self.save_base_weights(model, Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs["num_lora_restarts"] = self.restarts

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.save_base_weights(model, Path(args.output_dir), create=True)

    @staticmethod
    def save_base_weights(model: Any, folder: Path, create: bool = False) -> None:
        from safetensors.torch import save_file

        weights = base_weights(model)
        if is_main_process() and (create or folder.is_dir()):
            write_atomically(folder, lambda tmp: save_file(weights, str(tmp / BASE_WEIGHTS)))


def _inner_optimizer(optimizer: Any) -> Any:
    """accelerate's AcceleratedOptimizer wraps the torch optimizer; its `state` is the inner one's."""
    return getattr(optimizer, "optimizer", optimizer)


def install_relora(trainer: Any, cfg: Config, resume: str | None = None) -> ReLoRACallback | None:
    if not cfg.relora:
        return None
    callback = ReLoRACallback(cfg, resume)
    trainer.add_callback(callback)
    return callback
