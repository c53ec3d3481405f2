"""Axolotl keys implemented for issue 10: each changes what it should.

Real parts: transformers' TrainerState/TrainerControl, peft's LoRA layers on a tiny Llama.
(The chat-data keys eot_tokens / train_on_eot / drop_system_message are in
test_chat_templates_all.py and, against real Axolotl, tests/integration/test_axolotl_keys.py.)
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
from tiny_models import tiny_causal_lm
from transformers import TrainerControl, TrainerState

from dft_peft.model import adapter, loading
from dft_peft.config import Config
from dft_peft.errors import UserError
from dft_peft.training.arguments import optimizer_name, training_arguments
from dft_peft.training.watchdog import LossWatchdog

BASE = {
    "base_model": "x", "adapter": "lora", "lora_target_modules": ["q_proj", "v_proj"], "learning_rate": 1e-4,
    "datasets": [{"path": "d.jsonl", "type": "alpaca"}], "lora_r": 4, "lora_alpha": 8,
}


def cfg_with(**extra) -> Config:
    return Config.from_dict({**BASE, **extra})


def run_watchdog(losses, threshold=5.0, patience=None):
    dog, state, control = LossWatchdog(threshold, patience), TrainerState(), TrainerControl()
    for step, loss in enumerate(losses, 1):
        state.global_step = step
        dog.on_log(None, state, control, logs={"loss": loss})
        if control.should_training_stop:
            return step
    return None


def test_loss_watchdog_stops_after_patience_losses_above_threshold(caplog):
    with caplog.at_level(logging.WARNING, logger="dft_peft"):
        assert run_watchdog([1.0, 6.0, 7.0, 8.0, 9.0]) == 4  # Axolotl's default patience: 3
    assert "loss_watchdog_threshold" in caplog.text
    assert run_watchdog([6.0, 1.0, 6.0, 6.0, 1.0, 6.0], patience=3) is None  # a good loss resets it
    assert run_watchdog([6.0, 6.0], patience=2) == 2
    assert run_watchdog([float("inf"), 1.0]) is None


def test_loss_watchdog_is_installed_from_the_config():
    from dft_peft.training.watchdog import install_loss_watchdog

    added = []
    trainer = SimpleNamespace(add_callback=added.append)
    assert install_loss_watchdog(trainer, cfg_with()) is None and not added
    dog = install_loss_watchdog(trainer, cfg_with(loss_watchdog_threshold=3.0, loss_watchdog_patience=2))
    assert added == [dog] and (dog.threshold, dog.patience) == (3.0, 2)


def _lora_layer(cfg):
    model = adapter.attach_adapter(tiny_causal_lm("llama"), cfg)
    return next(m for name, m in model.named_modules() if name.endswith("q_proj") and hasattr(m, "scaling"))


def test_peft_use_rslora_scales_by_sqrt_r():
    assert _lora_layer(cfg_with()).scaling["default"] == pytest.approx(8 / 4)
    assert _lora_layer(cfg_with(peft_use_rslora=True)).scaling["default"] == pytest.approx(8 / math.sqrt(4))


def test_lora_fan_in_fan_out_reaches_peft():
    assert _lora_layer(cfg_with()).fan_in_fan_out is False
    with pytest.warns(UserWarning):  # peft: nn.Linear stores (out, in); it warns and keeps it off
        layer = _lora_layer(cfg_with(lora_fan_in_fan_out=True))
    assert layer is not None


def test_evals_per_epoch_zero_means_no_evaluation():
    precision = loading.Precision(False, False)
    with_evals = training_arguments(cfg_with(val_set_size=0.1, evals_per_epoch=2), precision, 10, has_eval=True)
    assert with_evals.eval_strategy == "steps" and with_evals.eval_steps == 5
    none = training_arguments(cfg_with(val_set_size=0.1, evals_per_epoch=0), precision, 10, has_eval=True)
    assert none.eval_strategy == "no"


def test_torchao_optimizers_fall_back_or_say_what_to_install():
    import importlib.util

    if importlib.util.find_spec("torchao") is not None:
        assert optimizer_name("adamw_torch_8bit") == "adamw_torch_8bit"
        return
    assert optimizer_name("adamw_torch_8bit") == "adamw_bnb_8bit"
    with pytest.raises(UserError, match="torchao"):
        optimizer_name("adamw_torch_4bit")
    assert optimizer_name("adamw_torch") == "adamw_torch"


def test_flex_attention_selects_the_implementation():
    assert cfg_with(flex_attention=True).attn_implementation == "flex_attention"
    assert cfg_with(attn_implementation="flex_attention").attn_implementation == "flex_attention"


def test_liger_kernels_without_liger_or_gpu_leave_the_model_alone(caplog):
    from dft_peft.model.liger import apply_liger_kernels, requested_kernels, unavailable_reason

    cfg = cfg_with(liger_rms_norm=True, liger_glu_activation=True, liger_rope=True, liger_layer_norm=True)
    assert set(requested_kernels(cfg)) == {"rms_norm", "swiglu", "geglu", "rope", "layer_norm"}
    if unavailable_reason() is None:
        pytest.skip("liger-kernel and CUDA present: see the gpu test")
    model = tiny_causal_lm("llama")
    before = [type(m).__name__ for m in model.modules()]
    with caplog.at_level(logging.INFO, logger="dft_peft"):
        assert apply_liger_kernels(model, cfg) == []
    assert [type(m).__name__ for m in model.modules()] == before
    assert "not applied" in caplog.text


@pytest.mark.gpu
def test_liger_kernels_replace_modules_on_gpu():
    import torch

    from dft_peft.model.liger import apply_liger_kernels, unavailable_reason

    if not torch.cuda.is_available() or unavailable_reason():
        pytest.skip(f"needs CUDA and liger-kernel ({unavailable_reason()})")
    model = tiny_causal_lm("llama").cuda()
    applied = apply_liger_kernels(model, cfg_with(liger_rms_norm=True, liger_glu_activation=True))
    assert "rms_norm" in applied
    assert any("Liger" in type(m).__name__ for m in model.modules())


def test_watchdog_stops_a_real_run_and_rslora_trains(tmp_path_factory, tmp_path):
    """Through `train()`: threshold 0 means every logged loss is too high, so patience 2 ends the
    run after step 2 of 6, and the rank-stabilised LoRA adapter is what was trained."""
    import json

    from tiny_run import alpaca_rows, make_config, tiny_model_dir, write_jsonl

    from dft_peft.train import train

    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(4))
    cfg = make_config(
        tiny_model_dir(tmp_path_factory), data, tmp_path / "out", max_steps=6, loss="dft",
        loss_watchdog_threshold=0.0, loss_watchdog_patience=2, peft_use_rslora=True, prior_check=False,
    )
    result = train(cfg)
    assert result.global_step == 2
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter["use_rslora"] is True
