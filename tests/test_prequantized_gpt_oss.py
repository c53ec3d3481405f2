"""Axolotl's gpt-oss configs as written: `model_quantization_config: Mxfp4Config` with
`dequantize: true`, a hub attention kernel, `constant_with_warmup`, reasoning traces in the rows.

The checkpoint is a tiny random gpt-oss whose experts are stored in MXFP4 as gpt-oss ships them
(`*_blocks`: two 4-bit e2m1 codes per byte, `*_scales`: one power-of-two exponent + 127 per 32
values). The expert values are drawn on the MXFP4 grid, so the reference is exact: the test
decodes the codes itself (sign, 2-bit exponent, 1-bit mantissa) in float64 and the loaded
experts must equal it bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import tiny_run

from dft_peft.config import Config
from dft_peft.errors import UserError

E, H, I = 4, 64, 64  # experts, hidden, intermediate: multiples of MXFP4's 32-value groups


def e2m1(code: int) -> float:
    """The value of a 4-bit e2m1 code (OCP Microscaling spec), decoded from its bits."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 0b1
    if exponent == 0:
        return sign * 0.5 * mantissa  # subnormal: 0 or 0.5
    return sign * 2.0 ** (exponent - 1) * (1 + mantissa / 2)


def mxfp4_tensor(rows: int, cols: int, experts: int, gen: torch.Generator):
    """(blocks, scales, float64 values [experts, rows, cols]) on the MXFP4 grid, groups along cols."""
    codes = torch.randint(0, 16, (experts, rows, cols), generator=gen)
    exps = torch.randint(-3, 1, (experts, rows, cols // 32), generator=gen)
    lut = torch.tensor([e2m1(c) for c in range(16)], dtype=torch.float64)
    values = lut[codes] * torch.pow(2.0, exps.double()).repeat_interleave(32, dim=-1)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    blocks = packed.reshape(experts, rows, cols // 32, 16)
    return blocks, (exps + 127).to(torch.uint8), values


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny gpt-oss folder with MXFP4 experts, and the float64 experts it encodes."""
    import tiny_assets
    from safetensors.torch import load_file, save_file
    from transformers import GptOssConfig, GptOssForCausalLM

    out = tmp_path_factory.mktemp("gpt-oss-mxfp4")
    tokenizer = tiny_assets.build_tokenizer(out, vocab_size=1000)
    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=len(tokenizer), hidden_size=H, intermediate_size=I, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=E,
        num_experts_per_tok=2, max_position_embeddings=256, sliding_window=16,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    GptOssForCausalLM(config).save_pretrained(out, safe_serialization=True)
    weights = load_file(str(out / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    expected = {}
    for layer in range(2):
        for proj, (rows, cols) in {"gate_up_proj": (2 * I, H), "down_proj": (H, I)}.items():
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            del weights[name]
            # stored [experts, out, in] grouped along `in`; the model's parameter is [experts, in, out]
            blocks, scales, values = mxfp4_tensor(rows, cols, E, gen)
            weights[f"{name}_blocks"], weights[f"{name}_scales"] = blocks, scales
            expected[name] = values.transpose(1, 2)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {  # as openai/gpt-oss-20b's config.json says it
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    (out / "config.json").write_text(json.dumps(cfg))
    return out, expected


MXFP4 = {"model_quantization_config": "Mxfp4Config", "model_quantization_config_kwargs": {"dequantize": True}}


def test_mxfp4_experts_load_as_the_values_the_checkpoint_encodes(gpt_oss_mxfp4, tmp_path):
    from dft_peft.model.loading import Precision, load_model

    model_dir, expected = gpt_oss_mxfp4
    cfg = tiny_run.make_config(model_dir, tmp_path / "unused.jsonl", tmp_path / "out", **MXFP4)
    model = load_model(cfg, model_dir, list(range(1000)), Precision(bf16=False, fp16=False))
    params = dict(model.named_parameters())
    # On this CPU (no triton) transformers would dequantize anyway; on a GPU with its MXFP4 kernels it
    # keeps the experts packed and cannot train unless told `dequantize`, which the key must pass on.
    assert getattr(model, "hf_quantizer", None) is None  # dequantized: a plain bf16/fp32 model now
    from dft_peft.model.prequantized import prequantized_config
    from transformers import Mxfp4Config

    passed = prequantized_config(cfg, model_dir)
    assert isinstance(passed, Mxfp4Config) and passed.dequantize is True
    assert not any(n.endswith(("_blocks", "_scales")) for n in params)
    for name, values in expected.items():
        loaded = params[name]
        # transformers 5.23 dequantizes to the model's dtype, Axolotl's pinned one to bf16: both hold the grid exactly
        assert loaded.dtype in (torch.float32, torch.bfloat16) and loaded.shape == values.shape
        assert torch.equal(loaded.double(), values), f"{name} differs from the MXFP4 codes it was stored as"


def test_gpt_oss_mxfp4_trains_with_dft_on_reasoning_rows(gpt_oss_mxfp4, tmp_path):
    """The gpt-oss example's shape end to end: dequantized experts, LoRA on every linear layer,
    the constant_with_warmup schedule, chat rows whose replies carry a `thinking` trace."""
    from dft_peft.train import train

    model_dir, expected = gpt_oss_mxfp4
    template = (
        "{% for m in messages %}<{{ m.role }}>"
        "{% if m.thinking %}<think>{{ m.thinking }}</think>{% endif %}"
        "{{ m.content }}<end>{% endfor %}"
    )
    rows = [
        {"messages": [
            {"role": "user", "content": f"what is {i} plus {i}?"},
            {"role": "assistant", "thinking": f"{i} and {i} make {2 * i}", "content": f"It is {2 * i}."},
        ]}
        for i in range(16)
    ]
    data = tiny_run.write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = tiny_run.make_config(
        model_dir, data, tmp_path / "run", **MXFP4, max_steps=3, lr_scheduler="constant_with_warmup",
        warmup_steps=1, sequence_len=256, chat_template="jinja", chat_template_jinja=template,
        datasets=[{"path": str(data), "type": "chat_template", "field_thinking": "thinking", "template_thinking_key": "thinking"}],
    )
    result = train(cfg)
    logged = tiny_run.losses(result.log_history)
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(logged)))
    lrs = [h["learning_rate"] for h in result.log_history if "learning_rate" in h]
    assert lrs[1:] == [cfg.learning_rate] * (len(lrs) - 1)  # warmed up in 1 step, then constant


def test_mxfp4_is_refused_where_axolotl_or_transformers_would_fail(gpt_oss_mxfp4, tmp_path):
    model_dir, _ = gpt_oss_mxfp4
    make = lambda **kw: tiny_run.make_config(model_dir, tmp_path / "d.jsonl", tmp_path / "o", **kw)  # noqa: E731
    with pytest.raises((ValueError, UserError), match="dequantize: true"):
        make(model_quantization_config="Mxfp4Config")
    with pytest.raises((ValueError, UserError), match="cannot be used together"):
        make(**MXFP4, adapter="qlora", load_in_4bit=True)
    with pytest.raises((ValueError, UserError), match="without `model_quantization_config`"):
        make(model_quantization_config_kwargs={"dequantize": True})
    with pytest.raises((ValueError, UserError), match="model_quantization_config"):
        make(model_quantization_config="AwqConfig")


def test_a_hub_attention_kernel_runs_as_the_models_own_attention(tmp_path):
    files = (tmp_path, tmp_path / "d.jsonl", tmp_path)
    raw = tiny_run.config_dict(*files, attn_implementation="kernels-community/vllm-flash-attn3")
    cfg = Config.from_dict(raw)
    assert cfg.attn_implementation is None
    raw = tiny_run.config_dict(*files, attn_implementation="flash_attention_3")
    with pytest.raises((ValueError, UserError), match="attn_implementation"):
        Config.from_dict(raw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; on a GPU transformers quantizes to FP8")
def test_fp8_quantization_of_a_full_precision_checkpoint_needs_a_gpu(tmp_path_factory, tmp_path):
    from dft_peft.model.loading import Precision, load_model

    model_dir = tiny_run.tiny_model_dir(tmp_path_factory)
    cfg = tiny_run.make_config(model_dir, tmp_path / "d.jsonl", tmp_path / "o", model_quantization_config="FineGrainedFP8Config")
    with pytest.raises(UserError, match="FineGrainedFP8Config quantizes to FP8 on a CUDA GPU"):
        load_model(cfg, model_dir, list(range(1000)), Precision(bf16=False, fp16=False))
