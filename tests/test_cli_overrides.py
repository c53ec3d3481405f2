"""`--key=value` overrides on every command (issue 16).

An override is any `--option` that is not an option of the command actually run: `train
--seed=7` sets the config's `seed`, `eval --seed=7` stays eval's sampling seed, and
`--config.KEY=VALUE` always reaches the config. An unknown key gets our one line naming it and
the closest valid key, on every command.
"""

from __future__ import annotations

import os
import typing

import pytest
import yaml
from tiny_run import alpaca_rows, config_dict, tiny_model_dir, write_jsonl, write_yaml

from dft_peft.cli.commands import build_parser, main, split_overrides
from dft_peft.config import Config, load_config

COMMANDS_WITH_CONFIG = ("train", "validate", "preprocess", "eval", "inspect", "generate")
# The arguments each command needs besides the config (all of them cheap to parse).
REQUIRED = {"eval": ["--dataset", "problems.jsonl"], "generate": ["--prompt", "hi"]}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("overrides")
    model = tiny_model_dir(tmp_path_factory)
    data = write_jsonl(root / "train.jsonl", alpaca_rows(8))
    return write_yaml(root / "run.yml", config_dict(model, data, root / "out"))


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)


def resolved(config_path, command: str, *extra: str) -> tuple[object, Config]:
    """What `main` does before running the command: split, parse, load the config."""
    known, overrides = split_overrides([command, str(config_path), *REQUIRED.get(command, []), *extra])
    args = build_parser().parse_args(known)
    return args, load_config(args.config, overrides)


# ---------------------------------------------------------------- one command's own options only


@pytest.mark.parametrize("command", ["train", "validate", "preprocess", "inspect", "generate"])
def test_seed_is_the_config_key_where_the_command_has_no_seed_option(config_path, command):
    _, cfg = resolved(config_path, command, "--seed=7")
    assert cfg.seed == 7


def test_eval_seed_stays_the_sampling_seed_and_config_prefix_reaches_the_key(config_path):
    args, cfg = resolved(config_path, "eval", "--seed=7")
    assert args.seed == 7 and cfg.seed == 42
    args, cfg = resolved(config_path, "eval", "--config.seed=9", "--seed", "3")
    assert args.seed == 3 and cfg.seed == 9


@pytest.mark.parametrize("command", ["train", "validate", "preprocess", "eval", "inspect"])
def test_adapter_is_the_config_key_where_the_command_has_no_adapter_option(config_path, command):
    if command in ("eval", "inspect"):  # both have their own --adapter (adapter folders)
        args, cfg = resolved(config_path, command, "--adapter", "some/dir")
        assert cfg.adapter == "lora"
        return
    _, cfg = resolved(config_path, command, "--adapter=qlora", "--load_in_4bit=true")
    assert cfg.adapter == "qlora" and cfg.load_in_4bit is True


def test_generate_adapter_is_its_folder_option(config_path):
    args, cfg = resolved(config_path, "generate", "--adapter=outputs/x", "--config.lora_r=4")
    assert args.adapter == "outputs/x" and cfg.adapter == "lora" and cfg.lora_r == 4


def test_underscore_spelling_of_an_own_option_is_that_option(config_path):
    args, _ = resolved(config_path, "generate", "--max_new_tokens=5")
    assert args.max_new_tokens == 5


def test_space_separated_and_bare_boolean_overrides(config_path):
    _, cfg = resolved(config_path, "train", "--max_steps", "3", "--sample_packing", "--lora-r=4")
    assert (cfg.max_steps, cfg.sample_packing, cfg.lora_r) == (3, True, 4)


# ------------------------------------------------------------------- one line for a bad override


def one_error_line(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dft-peft: error: "), err
    assert "Traceback" not in err and "unrecognized arguments" not in err
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS_WITH_CONFIG)
@pytest.mark.parametrize(
    "override, needles",
    [
        ("--lerning_rate=1e-3", ["`--lerning_rate`", "learning_rate"]),
        ("--limit=3", ["`--limit`"]),
        ("--out=x", ["`--out`"]),
        ("--config.sed=7", ["`--sed`", "seed"]),
    ],
)
def test_unknown_key_is_one_line_on_every_command(config_path, capsys, command, override, needles):
    if command in ("eval", "inspect") and override in ("--limit=3", "--out=x"):
        pytest.skip(f"{override.split('=')[0]} is {command}'s own option")
    line = one_error_line(capsys, [command, config_path, *REQUIRED.get(command, []), override])
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize("command", COMMANDS_WITH_CONFIG)
def test_a_value_key_without_a_value_is_one_line(config_path, capsys, command):
    line = one_error_line(capsys, [command, config_path, *REQUIRED.get(command, []), "--learning_rate"])
    assert "`--learning_rate` has no value" in line


# ----------------------------------------------------------- every schema key, from train's line

# Keys whose values cannot be derived from their type, or must agree with another key.
SPECIAL_VALUES: dict[str, tuple[str, ...]] = {
    "base_model": ("--base_model={model}",),
    "loss": ("--loss=sft",),
    "adapter": ("--adapter=qlora", "--load_in_4bit=true"),
    "datasets": ("--datasets=[{{path: {data}, type: alpaca}}]",),
    "test_datasets": ("--test_datasets=[{{path: {data}, type: alpaca}}]",),
    "lora_target_modules": ("--lora_target_modules=[q_proj, v_proj]",),
    "lora_modules_to_save": ("--lora_modules_to_save=[lm_head]",),
    "special_tokens": ("--special_tokens={{pad_token: <pad>}}",),
    "tokens": ("--tokens=[<extra>]",),
    "eot_tokens": ("--eot_tokens=[<|im_end|>]",),
    "fsdp_version": ("--fsdp_version=2",),
    "fsdp_config": ("--fsdp_config={{reshard_after_forward: true}}",),
    "overrides_of_model_config": ("--overrides_of_model_config={{rope_theta: 1000.0}}",),
    "chat_template": ("--chat_template=chatml",),
    "chat_template_jinja": ("--chat_template_jinja='{{{{ messages }}}}'",),
    "report_to": ("--report_to=[tensorboard]",),
    "plugins": ("--plugins=[my_pkg.MyPlugin]",),
    "gradient_checkpointing_kwargs": ("--gradient_checkpointing_kwargs={{use_reentrant: false}}",),
    "load_in_8bit": ("--load_in_8bit=true",),
    "load_in_4bit": ("--load_in_4bit=true",),
    "fp16": ("--fp16=true",),
    "warmup_ratio": ("--warmup_ratio=0.1",),
    "saves_per_epoch": ("--saves_per_epoch=2", "--save_steps="),
    "eval_steps": ("--eval_steps=5", "--val_set_size=0.25"),
    "evals_per_epoch": ("--evals_per_epoch=2", "--val_set_size=0.25"),
    "resume_from_checkpoint": ("--resume_from_checkpoint={data}",),
    "lora_model_dir": ("--lora_model_dir={model}",),
    "base_model_config": ("--base_model_config={model}",),
    "tokenizer_config": ("--tokenizer_config={model}",),
    "dataset_prepared_path": ("--dataset_prepared_path={root}/prepared",),
    "output_dir": ("--output_dir={root}/elsewhere",),
    "early_stopping_patience": ("--early_stopping_patience=3", "--val_set_size=0.25", "--eval_steps=5", "--save_steps=10"),
    "load_best_model_at_end": ("--load_best_model_at_end=true", "--val_set_size=0.25", "--eval_steps=5", "--save_steps=10"),
    "metric_for_best_model": ("--metric_for_best_model=eval_loss",),
    "lr_quadratic_warmup": ("--lr_quadratic_warmup=true", "--lr_scheduler=cosine"),
    "relora": ("--relora=true", "--jagged_restart_steps=5"),
    "relora_prune_ratio": ("--relora_prune_ratio=0.5", "--relora=true", "--jagged_restart_steps=5"),
    "relora_prune_method": ("--relora_prune_method=random", "--relora=true", "--jagged_restart_steps=5"),
    "relora_cpu_offload": ("--relora_cpu_offload=true", "--relora=true", "--jagged_restart_steps=5"),
    "jagged_restart_warmup_steps": ("--jagged_restart_warmup_steps=2", "--jagged_restart_steps=5"),
    "jagged_restart_anneal_steps": ("--jagged_restart_anneal_steps=2", "--jagged_restart_steps=5"),
    "deepspeed": ("--deepspeed={{zero_optimization: {{stage: 2}}}}",),
    "peft": ("--peft={{loftq_config: {{loftq_bits: 8}}}}",),
    "model_quantization_config_kwargs": ("--model_quantization_config_kwargs={{dequantize: true}}", "--model_quantization_config=Mxfp4Config"),
}


def _generic_value(name: str, field) -> str | None:
    """A valid value different from the test config's, for fields of a plain type."""
    annotation = field.annotation
    args = typing.get_args(annotation)
    options = [annotation, *args]
    literals = [v for a in options if typing.get_origin(a) is typing.Literal for v in typing.get_args(a) if v != "auto"]
    if literals:
        return literals[-1]
    kinds = set(args) | {annotation}
    if bool in kinds or typing.Literal["auto"] in kinds:
        return "true"
    bounds = {type(m).__name__: m for m in field.metadata}
    if int in kinds:
        low = getattr(bounds.get("Ge"), "ge", None) or getattr(bounds.get("Gt"), "gt", None) or 1
        return str(int(low) + 2)
    if float in kinds:
        return "0.25" if "Lt" in bounds or "Le" in bounds else "2.5"
    if str in kinds:
        return f"value-of-{name}"
    return None


def test_every_schema_key_can_be_set_from_trains_command_line(config_path):
    root = config_path.parent
    base = yaml.safe_load(config_path.read_text())
    fill = {"model": base["base_model"], "data": base["datasets"][0]["path"], "root": root}
    missing = []
    for name, field in Config.model_fields.items():
        if name in SPECIAL_VALUES:
            argv = [a.format(**fill) for a in SPECIAL_VALUES[name]]
        else:
            value = _generic_value(name, field)
            if value is None:
                missing.append(name)
                continue
            argv = [f"--{name}={value}"]
        _, cfg = resolved(config_path, "train", *argv)
        expected = yaml.safe_load(argv[0].split("=", 1)[1])
        got = cfg.to_yaml_dict()[name]
        assert got is not None, name
        if isinstance(expected, (bool, int, float)) and not isinstance(got, str):
            assert got == expected, (name, got, expected)
        elif name not in ("datasets", "test_datasets", "special_tokens", "gradient_checkpointing_kwargs", "fsdp_config", "overrides_of_model_config"):
            assert str(got).endswith(str(expected).lstrip("./")) or got == expected, (name, got, expected)
    assert not missing, f"give these keys a value in SPECIAL_VALUES: {missing}"
