"""A test-only Axolotl plugin that records what the first optimizer step saw.

Listed after the DFT plugin in the test YAML (with tests/integration on PYTHONPATH), it
writes into `output_dir`:

- `first_step.pt`: for each micro-batch of the first optimizer step, the inputs the trainer
  passed to the model, `num_items_in_batch`, and the loss `compute_loss` returned, plus
  whether the model's output carried full logits;
- `logs.jsonl`: every log line the trainer emitted (the dict the callbacks receive, after
  dft-peft's metrics callback added `ce` / `p_mean`).

The test then recomputes the first step's loss independently, from those inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback


class _LogRecorder(TrainerCallback):
    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}, default=float) + "\n")


class FirstStepRecorder(BasePlugin):
    def post_trainer_create(self, cfg, trainer):
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        steps = int(cfg.gradient_accumulation_steps or 1)
        micro: list[dict] = []
        original = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            if len(micro) >= steps or not model.training:
                return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            loss, outputs = original(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            micro.append(
                {
                    "inputs": {k: v.detach().cpu() for k, v in inputs.items() if torch.is_tensor(v)},
                    "num_items_in_batch": None
                    if num_items_in_batch is None
                    else int(num_items_in_batch),
                    "loss": float(loss.detach().double()),
                    "has_logits": getattr(outputs, "logits", None) is not None,
                    "model_accepts_loss_kwargs": bool(getattr(trainer, "model_accepts_loss_kwargs", False)),
                }
            )
            if len(micro) == steps:
                torch.save(micro, out / "first_step.pt")
            return (loss, outputs) if return_outputs else loss

        trainer.compute_loss = compute_loss

    def add_callbacks_post_trainer(self, cfg, trainer):
        path = Path(cfg.output_dir) / "logs.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        return [_LogRecorder(path)]
