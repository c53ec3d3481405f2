"""Axolotl's training-loop keys, as Axolotl 0.19 means them: `batch_size`, `eval_batch_size`,
`early_stopping_patience` (+ `load_best_model_at_end`, `metric_for_best_model`,
`greater_is_better`), `ddp_find_unused_parameters`, `torch_compile` (+ backend, mode),
`deepspeed`, `bfloat16` / `float16`, `lr_quadratic_warmup`; and the two that stay refused.

References are independent of the code under test: Axolotl's formulas restated here from its
source (utils/config normalize_config, core/builders, utils/schedulers.py), the values
transformers' own `TrainingArguments` ends up with, and real tiny Trainer runs with
transformers' real EarlyStoppingCallback, whose stopping rule is restated from its docs.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import tiny_run
import yaml
from safetensors.torch import load_file

from dft_peft.config import Config, load_config
from dft_peft.errors import UserError
from dft_peft.model.loading import Precision
from dft_peft.train import train
from dft_peft.training import loop_options
from dft_peft.training.arguments import training_arguments

FP32 = Precision(bf16=False, fp16=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run.tiny_run_files(tmp_path_factory, rows=20)


cfg_of = tiny_run.config_of


def error_of(tiny, **overrides) -> str:
    with pytest.raises(UserError) as info:
        cfg_of(tiny, **overrides)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


def args_of(cfg: Config, *, epoch_steps: int = 10, has_eval: bool = False):
    return training_arguments(cfg, FP32, epoch_steps, has_eval=has_eval)


def axolotl_gradient_accumulation(batch_size: int, micro_batch_size: int) -> int:
    """Axolotl's normalize_config, restated: gradient_accumulation_steps = batch_size // micro_batch_size."""
    return batch_size // micro_batch_size


# ----------------------------------------------------------------------------- batch sizes


@pytest.mark.parametrize("batch_size, micro", [(16, 4), (8, 8), (6, 1), (32, 2)])
def test_batch_size_sets_gradient_accumulation_as_axolotl(tiny, batch_size, micro):
    overrides = tiny_run.config_dict(*tiny)
    del overrides["gradient_accumulation_steps"]
    cfg = Config.from_dict({**overrides, "batch_size": batch_size, "micro_batch_size": micro})
    assert cfg.gradient_accumulation_steps == axolotl_gradient_accumulation(batch_size, micro)
    assert args_of(cfg).gradient_accumulation_steps == axolotl_gradient_accumulation(batch_size, micro)
    assert "batch_size" not in cfg.to_yaml_dict()  # the resolved config holds what it became


def test_batch_size_not_a_multiple_rounds_down_with_a_warning(tiny):
    fields = tiny_run.config_dict(*tiny)
    del fields["gradient_accumulation_steps"]
    with pytest.warns(UserWarning, match="rounds down"):
        cfg = Config.from_dict({**fields, "batch_size": 10, "micro_batch_size": 4})
    assert cfg.gradient_accumulation_steps == axolotl_gradient_accumulation(10, 4) == 2


def test_batch_size_errors_name_the_keys(tiny):
    message = error_of(tiny, batch_size=16)  # the tiny config sets gradient_accumulation_steps too
    assert "`batch_size` and `gradient_accumulation_steps` are both set" in message
    fields = tiny_run.config_dict(*tiny)
    del fields["gradient_accumulation_steps"]
    with pytest.raises(UserError, match="`batch_size` 2 is smaller than `micro_batch_size` 4"):
        Config.from_dict({**fields, "batch_size": 2})


def test_eval_batch_size_reaches_the_trainer_and_defaults_to_micro_batch_size(tiny):
    assert args_of(cfg_of(tiny, micro_batch_size=3)).per_device_eval_batch_size == 3  # Axolotl's default
    assert args_of(cfg_of(tiny, micro_batch_size=3, eval_batch_size=7)).per_device_eval_batch_size == 7


# ----------------------------------------------------------------------------- early stopping, best model


def test_early_stopping_without_eval_data_is_one_line_naming_the_fix(tiny):
    message = error_of(tiny, early_stopping_patience=3, eval_steps=5, save_steps=10)
    assert "`early_stopping_patience`" in message and "no evaluation data" in message
    assert "`val_set_size`" in message and "`test_datasets`" in message


@pytest.mark.parametrize(
    "settings, needle",
    [
        ({"save_steps": None, "eval_steps": 5}, "needs `save_steps` and `eval_steps`"),
        ({"save_steps": 10, "eval_steps": None}, "needs `save_steps` and `eval_steps`"),
        ({"save_steps": 10, "eval_steps": 4}, "multiple of eval_steps"),  # Axolotl: save_steps % eval_steps
    ],
)
def test_early_stopping_needs_axolotls_schedule(tiny, settings, needle):
    assert needle in error_of(tiny, early_stopping_patience=2, val_set_size=0.2, **settings)


def test_early_stopping_sets_the_trainer_up_as_axolotl(tiny):
    cfg = cfg_of(tiny, early_stopping_patience=2, val_set_size=0.2, eval_steps=5, save_steps=10)
    args = args_of(cfg, has_eval=True)
    assert args.load_best_model_at_end is True  # Axolotl: early_stopping_patience turns it on
    assert args.metric_for_best_model == "loss" and args.greater_is_better is False  # transformers' defaults
    assert args.eval_strategy == "steps" and args.eval_steps == 5
    assert args.save_strategy == "steps" and args.save_steps == 10


def test_load_best_model_metric_and_direction_reach_the_trainer(tiny):
    cfg = cfg_of(
        tiny, load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
        val_set_size=0.2, eval_steps=2, save_steps=4,
    )
    args = args_of(cfg, has_eval=True)
    assert (args.load_best_model_at_end, args.metric_for_best_model, args.greater_is_better) == (True, "eval_loss", True)
    plain = args_of(cfg_of(tiny))
    assert plain.load_best_model_at_end is False and plain.metric_for_best_model is None


def test_load_best_model_refusals(tiny):
    assert "no evaluation data" in error_of(tiny, load_best_model_at_end=True)
    assert "one schedule" in error_of(tiny, load_best_model_at_end=True, val_set_size=0.2, evals_per_epoch=2, save_steps=None)
    message = error_of(tiny, metric_for_best_model="accuracy")
    assert "metric_for_best_model: `accuracy` is not computed" in message and "eval_loss" in message


def test_best_model_on_per_epoch_intervals_that_miss_each_other_is_one_line(tiny):
    cfg = cfg_of(tiny, load_best_model_at_end=True, val_set_size=0.2, saves_per_epoch=3, evals_per_epoch=2, save_steps=None)
    with pytest.raises(UserError, match="do not fall on evaluations"):
        args_of(cfg, epoch_steps=12, has_eval=True)  # saves every 4 steps, evaluations every 6


def expected_stop(eval_losses: list[tuple[int, float]], patience: int) -> tuple[int | None, int]:
    """transformers' EarlyStoppingCallback, restated (threshold 0, lower is better): the step at
    which `patience` evaluations in a row failed to improve on the best, and the best's step."""
    best, best_step, misses = math.inf, 0, 0
    for step, loss in eval_losses:
        if loss < best:
            best, best_step, misses = loss, step, 0
        else:
            misses += 1
            if misses >= patience:
                return step, best_step
    return None, best_step


def test_early_stopping_stops_a_real_run_and_keeps_the_best_adapter(tiny, tmp_path):
    model_dir, data, _ = tiny
    cfg = tiny_run.make_config(
        model_dir, data, tmp_path / "run", val_set_size=0.2, early_stopping_patience=2,
        eval_steps=1, save_steps=1, max_steps=12, learning_rate=0.05,
    )
    result = train(cfg)
    evals = [(h["step"], h["eval_loss"]) for h in result.log_history if "eval_loss" in h]
    stop, best_step = expected_stop(evals, patience=2)
    assert stop is not None and stop < 12, f"eval losses never stalled for 2 evaluations: {evals}"
    assert result.global_step == stop
    # load_best_model_at_end: the adapter written at the end is the best checkpoint's, not the last step's.
    final = load_file(str(result.output_dir / "adapter_model.safetensors"))
    best = load_file(str(tmp_path / "run" / f"checkpoint-{best_step}" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "run" / f"checkpoint-{stop}" / "adapter_model.safetensors"))
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert any(not torch.equal(final[k], last[k]) for k in final)
    state = json.loads((tmp_path / "run" / f"checkpoint-{stop}" / "trainer_state.json").read_text())
    assert Path(state["best_model_checkpoint"]) == tmp_path / "run" / f"checkpoint-{best_step}"  # not the staging folder


# ----------------------------------------------------------------------------- DDP, torch.compile


def test_ddp_find_unused_parameters_passes_through(tiny):
    assert args_of(cfg_of(tiny)).ddp_find_unused_parameters is False  # every LoRA weight is used
    assert args_of(cfg_of(tiny, ddp_find_unused_parameters=True)).ddp_find_unused_parameters is True


def test_torch_compile_settings_reach_the_trainer_as_axolotl_passes_them(tiny):
    args = args_of(cfg_of(tiny, torch_compile=True, torch_compile_backend="aot_eager", torch_compile_mode="max-autotune"))
    assert (args.torch_compile, args.torch_compile_backend, args.torch_compile_mode) == (True, "aot_eager", "max-autotune")
    args = args_of(cfg_of(tiny, torch_compile=True))
    assert args.torch_compile is True and args.torch_compile_backend == "inductor"  # transformers' default backend
    # Axolotl passes backend and mode only with torch_compile on (TrainingArguments would switch it on itself).
    assert args_of(cfg_of(tiny, torch_compile_backend="inductor")).torch_compile is False
    auto = args_of(cfg_of(tiny, torch_compile="auto")).torch_compile
    major, minor, patch = (int(p) for p in torch.__version__.split("+")[0].split(".")[:3])
    assert auto is ((major, minor, patch) >= (2, 5, 1))  # Axolotl's check_torch_compile_auto


@pytest.mark.slow
def test_torch_compile_trains_the_patched_dft_model_like_eager(tiny, tmp_path, monkeypatch):
    """A real compile (inductor, CPU) of the tiny Llama + LoRA with the patched DFT loss: the
    compiled run's losses match an eager run's step by step."""
    model_dir, data, _ = tiny
    seen = tiny_run.capture_trainer(monkeypatch)
    common = dict(max_steps=2, micro_batch_size=2, learning_rate=1e-3)
    eager = train(tiny_run.make_config(model_dir, data, tmp_path / "eager", **common))
    compiled = train(tiny_run.make_config(model_dir, data, tmp_path / "compiled", torch_compile=True, **common))
    assert isinstance(seen[-1].model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert tiny_run.losses(compiled.log_history) == pytest.approx(tiny_run.losses(eager.log_history), rel=1e-4)


# ----------------------------------------------------------------------------- DeepSpeed


def write_ds(path: Path, stage: int | None) -> Path:
    config = {"train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"}}
    if stage is not None:
        config["zero_optimization"] = {"stage": stage, "overlap_comm": True}
    path.write_text(json.dumps(config))
    return path


def load_yaml(tiny, tmp_path: Path, **overrides) -> Config:
    path = tiny_run.write_yaml(tmp_path / "cfg" / "config.yml", tiny_run.config_dict(*tiny, **overrides))
    return load_config(path)


@pytest.mark.parametrize("stage", [None, 0, 1, 2])
def test_deepspeed_zero_0_to_2_is_passed_through_when_the_run_starts(tiny, tmp_path, monkeypatch, stage):
    (tmp_path / "cfg").mkdir()
    write_ds(tmp_path / "cfg" / "ds.json", stage)
    cfg = load_yaml(tiny, tmp_path, deepspeed="ds.json")  # relative to the config file's folder
    assert cfg.deepspeed == str(tmp_path / "cfg" / "ds.json")
    monkeypatch.setattr(loop_options.importlib.util, "find_spec", lambda name: object())  # "installed"
    assert loop_options.loop_arguments(cfg, save_steps=None, eval_steps=None, has_eval=False)["deepspeed"] == cfg.deepspeed


def test_deepspeed_mapping_is_accepted_and_zero3_refused(tiny):
    assert cfg_of(tiny, deepspeed={"zero_optimization": {"stage": 2}}).deepspeed == {"zero_optimization": {"stage": 2}}
    message = error_of(tiny, deepspeed={"zero_optimization": {"stage": 3}})
    assert "deepspeed" in message and "ZeRO stage 3" in message and "LM head" in message


def test_deepspeed_zero3_file_is_refused_in_one_line(tiny, tmp_path):
    (tmp_path / "cfg").mkdir()
    write_ds(tmp_path / "cfg" / "zero3.json", 3)
    with pytest.raises(UserError) as info:
        load_yaml(tiny, tmp_path, deepspeed="zero3.json")
    assert "\n" not in str(info.value) and "ZeRO stage 3" in str(info.value)


def test_deepspeed_missing_files_name_the_file(tiny, tmp_path):
    with pytest.raises(UserError) as info:
        load_yaml(tiny, tmp_path, deepspeed="my_ds.json")
    assert "`my_ds.json` does not exist" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError) as info:
        load_yaml(tiny, tmp_path, deepspeed="deepspeed_configs/zero9.json")
    message = str(info.value)
    assert "`deepspeed_configs/zero9.json` does not exist" in message and "ships Axolotl's zero1, zero2" in message


def test_axolotls_deepspeed_configs_folder_is_shipped(tiny, tmp_path):
    """Axolotl's examples say `deepspeed: deepspeed_configs/zero2.json`, a file of Axolotl's repository.
    Reference: Axolotl's zero2.json restated (ZeRO-2, optimizer offloaded to the CPU)."""
    cfg = load_yaml(tiny, tmp_path, deepspeed="deepspeed_configs/zero2.json")
    shipped = json.loads(Path(cfg.deepspeed).read_text())
    assert shipped["zero_optimization"] == {
        "stage": 2, "offload_optimizer": {"device": "cpu"}, "contiguous_gradients": True, "overlap_comm": True,
    }
    assert "\n" not in error_of(tiny, deepspeed="deepspeed_configs/zero3.json")
    assert "ZeRO stage 3" in error_of(tiny, deepspeed="deepspeed_configs/zero3.json")
    # the user's own file of that name wins
    (tmp_path / "cfg" / "deepspeed_configs").mkdir(parents=True)
    write_ds(tmp_path / "cfg" / "deepspeed_configs" / "zero2.json", 1)
    assert load_yaml(tiny, tmp_path, deepspeed="deepspeed_configs/zero2.json").deepspeed == str(
        tmp_path / "cfg" / "deepspeed_configs" / "zero2.json"
    )


def test_deepspeed_not_installed_is_one_line_when_the_run_starts(tiny, monkeypatch):
    cfg = cfg_of(tiny, deepspeed={"zero_optimization": {"stage": 2}})  # validating needs no DeepSpeed
    monkeypatch.setattr(loop_options.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install deepspeed"):
        args_of(cfg)


def test_deepspeed_with_fsdp_is_refused(tiny):
    message = error_of(tiny, deepspeed={"zero_optimization": {"stage": 2}}, fsdp_version=2, fsdp_config={"reshard_after_forward": True})
    assert "`deepspeed` and `fsdp_config` are both set" in message


def test_empty_deepspeed_is_unset(tiny):
    assert cfg_of(tiny, deepspeed=None).deepspeed is None
    assert "deepspeed" not in loop_options.loop_arguments(cfg_of(tiny), save_steps=None, eval_steps=None, has_eval=False)


# ----------------------------------------------------------------------------- dtype spellings


def test_bfloat16_is_axolotls_older_bf16(tiny):
    fields = tiny_run.config_dict(*tiny)
    del fields["bf16"]
    assert Config.from_dict({**fields, "bfloat16": True}).bf16 is True  # Axolotl: bf16 = bf16 or bfloat16
    assert Config.from_dict({**fields, "bfloat16": False}).bf16 == "auto"  # off: nothing changes
    assert "`bfloat16: true`" in error_of(tiny, bfloat16=True)  # the tiny config says bf16: false


def test_float16_is_accepted_where_it_changes_nothing_and_refused_alone(tiny):
    assert cfg_of(tiny, float16=True, fp16=True).fp16 is True  # fp16 weights + mixed precision either way
    assert cfg_of(tiny, float16=True, bf16=True, fp16=None).bf16 is True  # Axolotl's resolve_dtype: bf16 wins
    # Axolotl's archived configs: float16: true, bf16: false, fp16: false = fp16 weights, no mixed precision.
    message = error_of(tiny, float16=True)
    assert "`float16: true`" in message and "fp16: true" in message


# ----------------------------------------------------------------------------- quadratic warmup


def axolotl_quadratic_warmup(step: int, warmup: int, total: int) -> float:
    """Axolotl's _get_cosine_schedule_with_quadratic_warmup_lr_lambda (num_cycles 0.5), restated."""
    if step < warmup:
        return (step / max(1, warmup)) ** 2
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def learning_rates(tiny, tmp_path, monkeypatch, **overrides) -> list[float]:
    from transformers import TrainerCallback

    rates: list[float] = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
            rates.append(lr_scheduler.get_last_lr()[0])

    tiny_run.capture_trainer(monkeypatch, Record())
    model_dir, data, _ = tiny
    train(tiny_run.make_config(model_dir, data, tmp_path, max_steps=6, warmup_steps=3, lr_scheduler="cosine", learning_rate=1e-3, **overrides))
    return rates


def test_lr_quadratic_warmup_follows_axolotls_schedule(tiny, tmp_path, monkeypatch):
    quadratic = learning_rates(tiny, tmp_path / "q", monkeypatch, lr_quadratic_warmup=True)
    assert quadratic == pytest.approx([1e-3 * axolotl_quadratic_warmup(s, 3, 6) for s in range(6)])
    linear = learning_rates(tiny, tmp_path / "l", monkeypatch)
    assert linear[1] == pytest.approx(1e-3 / 3) and quadratic[1] == pytest.approx(1e-3 / 9)


def test_lr_quadratic_warmup_with_another_schedule_warns_as_axolotl_ignores_it(tiny):
    with pytest.warns(UserWarning, match="lr_quadratic_warmup applies to `lr_scheduler: cosine` only"):
        cfg_of(tiny, lr_quadratic_warmup=True)  # the tiny config's scheduler is constant


# ----------------------------------------------------------------------------- still refused


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("unfrozen_parameters", ["^lm_head.*"], "PEFT then saves only the adapter"),
    ],
)
def test_keys_that_stay_refused_say_why(tiny, key, value, reason):
    message = error_of(tiny, **{key: value})
    assert f"`{key}` is an Axolotl option dft-peft does not support" in message and reason in message


def test_loop_keys_survive_the_resolved_config(tiny, tmp_path):
    cfg = cfg_of(
        tiny, eval_batch_size=2, early_stopping_patience=2, val_set_size=0.2, eval_steps=2, save_steps=4,
        torch_compile=True, ddp_find_unused_parameters=True, lr_quadratic_warmup=True, lr_scheduler="cosine",
        deepspeed={"zero_optimization": {"stage": 1}},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = Config.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_yaml_dict())))
    assert again.to_yaml_dict() == cfg.to_yaml_dict()
