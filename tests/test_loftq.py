"""Axolotl's `peft: {loftq_config: {loftq_bits: N}}`: LoftQ initialisation of LoRA.

Real peft and bitsandbytes on a tiny Llama, no mocks. The references are independent of peft:
the original full-precision weights W (an untouched copy of the model), bitsandbytes' functional
NF4 / int8 round trip of W, and the float64 SVD of W - Q. LoftQ's promise: the base weight becomes
Q, and LoRA's B@A the best rank-r approximation of W - Q (Eckart-Young), so Q + B@A is closer to W
than Q alone. (peft does not divide B@A by the LoRA scale; with lora_alpha = lora_r it is 1.)
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import tiny_causal_lm
from tiny_run import config_dict, config_of, losses, tiny_run_files, write_yaml
from cli_helpers import ERROR_PREFIX, restore_cli_state  # noqa: F401 - fixture

from dft_peft.config import Config
from dft_peft.errors import UserError
from dft_peft.model import adapter

R = 4
LOFTQ = {"loftq_config": {"loftq_bits": 4}}
BASE = {
    "base_model": "x", "adapter": "lora", "lora_target_linear": True, "learning_rate": 1e-4,
    "datasets": [{"path": "d.jsonl", "type": "alpaca"}], "lora_r": R, "lora_alpha": R, "peft": LOFTQ,
}


def cfg_with(**extra) -> Config:
    return Config.from_dict({**BASE, **extra})


def reference_q(w: torch.Tensor, bits: int) -> torch.Tensor:
    """bitsandbytes' NF4 (blocks of 64) or int8 (per row) round trip of W, through its functional API."""
    import bitsandbytes.functional as F

    w = w.detach().float()
    if bits == 4:
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        return F.dequantize_4bit(packed, state)
    values, scales, _ = F.int8_vectorwise_quant(w.half())
    return F.int8_vectorwise_dequant(values, scales)


def lora_layers(model):
    """(name in the base model, LoRA layer) for every layer peft wrapped."""
    prefix = "base_model.model."
    return [(name.removeprefix(prefix), m) for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def rank_r(matrix: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


@pytest.mark.parametrize("bits", [4, 8])
def test_base_becomes_q_and_lora_the_best_rank_r_approximation_of_w_minus_q(bits):
    model = tiny_causal_lm("llama")
    original = copy.deepcopy(model)
    peft_model = adapter.attach_adapter(model, cfg_with(peft={"loftq_config": {"loftq_bits": bits}}))
    layers = lora_layers(peft_model)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    for name, layer in layers:
        w = original.get_submodule(name).weight.detach().double()
        q = layer.get_base_layer().weight.detach().double()
        a, b = (layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double())
        assert layer.scaling["default"] == 1.0
        assert not torch.equal(q, w), name  # the base really is quantized
        torch.testing.assert_close(q, reference_q(w, bits).double(), rtol=0, atol=1e-6, msg=name)
        assert b.abs().max() > 0, name  # plain LoRA starts at B = 0
        torch.testing.assert_close(b @ a, rank_r(w - q, R), rtol=0, atol=1e-5, msg=name)
        assert torch.linalg.norm(w - (q + b @ a)) < torch.linalg.norm(w - q), name


def test_without_peft_the_base_is_untouched_and_b_is_zero():
    model = tiny_causal_lm("llama")
    original = copy.deepcopy(model)
    for name, layer in lora_layers(adapter.attach_adapter(model, cfg_with(peft=None))):
        assert torch.equal(layer.get_base_layer().weight, original.get_submodule(name).weight)
        assert not layer.lora_B["default"].weight.any()


def test_axolotls_scale_below_one_is_warned_and_still_closer_to_w():
    """Axolotl's example: r 32, alpha 16. peft does not divide B@A by alpha/r, so the model starts at
    Q + 0.5 * (B@A): closer to W than Q, not as close as LoftQ can be; the warning says so."""
    model = tiny_causal_lm("llama")
    original = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="lora_alpha = lora_r"):
        peft_model = adapter.attach_adapter(model, cfg_with(lora_alpha=R // 2))
    name, layer = lora_layers(peft_model)[0]
    w = original.get_submodule(name).weight.detach().double()
    q = layer.get_base_layer().weight.detach().double()
    ba = layer.lora_B["default"].weight.detach().double() @ layer.lora_A["default"].weight.detach().double()
    torch.testing.assert_close(ba, rank_r(w - q, R), rtol=0, atol=1e-5)  # not divided by the scale 0.5
    assert torch.linalg.norm(w - (q + 0.5 * ba)) < torch.linalg.norm(w - q)


def test_on_meta_the_adapter_has_plain_loras_shapes():
    """`validate` and the memory rehearsal attach the adapter to a weightless model."""
    from dft_peft.model.loading import parameter_counts

    config = tiny_causal_lm("llama").config
    counts = []
    for peft_block in (LOFTQ, None):
        with torch.device("meta"):
            model = type(tiny_causal_lm("llama"))(config)
        counts.append(parameter_counts(adapter.attach_adapter(model, cfg_with(peft=peft_block))))
    assert counts[0] == counts[1] and counts[0][0] > 0


REFUSED = {
    "qlora": (dict(adapter="qlora", load_in_4bit=True), "`adapter: lora`"),
    "load_in_4bit": (dict(load_in_4bit=True), "load_in_4bit"),
    "load_in_8bit": (dict(load_in_8bit=True), "load_in_8bit"),
    "bits": (dict(peft={"loftq_config": {"loftq_bits": 2}}), "`peft.loftq_config.loftq_bits` must be one of 4 or 8"),
    "unknown_field": (dict(peft={"loftq_config": {"loftq_iter": 2}}), "`peft.loftq_config.loftq_iter`"),
    "target_parameters": (dict(lora_target_parameters=["mlp.experts.down_proj"]), "lora_target_parameters"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_combinations_peft_cannot_run_are_one_line(case):
    changes, needle = REFUSED[case]
    with pytest.raises(UserError) as info:
        cfg_with(**changes)
    message = str(info.value)
    assert needle in message and "peft.loftq_config" in message and "\n" not in message


def test_embedding_targets_are_refused_at_attach():
    with pytest.raises(UserError, match=r"Linear layers only.*embed_tokens"):
        adapter.attach_adapter(tiny_causal_lm("llama"), cfg_with(lora_target_linear=None, lora_target_modules=["embed_tokens", "q_proj"]))


def test_cli_refusal_is_exit_2(tmp_path_factory, capsys):
    from dft_peft.cli.commands import main

    model_dir, data, out = tiny_run_files(tmp_path_factory, 4)
    path = write_yaml(out / "qlora.yml", config_dict(model_dir, data, out / "run", adapter="qlora", load_in_4bit=True, peft=LOFTQ))
    capsys.readouterr()  # building the tiny model folder writes progress bars
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(ERROR_PREFIX) and "`peft.loftq_config`" in err and len(err.splitlines()) == 1


def test_trains_with_dft_and_reloads_on_its_quantized_base(tmp_path_factory):
    """End to end: 2 DFT steps from the LoftQ start, finite losses, Axolotl's adapter_config; loading
    the adapter (peft runs LoftQ again) gives back the base Q of W with the trained B."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dft_peft.model.loading import load_for_inference
    from dft_peft.train import train

    files = tiny_run_files(tmp_path_factory, 8)
    cfg = config_of(files, max_steps=2, loss="dft", lora_alpha=8, peft=LOFTQ, prior_check=False)
    result = train(cfg)
    assert result.global_step == 2
    logged = losses(result.log_history)
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(logged)))
    out = result.output_dir
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"]["loftq_bits"] == 4

    model, _ = load_for_inference(cfg, out)
    original = AutoModelForCausalLM.from_pretrained(files[0])
    trained = load_file(out / "adapter_model.safetensors")
    name, layer = lora_layers(model)[0]
    w = original.get_submodule(name).weight
    torch.testing.assert_close(layer.get_base_layer().weight, reference_q(w, 4).to(w.dtype), rtol=0, atol=1e-6)
    key = next(k for k in trained if k.endswith(f"{name}.lora_B.weight"))
    torch.testing.assert_close(layer.lora_B["default"].weight, trained[key].to(layer.lora_B["default"].weight.dtype))
