"""Axolotl configs as written, round 2 (issue 21): FSDP1 settings as FSDP2, xformers as sdpa,
speed-only kernel keys accepted, `model_config` overrides, `resize_token_embeddings_to_32x`,
`dataset_exact_deduplication`, `adam_eps`, an output_dir that cannot be created, a learning rate
that destroys the adapter.

References are Axolotl's own rules, restated here from its code (0.19 / main: schemas/fsdp.py,
loaders/model.py, utils/data/utils.py) or computed independently (a set of rows, a ceiling).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import pytest
import torch
import tiny_run

from dft_peft.config import Config
from dft_peft.errors import UserError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run.tiny_run_files(tmp_path_factory, rows=6)


cfg_of = tiny_run.config_of


# ----------------------------------------------------------------------------- FSDP1 -> FSDP2

FSDP1_BLOCK = {  # Axolotl's llama-2/qlora-fsdp.yml, as written
    "fsdp_limit_all_gathers": True,
    "fsdp_sync_module_states": True,
    "fsdp_offload_params": True,
    "fsdp_use_orig_params": False,
    "fsdp_cpu_ram_efficient_loading": True,
    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
    "fsdp_state_dict_type": "FULL_STATE_DICT",
    "fsdp_sharding_strategy": "FULL_SHARD",
}


def test_fsdp1_list_and_block_run_as_fsdp2_with_a_note(tiny):
    cfg = cfg_of(tiny, fsdp=["full_shard", "auto_wrap"], fsdp_config=dict(FSDP1_BLOCK))
    assert cfg.fsdp_version == 2
    assert cfg.fsdp_config == {  # FULL_SHARD = reshard after forward; FSDP1-only knobs dropped
        "reshard_after_forward": True,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "sync_module_states": True,
        "offload_params": True,
        "cpu_ram_efficient_loading": True,
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "state_dict_type": "FULL_STATE_DICT",
    }
    note = cfg.ignored_keys["fsdp"]
    assert "FSDP2" in note and "limit_all_gathers" in note and "use_orig_params" in note
    assert "mapped:      fsdp: FSDP1 settings run as FSDP2" in cfg.describe()


@pytest.mark.parametrize("items, reshard", [(["shard_grad_op"], False), ("full_shard auto_wrap", True)])
def test_fsdp1_strategies_map_onto_reshard_after_forward(tiny, items, reshard):
    cfg = cfg_of(tiny, fsdp=items, fsdp_config={"fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"})
    assert cfg.fsdp_config["reshard_after_forward"] is reshard


def test_sharding_strategy_inside_an_fsdp2_block_is_understood(tiny):
    cfg = cfg_of(tiny, fsdp_config={"fsdp_version": 2, "sharding_strategy": "SHARD_GRAD_OP", "reshard_after_forward": False})
    assert cfg.fsdp_config == {"reshard_after_forward": False} and cfg.fsdp_version == 2


@pytest.mark.parametrize("items, block", [(["hybrid_shard", "auto_wrap"], {}), (None, {"fsdp_sharding_strategy": "NO_SHARD"})])
def test_fsdp1_strategies_that_shard_differently_are_refused_in_one_line(tiny, items, block):
    with pytest.raises(UserError) as err:
        cfg_of(tiny, **({"fsdp": items} if items else {}), fsdp_config=block)
    assert "\n" not in str(err.value) and ("hybrid" in str(err.value) or "NO_SHARD" in str(err.value))


def test_plain_fsdp2_configs_are_left_as_they_were(tiny):
    cfg = cfg_of(tiny, fsdp_version=2, fsdp_config={"offload_params": False, "reshard_after_forward": True})
    assert cfg.fsdp_config == {"offload_params": False, "reshard_after_forward": True}
    assert "fsdp" not in cfg.ignored_keys


# ----------------------------------------------------------------------------- attention, kernels


@pytest.mark.parametrize("written", [{"xformers_attention": True}, {"attn_implementation": "xformers"}])
def test_xformers_runs_as_sdpa_with_a_note(tiny, written):
    cfg = cfg_of(tiny, **{"attn_implementation": None, **written})
    assert cfg.attn_implementation == "sdpa"
    assert "sdpa" in cfg.ignored_keys["xformers_attention"]


@pytest.mark.parametrize("key", ["lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "use_kernels"])
def test_speed_only_kernel_keys_are_accepted_with_their_reason(tiny, key):
    cfg = cfg_of(tiny, **{key: True})
    assert "faster" in cfg.ignored_keys[key]


def test_flash_attn_rms_norm_is_refused_as_axolotl_019_refuses_it(tiny):
    """Axolotl 0.19's DeprecatedParameters raises for `flash_attn_rms_norm: true` (its
    archived stablelm-2 example fails there); `false` changes nothing and loads."""
    with pytest.raises(UserError, match="flash_attn_rms_norm.*Axolotl 0.19 refuses it too"):
        cfg_of(tiny, flash_attn_rms_norm=True)
    assert cfg_of(tiny, flash_attn_rms_norm=False).ignored_keys["flash_attn_rms_norm"] == "unset"


def test_swanlab_plugin_and_generation_metrics_are_accepted_with_their_reason(tiny):
    cfg = cfg_of(tiny, plugins=["axolotl.integrations.swanlab.SwanLabPlugin"], use_swanlab=True,
                 do_causal_lm_eval=True, eval_causal_lm_metrics=["sacrebleu"])
    assert "eval loss is still logged" in cfg.ignored_keys["eval_causal_lm_metrics"]
    assert "logging only" in cfg.ignored_keys["use_swanlab"]


def test_trackers_are_accepted_as_logging_only(tiny):
    cfg = cfg_of(tiny, swanlab_project="p", swanlab_mode="offline")
    assert "logging only" in cfg.ignored_keys["swanlab_project"]


# ----------------------------------------------------------------------------- model loading


def test_model_config_overrides_reach_the_loaded_model(tiny):
    import torch

    from dft_peft.model import loading

    cfg = cfg_of(tiny, model_config={"rms_norm_eps": 1e-3, "rope_theta": 1234.0})
    assert cfg.overrides_of_model_config == {"rms_norm_eps": 1e-3, "rope_theta": 1234.0}
    tokenizer = loading.load_tokenizer(cfg, Path(cfg.base_model))
    model = loading.load_model(cfg, Path(cfg.base_model), tokenizer, loading.Precision(bf16=False, fp16=False))
    assert model.config.rms_norm_eps == 1e-3 and model.model.layers[0].input_layernorm.variance_epsilon == 1e-3
    assert model.dtype == torch.float32


def _tiny_mixtral(router_logits: bool):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=101, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.05,
        output_router_logits=router_logits,
    )
    return MixtralForCausalLM(config)  # fp32: the grouped expert matmul has no float64 kernel


def test_router_aux_loss_is_added_to_the_fused_objective_as_the_model_adds_it(tiny):
    """Axolotl's Mixtral examples set `model_config: {output_router_logits: true}`. Reference: the
    unpatched transformers model's own loss (cross-entropy + coef x load balancing) and gradients."""
    import dft_peft

    cfg = cfg_of(tiny, model_config={"output_router_logits": True})
    assert cfg.overrides_of_model_config == {"output_router_logits": True}
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    reference = _tiny_mixtral(True)
    want = reference(input_ids=ids, attention_mask=mask, labels=labels)
    assert want.aux_loss is not None and want.aux_loss.item() > 0
    want.loss.backward()

    patched = dft_peft.patch_model(_tiny_mixtral(True), loss="sft")
    got = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
    got.backward()
    torch.testing.assert_close(got.detach(), want.loss.detach(), rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(patched.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)

    # DFT: the same router term on top of the DFT objective of the same hidden states.
    dft_with = dft_peft.patch_model(_tiny_mixtral(True), loss="dft")(input_ids=ids, attention_mask=mask, labels=labels)
    dft_without = dft_peft.patch_model(_tiny_mixtral(False), loss="dft")(input_ids=ids, attention_mask=mask, labels=labels)
    router = 0.05 * want.aux_loss.detach()  # MoeCausalLMOutputWithPast.aux_loss is before the coefficient
    torch.testing.assert_close(dft_with.loss.detach() - dft_without.loss.detach(), router, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 31, 32, 33, 1000, 128_257])
def test_embedding_rows_round_up_to_32_as_axolotl(tokens):
    from dft_peft.model.loading import embedding_rows

    assert embedding_rows(tokens, True) == math.ceil(tokens / 32) * 32
    assert embedding_rows(tokens, None) == tokens


def test_resize_token_embeddings_to_32x_grows_the_loaded_embeddings(tiny):
    from dft_peft.model import loading

    cfg = cfg_of(tiny, resize_token_embeddings_to_32x=True, tokens=["<extra_a>", "<extra_b>"])
    tokenizer = loading.load_tokenizer(cfg, Path(cfg.base_model))
    model = loading.load_model(cfg, Path(cfg.base_model), tokenizer, loading.Precision(bf16=False, fp16=False))
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 32 == 0 and rows >= len(tokenizer) and rows - len(tokenizer) < 32


# ----------------------------------------------------------------------------- data, optimizer


def test_dataset_exact_deduplication_drops_repeated_rows(tmp_path, tiny):
    from transformers import AutoTokenizer

    from dft_peft.data import prepare_datasets

    rows = tiny_run.alpaca_rows(5)
    data = tiny_run.write_jsonl(tmp_path / "dup.jsonl", rows + rows[:3] + rows[1:2])
    distinct = len({hashlib.sha256(repr(sorted(r.items())).encode()).hexdigest() for r in rows})
    tokenizer = AutoTokenizer.from_pretrained(tiny[0])
    cfg = cfg_of(tiny, datasets=[{"path": str(data), "type": "alpaca"}], dataset_exact_deduplication=True)
    deduped = prepare_datasets(cfg.datasets, tokenizer, sequence_len=128, deduplicate=True)
    kept_all = prepare_datasets(cfg.datasets, tokenizer, sequence_len=128)
    assert len(kept_all.train) == len(rows) + 4 and len(deduped.train) == distinct


def test_adam_eps_is_the_older_spelling_of_adam_epsilon(tiny):
    assert cfg_of(tiny, adam_eps=1e-6).adam_epsilon == 1e-6


def test_a_learning_rate_that_destroys_the_adapter_warns_before_training(tiny):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg_of(tiny, learning_rate=1.0)
    assert any("learning_rate 1" in str(w.message) and w.category is UserWarning for w in caught)


def test_an_output_dir_on_a_read_only_file_system_is_one_line(tiny, capsys):
    from dft_peft.cli import main

    target = Path("/sys/kernel/dft-peft-out")
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no /sys/kernel here (not Linux)")
    model_dir, data, out = tiny
    config = tiny_run.write_yaml(out / "ro.yml", tiny_run.config_dict(model_dir, data, target))
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output_dir" in err[0] and "/sys/kernel" in err[0]


@pytest.mark.parametrize("legacy", [True, False])
def test_tokenizer_legacy_reaches_the_tokenizer_as_axolotl_passes_it(tiny, legacy):
    """Axolotl: `tokenizer_kwargs["legacy"] = cfg.tokenizer_legacy` when set. Reference: the same
    tokenizer folder loaded by transformers with `legacy=` directly."""
    from transformers import AutoTokenizer

    from dft_peft.model import loading

    cfg = cfg_of(tiny, tokenizer_legacy=legacy)
    got = loading.load_tokenizer(cfg, Path(cfg.base_model))
    want = AutoTokenizer.from_pretrained(cfg.base_model, legacy=legacy)
    assert got.init_kwargs.get("legacy") == want.init_kwargs.get("legacy") == legacy
    unset = loading.load_tokenizer(cfg_of(tiny), Path(cfg.base_model))
    assert unset.init_kwargs.get("legacy") == AutoTokenizer.from_pretrained(cfg.base_model).init_kwargs.get("legacy")


# ----------------------------------------------------------------------------- MoE and kernel keys


def _tiny_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, vocab_size=128, num_experts=4, num_experts_per_tok=2,
    )
    return Qwen3MoeForCausalLM(config)


def test_lora_target_parameters_put_lora_on_fused_experts_as_peft_does(tiny):
    """Axolotl's MoE examples target the fused 3-D expert tensors. Reference: peft's own LoraConfig
    with the same target_parameters on the same model: the same trainable tensors, and they train."""
    import peft

    from dft_peft.model.adapter import attach_adapter

    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    cfg = cfg_of(tiny, lora_target_linear=None, lora_target_modules=None, lora_target_parameters=experts,
                 gradient_checkpointing=False)
    got = attach_adapter(_tiny_qwen3_moe(), cfg)
    want = peft.get_peft_model(_tiny_qwen3_moe(), peft.LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=[], target_parameters=experts, task_type="CAUSAL_LM"))
    names = sorted(n for n, p in got.named_parameters() if p.requires_grad)
    assert names == sorted(n for n, p in want.named_parameters() if p.requires_grad)
    assert any("experts" in n and "lora_A" in n for n in names)
    ids = torch.randint(0, 128, (1, 8))
    got(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in got.named_parameters() if p.requires_grad and "lora_B" in n)


def test_experts_implementation_reaches_transformers_and_kernel_plugins_run_the_models_own(tiny, tmp_path):
    from dft_peft.model import loading

    model_dir = tmp_path / "moe"
    _tiny_qwen3_moe().save_pretrained(model_dir)
    cfg = cfg_of(tiny, experts_implementation="batched_mm")
    tokenizer = loading.load_tokenizer(cfg, Path(cfg.base_model))
    model = loading.load_model(cfg, model_dir, tokenizer, loading.Precision(bf16=False, fp16=False))
    assert model.config._experts_implementation == "batched_mm"
    kernel = cfg_of(tiny, experts_implementation="scattermoe", use_scattermoe=True,
                    plugins=["axolotl.integrations.kernels.KernelsPlugin"])
    assert kernel.experts_implementation is None
    assert "runs as transformers' own experts code" in kernel.ignored_keys["experts_implementation"]
    assert "faster" in kernel.ignored_keys["use_scattermoe"]


def test_gemma4_hybrid_attention_runs_as_sdpa_with_a_note(tiny):
    cfg = cfg_of(tiny, gemma4_hybrid_attn_impl=True, attn_implementation="flash_attention_2")
    assert cfg.attn_implementation == "sdpa"
    assert cfg.ignored_keys["gemma4_hybrid_attn_impl"].startswith("mapped: Gemma 4's hybrid attention runs as sdpa")
    with pytest.raises(UserError, match="gemma4_hybrid_attn_impl"):
        cfg_of(tiny, gemma4_hybrid_attn_impl=True, attn_implementation="eager")  # Axolotl refuses this too
    assert "faster" in cfg_of(tiny, fused_attn_kernel=True).ignored_keys["fused_attn_kernel"]
