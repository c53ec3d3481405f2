"""Shared builders for the `dft-peft train` tests: a tiny local model folder, Alpaca rows and
a training config. No hub, no download; the model folder is built once per test session.

The tokenizer is the byte-level BPE of tests/integration/tiny_assets.py trained with a larger
vocabulary (so an Alpaca prompt is ~90 tokens, not ~200), next to a random 2-layer Llama saved
with `save_pretrained`: exactly what a user's local model folder looks like.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

_INTEGRATION = Path(__file__).resolve().parent / "integration"
if str(_INTEGRATION) not in sys.path:
    sys.path.insert(0, str(_INTEGRATION))

import tiny_assets  # noqa: E402  (tests/integration/tiny_assets.py)

_BUILT: dict[str, Path] = {}


def build_tiny_model(out_dir: Path, seed: int = 0, head_scale: float = 8.0) -> Path:
    """Tokenizer (BPE, ~580 tokens) + random Llama (hidden 64, 2 layers) saved in `out_dir`."""
    tokenizer = tiny_assets.build_tokenizer(out_dir, vocab_size=1000)
    return tiny_assets.save_random_llama(
        out_dir, tokenizer, seed=seed, max_position_embeddings=256, head_scale=head_scale
    )


def tiny_model_dir(tmp_path_factory) -> Path:
    """The session's tiny model folder, built on first use (shared by every test module)."""
    if "model" not in _BUILT:
        _BUILT["model"] = build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    return _BUILT["model"]


def alpaca_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    return tiny_assets.alpaca_rows(n, seed=seed)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def config_dict(model_dir: Path, data_path: Path, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A CPU/fp32 LoRA config for the tiny model; deterministic, logs every step, no saves."""
    cfg: dict[str, Any] = {
        "base_model": str(model_dir),
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "loss": "dft",
        "datasets": [{"path": str(data_path), "type": "alpaca"}],
        "val_set_size": 0,
        "sequence_len": 128,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "lr_scheduler": "constant",
        "optimizer": "adamw_torch",
        "bf16": False,
        "fp16": False,
        "attn_implementation": "eager",
        "logging_steps": 1,
        "save_steps": 1000,
        "output_dir": str(output_dir),
        "seed": 42,
    }
    cfg.update(overrides)
    return cfg


def make_config(model_dir: Path, data_path: Path, output_dir: Path, **overrides: Any):
    from dft_peft.config import Config

    return Config.from_dict(config_dict(model_dir, data_path, output_dir, **overrides))


def tiny_run_files(tmp_path_factory, rows: int) -> tuple[Path, Path, Path]:
    """(model folder, Alpaca data file of `rows` rows, output root): what a config test needs."""
    data = write_jsonl(tmp_path_factory.mktemp("d") / "train.jsonl", alpaca_rows(rows))
    return tiny_model_dir(tmp_path_factory), data, tmp_path_factory.mktemp("out")


def config_of(files: tuple[Path, Path, Path], **overrides: Any):
    """A checked `Config` (Config.from_dict, as `load_config` builds it) over `tiny_run_files`."""
    from dft_peft.config import Config

    model_dir, data, out = files
    return Config.from_dict(config_dict(model_dir, data, out / "run", **overrides))


def write_yaml(path: Path, cfg: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def losses(history: list[dict[str, Any]], key: str = "loss") -> list[float]:
    """The training log lines' values of `key`, in step order (eval/summary lines skipped)."""
    return [h[key] for h in history if "loss" in h and key in h and "train_runtime" not in h]


def capture_trainer(monkeypatch, *callbacks: Any) -> list[Any]:
    """Record the Trainer that `dft_peft.train.train` builds (and add `callbacks` to it).

    `train` calls `install_metrics_callback(trainer)` right after building the trainer, so
    wrapping that name in `dft_peft.train` is the one place the trainer can be seen from outside.
    """
    import dft_peft.train as train_module

    seen: list[Any] = []
    original = train_module.install_metrics_callback

    def install(trainer: Any):
        seen.append(trainer)
        result = original(trainer)
        for callback in callbacks:
            trainer.add_callback(callback)
        return result

    monkeypatch.setattr(train_module, "install_metrics_callback", install)
    return seen


class Interrupt(Exception):
    """Stands in for Ctrl-C / a killed job."""


def stop_at_step(step: int):
    """A TrainerCallback that raises `Interrupt` after `step` optimizer steps (the checkpoints
    written up to then are on disk), as a kill would leave them."""
    from transformers import TrainerCallback

    class StopAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Interrupt(f"stopped at step {state.global_step}")

    return StopAtStep()
