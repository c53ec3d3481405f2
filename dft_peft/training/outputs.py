"""What a finished run leaves in `output_dir`: the adapter, the tokenizer, the resolved config and
the metrics, written together and atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from dft_peft.config import Config
from dft_peft.training.checkpoint_folders import write_atomically
from dft_peft.training.divergence import check_finite_parameters

RESOLVED_CONFIG = "dft_peft_config.yml"


def save_outputs(
    trainer: Any, cfg: Config, data: Any, output_dir: Path, prior: Any = None, state_dict: Any = None
) -> None:
    """Adapter (PeftModel.from_pretrained loads it), tokenizer, resolved config and metrics.

    Never from weights that are no longer finite: a NaN adapter does not replace a good one."""
    check_finite_parameters(trainer.model, "the adapter")
    history = trainer.state.log_history
    summary = {
        "loss": cfg.loss,
        "loss_params": cfg.loss_kwargs(),
        "global_step": trainer.state.global_step,
        "data": data.report.to_dict(),
        "first_log": next((h for h in history if "loss" in h), None),
        "last_log": next((h for h in reversed(history) if "loss" in h), None),
        "prior_check": prior.metrics() if prior is not None else None,
    }

    def write(tmp: Path) -> None:
        trainer.model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        trainer.processing_class.save_pretrained(tmp)
        (tmp / RESOLVED_CONFIG).write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))
        (tmp / "train_metrics.json").write_text(json.dumps(summary, indent=2, default=str))
        (tmp / "log_history.json").write_text(json.dumps(history, indent=2, default=str))

    write_atomically(output_dir, write)
