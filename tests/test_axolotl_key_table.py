"""Every key, chat template and dataset type in the generated Axolotl table has a category.

The table (dft_peft/config/axolotl_keys.json) is generated from Axolotl's own schema by
scripts/gen_axolotl_keys.py (checked against the installed Axolotl by
tests/integration/test_axolotl_keys.py). Here: each Axolotl key is implemented (a Config field,
named in some test), accepted as harmless with its reason, or refused with its reason; real
Axolotl keys are never called typos, and true typos get suggestions from the full set.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dft_peft.config import load_config
from dft_peft.config.axolotl_keys import (
    ACCEPTED_PLUGINS,
    HARMLESS_KEYS,
    LEGACY_KEYS,
    REFUSED_KEYS,
    axolotl_dataset_keys,
    axolotl_tables,
    dataset_key_category,
    dataset_type_names,
    plugin_of,
)
from dft_peft.config.keys import GENERIC_REFUSAL, is_axolotl_key, key_category, loss_param_owners, supported_keys
from dft_peft.config.dataset_types import type_category
from dft_peft.config.datasets import DatasetConfig
from dft_peft.errors import UserError

TESTS = Path(__file__).resolve().parent
BASE = {
    "base_model": "some-org/some-model",
    "adapter": "lora",
    "lora_target_linear": True,
    "learning_rate": 2e-4,
    "datasets": [{"path": "data/train.jsonl", "type": "alpaca"}],
}


def every_axolotl_key() -> list[str]:
    tables = axolotl_tables()
    return sorted(set(tables["config_keys"]) | set(plugin_of()))


def load(tmp_path, **extra):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({**BASE, **extra}))
    return load_config(path)


def load_error(tmp_path, **extra) -> str:
    with pytest.raises(UserError) as info:
        load(tmp_path, **extra)
    return str(info.value)


def test_table_records_its_axolotl_version():
    tables = axolotl_tables()
    assert tables["axolotl_version"] == "0.19.0"
    assert len(tables["config_keys"]) > 300 and len(plugin_of()) > 50


@pytest.mark.parametrize("key", every_axolotl_key())
def test_every_axolotl_key_has_one_category(key):
    kind, reason = key_category(key)
    assert kind in ("implemented", "harmless", "refused"), key
    ours = key in supported_keys() or key in loss_param_owners()
    assert ours + (key in HARMLESS_KEYS) + (key in REFUSED_KEYS) == 1, key
    if kind != "implemented":
        assert reason and reason != GENERIC_REFUSAL, f"{key}: no reason listed"


def test_every_implemented_axolotl_key_is_named_in_a_test():
    sources = "\n".join(p.read_text() for p in TESTS.rglob("test_*.py"))
    implemented = [k for k in every_axolotl_key() if key_category(k)[0] == "implemented"]
    untested = [k for k in implemented if k not in sources]
    assert not untested, f"implemented Axolotl keys no test names: {untested}"


def test_legacy_keys_are_not_in_axolotl_019_and_have_reasons():
    assert {"gptq_groupsize", "relora_steps"} <= LEGACY_KEYS
    for key in LEGACY_KEYS:
        assert key not in axolotl_tables()["config_keys"] and is_axolotl_key(key)


@pytest.mark.parametrize("key", ["lisa_n_layers", "peft", "gptq_groupsize", "use_scattermoe", "swanlab_project", "swanlab_mode"])
def test_issue_examples_are_axolotl_keys(key):
    assert is_axolotl_key(key) and key_category(key)[0] != "unknown"


def test_real_keys_are_not_called_typos(tmp_path):
    for key, value in [("lisa_n_layers", 4), ("peft_use_dora", True), ("gptq", True)]:
        message = load_error(tmp_path, **{key: value})
        assert f"`{key}` is an Axolotl option dft-peft does not support" in message, message
        assert "unknown" not in message
    cfg = load(tmp_path, gptq_groupsize=128, nvfp4_merge_aware=True, swanlab_project="p")
    assert "gptq_groupsize" in cfg.ignored_keys
    assert "logging only" in cfg.ignored_keys["swanlab_project"]  # a tracker: accepted, the run is the same
    assert "KernelsPlugin" in cfg.ignored_keys["nvfp4_merge_aware"]  # its plugin is not listed


def test_plugin_keys_with_their_plugin_are_refused(tmp_path):
    message = load_error(tmp_path, nvfp4_merge_aware=True, plugins=["axolotl.integrations.kernels.KernelsPlugin"])
    assert "nvfp4_merge_aware" in message


def test_typos_get_suggestions_from_the_full_set(tmp_path):
    assert "Did you mean `lora_r`?" in load_error(tmp_path, lora_rr=8)
    message = load_error(tmp_path, lisa_n_layer=4)
    assert "Did you mean `lisa_n_layers` (an Axolotl option" in message
    assert "neither a dft-peft option nor one of Axolotl 0.19.0" in load_error(tmp_path, qqqq=1)


def test_harmless_keys_load_with_their_reason(tmp_path):
    cfg = load(tmp_path, eval_sample_packing=True, skip_prepare_dataset=True, dataloader_num_workers=4)
    assert cfg.ignored_keys["eval_sample_packing"] == HARMLESS_KEYS["eval_sample_packing"]
    assert "tokenizes once" in cfg.ignored_keys["skip_prepare_dataset"]


def test_accepted_plugins_give_one_info_line(tmp_path):
    cfg = load(
        tmp_path,
        plugins=list(ACCEPTED_PLUGINS),
        cut_cross_entropy=True,
        liger_rms_norm=True,
        liger_glu_activation=True,
        liger_fused_linear_cross_entropy=True,
    )
    assert cfg.plugins is None and cfg.liger_rms_norm and cfg.liger_glu_activation
    notes = [v for k, v in cfg.ignored_keys.items() if k.startswith("plugins:")]
    assert notes == list(ACCEPTED_PLUGINS.values())


def test_refused_plugin_is_named(tmp_path):
    assert "axolotl.integrations.kd.KDPlugin" in load_error(tmp_path, plugins=["axolotl.integrations.kd.KDPlugin"])


# ------------------------------------------------------------------------------ dataset entries


@pytest.mark.parametrize("key", sorted(set().union(*axolotl_dataset_keys().values())))
def test_every_axolotl_dataset_key_has_a_category(key):
    if key in DatasetConfig.model_fields or key == "chat_template_jinja":
        return
    category = dataset_key_category(key)
    assert category is not None and category[1] != "an Axolotl dataset option dft-peft does not implement", key


def test_dataset_keys_are_accepted_or_refused_not_typos(tmp_path):
    entry = {"path": "data/train.jsonl", "type": "alpaca", "trust_remote_code": False, "preprocess_shards": 4}
    cfg = load(tmp_path, datasets=[entry])
    assert "datasets[0].preprocess_shards" in cfg.ignored_keys
    message = load_error(tmp_path, datasets=[{**entry, "shards": 4}])
    assert "`datasets[0].shards` is an Axolotl dataset option" in message
    message = load_error(tmp_path, datasets=[{**entry, "typ": "alpaca"}])
    assert "`datasets[0].typ` is not a valid dataset key" in message


def test_dataset_chat_template_jinja_is_the_entrys_template(tmp_path):
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    cfg = load(tmp_path, datasets=[{"path": "d.jsonl", "type": "chat_template", "chat_template": "jinja", "chat_template_jinja": jinja}])
    assert cfg.datasets[0].chat_template == jinja


# ------------------------------------------------------------------------------ dataset types


@pytest.mark.parametrize("name", sorted(dataset_type_names()))
def test_every_axolotl_dataset_type_is_ours_or_refused_with_a_reason(name):
    kind, detail = type_category(name)
    assert kind in ("implemented", "refused"), name
    assert detail


def test_axolotl_type_names_that_are_ours(tmp_path):
    for name, ours in [("alpaca:phi", "alpaca:phi"), ("alpaca_chat", "alpaca:chat"), ("alpaca:instruct", "alpaca")]:
        cfg = load(tmp_path, datasets=[{"path": "d.jsonl", "type": name}])
        assert cfg.datasets[0].type == ours
    message = load_error(tmp_path, datasets=[{"path": "d.jsonl", "type": "chat_template.default"}])
    assert "preference-data transform" in message and "rl: dpo" in message


# ------------------------------------------------------------------------------ implemented keys


def test_implemented_keys_parse(tmp_path):
    cfg = load(
        tmp_path,
        loss_watchdog_threshold=5.0,
        loss_watchdog_patience=2,
        peft_use_rslora=True,
        lora_fan_in_fan_out=False,
        evals_per_epoch=0,
        flex_attention=True,
        optimizer="adamw_torch_8bit",
        eot_tokens=["<|im_end|>"],
        liger_rope=True,
        liger_layer_norm=True,
        liger_swiglu=True,
    )
    assert cfg.attn_implementation == "flex_attention"
    assert cfg.loss_watchdog_threshold == 5.0 and cfg.loss_watchdog_patience == 2
    assert cfg.evals_per_epoch == 0 and cfg.peft_use_rslora
    assert cfg.datasets[0].train_on_eot is None and cfg.datasets[0].drop_system_message is None


def test_optimizer_precision_and_tracker_keys_reach_the_trainer(tmp_path, monkeypatch):
    from dft_peft.model import loading
    from dft_peft.training.arguments import training_arguments, wandb_environment

    for name in ("WANDB_PROJECT", "WANDB_MODE", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    cfg = load(
        tmp_path,
        adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, max_grad_norm=0.5, eager_attention=True,
        revision_of_model="abc123", use_wandb=True, wandb_project="proj", wandb_mode="offline", wandb_run_id="r1",
    )
    assert cfg.attn_implementation == "eager" and cfg.model_revision == "abc123"
    assert cfg.reporters() == ["wandb"]
    monkeypatch.setattr(cfg, "use_wandb", False)  # no wandb package here: check the arguments only
    args = training_arguments(cfg, loading.Precision(False, False), 10, has_eval=False)
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.max_grad_norm) == (0.8, 0.95, 1e-7, 0.5)
    assert wandb_environment(cfg) == {"WANDB_PROJECT": "proj", "WANDB_MODE": "offline", "WANDB_RUN_ID": "r1"}


def test_sharegpt_types_say_how_to_convert(tmp_path):
    message = load_error(tmp_path, datasets=[{"path": "d.jsonl", "type": "sharegpt", "conversation": "chatml"}])
    assert "field_messages: conversations" in message or "dataset option" in message
    message = load_error(tmp_path, datasets=[{"path": "d.jsonl", "type": "sharegpt:chat"}])
    assert "field_messages: conversations" in message


def test_readme_key_table_is_the_generated_one():
    """The README's counts are scripts/key_table.py's output; rerun it and paste when a key moves."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("key_table", TESTS.parent / "scripts" / "key_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (TESTS.parent / "README.md").read_text(encoding="utf-8")
    assert module.table() in readme, "README's key table is stale: run `python scripts/key_table.py` and paste"
