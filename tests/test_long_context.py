"""Long context (issue 20): Axolotl's `activation_offloading` / `tiled_mlp` keys, the meta-device
rehearsal of the real training step, and the planner held within 10% of it at Llama-3.1-8B shape.

References are independent of the code under test: the config keys against Axolotl's documented
meaning, host memory against L x N x H x 2 bytes, the rehearsal against the planner's formulas.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_models import tiny_causal_lm

from dft_peft.config import Config
from dft_peft.memory import planner
from dft_peft.memory.activations import apply_activation_memory
from dft_peft.memory.rehearsal import Rehearser, optimizer_state_bytes

pytest.importorskip("bitsandbytes")

GiB = 1 << 30
LLAMA_31_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=False,
    head_dim=128,
)
TINY = dict(
    model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False,
)
BASE = dict(
    base_model="x", load_in_4bit=True, adapter="qlora", lora_r=32, lora_alpha=16, lora_target_linear=True, bf16=True,
    optimizer="paged_adamw_8bit", gradient_checkpointing=True, sequence_len=2048, micro_batch_size=1,
    learning_rate=1e-4, datasets=[{"path": "d.jsonl", "type": "alpaca"}], loss="dft",
    attn_implementation="flash_attention_2",
)
MODES = {
    "checkpointing": {},
    "offload": {"activation_offloading": True},
    "offload+tiled": {"activation_offloading": True, "tiled_mlp": True},
}


def config(**overrides) -> Config:
    return Config.model_validate({**BASE, **overrides})


# ----------------------------------------------------------------------------- config keys


@pytest.mark.parametrize("value", [True, "legacy", "hidden_states"])
def test_activation_offloading_means_offloaded_checkpointing(value):
    assert config(activation_offloading=value).gradient_checkpointing == "offload"
    assert config(gradient_checkpointing="offload").gradient_checkpointing == "offload"  # the alias stays
    assert config(activation_offloading=False).gradient_checkpointing is True


def test_activation_offloading_disk_and_nonsense_are_refused_in_one_line():
    with pytest.raises(ValueError, match="activation_offloading: `disk` is not supported"):
        config(activation_offloading="disk")
    with pytest.raises(ValueError, match="activation_offloading: must be"):
        config(activation_offloading="cpu")
    with pytest.raises(ValueError, match="drop `gradient_checkpointing: false`"):
        config(activation_offloading=True, gradient_checkpointing=False)


def test_tiled_mlp_keys():
    cfg = config(tiled_mlp=True, tiled_mlp_num_shards=4)
    assert cfg.tiled_mlp is True and cfg.tiled_mlp_num_shards == 4
    assert config().tiled_mlp is False
    assert config(tiled_mlp_num_shards=4).tiled_mlp is False  # as in Axolotl: read only with tiled_mlp
    with pytest.raises(ValueError):
        config(tiled_mlp=True, tiled_mlp_num_shards=0)


def test_apply_activation_memory_tiles_every_mlp():
    model = tiny_causal_lm("llama", seed=0, num_hidden_layers=3)
    cfg = config(load_in_4bit=False, adapter="lora", tiled_mlp=True, tiled_mlp_num_shards=2)
    applied = apply_activation_memory(model, cfg)
    assert applied == ["memory-lean RMSNorm (7 norms)", "tiled MLP (3 layers, 2 shards)"]  # 3 x 2 + final
    assert all("_dft_untiled_forward" in vars(layer.mlp) for layer in model.model.layers)


# ----------------------------------------------------------------------------- rehearsal on a small model


def test_offloaded_inputs_are_host_memory_not_gpu_memory():
    """Offload books exactly layers x N x H x 2 bytes (bf16 layer inputs) on the host, and the GPU
    peak falls by at least the checkpointed inputs it no longer holds (minus the two in flight)."""
    n = 4096
    plain = Rehearser(config(), TINY).step(n)
    off = Rehearser(config(activation_offloading=True), TINY).step(n)
    assert plain.host_pinned == 0
    assert off.host_pinned == TINY["num_hidden_layers"] * n * TINY["hidden_size"] * 2
    saved = (TINY["num_hidden_layers"] - 2) * n * TINY["hidden_size"] * 2
    assert plain.parts["activations (saved for backward)"] - off.parts["activations (saved for backward)"] >= saved


def test_the_residual_stream_stays_in_the_compute_dtype():
    """peft leaves norms fp32, which made every norm output and so the residual stream fp32; the
    adapter casts them back (restore_half_precision_norms). Checkpointed inputs: L x N x H x 2."""
    n = 1024
    rehearser = Rehearser(config(), TINY)
    norms = [p for name, p in rehearser.model.named_parameters() if "norm" in name]
    assert norms and all(p.dtype == torch.bfloat16 for p in norms)
    off = Rehearser(config(activation_offloading=True), TINY).step(n)
    assert off.host_pinned == TINY["num_hidden_layers"] * n * TINY["hidden_size"] * 2  # not x 4


def test_longest_is_the_boundary_of_the_rehearsed_peak():
    rehearser = Rehearser(config(), TINY)
    budget = rehearser.step(6 * 1024).total + 1
    longest, runs = rehearser.longest(budget)
    assert longest == 6 * 1024 and runs > 2
    assert rehearser.step(longest + 1024).total > budget


def test_optimizer_states_follow_bitsandbytes_8bit_rule():
    # >= 4096 values: two uint8 moments + an fp32 absmax per 256 values per moment; below: fp32 moments.
    assert optimizer_state_bytes("paged_adamw_8bit", [131072, 100]) == 2 * 131072 + 8 * 512 + 8 * 100
    assert optimizer_state_bytes("adamw_torch", [10, 20]) == 8 * 30


# ----------------------------------------------------------------------------- Llama-3.1-8B: planner vs rehearsal


def _planned(cfg: Config, n: int) -> int:
    setup = replace(planner.setup_from_config(cfg), sequence_len=n)
    return planner.estimate(planner.shape_from_config(LLAMA_31_8B), setup).total


def test_planner_within_10_percent_of_rehearsal_at_8b_2k():
    cfg = config()
    rehearsed = Rehearser(cfg, LLAMA_31_8B).step(2048).total
    assert abs(_planned(cfg, 2048) / rehearsed - 1) < 0.10
    assert 7 * GiB < rehearsed < 10 * GiB  # 4-bit 8B + bf16 embeddings and head: ~5.6 GiB of weights


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_planner_within_10_percent_of_rehearsal_at_8b(mode):
    """2k, 8k and 32k tokens, sft and dft (the objective does not change memory: equal peaks)."""
    for n in (2048, 8192, 32768):
        peaks = {}
        for loss in ("sft", "dft"):
            cfg = config(loss=loss, **MODES[mode])
            peaks[loss] = Rehearser(cfg, LLAMA_31_8B).step(n).total if loss == "sft" or n == 2048 else peaks["sft"]
            planned = _planned(cfg, n)
            assert abs(planned / peaks[loss] - 1) < 0.10, (mode, n, loss, planned / GiB, peaks[loss] / GiB)
        if n == 2048:
            assert peaks["sft"] == peaks["dft"]


def test_gpu_e2e_benchmark_has_tiled_rows(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "gpu" / "e2e.py"
    spec = importlib.util.spec_from_file_location("e2e_tiled", path)
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    report = e2e.main(["--smoke", "--tokens", "32", "--losses", "fused", "--checkpointing", "offload+tiled"])
    (row,) = report["steps"]
    assert row["checkpointing"] == "offload+tiled" and row["tokens_per_s"] > 0 and row["planned_reserved"] > 0
