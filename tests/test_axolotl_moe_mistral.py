"""Axolotl 0.19's `quantize_moe_experts`, `llama4_linearized_experts` and
`tokenizer_use_mistral_common`, each against an independent reference:

* quantized experts: the 4-bit model's logits equal a hand-written Qwen3-MoE forward that reads
  the same packed NF4 bytes through bitsandbytes' dequantize_4bit; LoRA on attention trains; the
  experts take ~4x less memory than in bf16;
* linearized Llama 4: a checkpoint whose fused experts the test splits itself into per-expert
  layers gives the fused model's logits; 4-bit turns them into Linear4bit;
* mistral-common: dft-peft's chat data path yields exactly the token ids of mistral-common's own
  `encode_chat_completion`, with the assistant replies (and their EOS) trained. The tokenizer
  files are the ones mistral-common ships in its wheel (tekken_240911.json, a v3 Tekken); a v7
  variant (system prompt first) is built from it offline by changing its version field.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch
import yaml

from dft_peft.errors import UserError

AXOLOTL_EXAMPLES = Path(__file__).resolve().parent / "data" / "axolotl-examples"


def _cfg(**kw):
    base = dict(
        quantize_moe_experts=False, llama4_linearized_experts=None, tokenizer_use_mistral_common=None,
        load_in_4bit=False, load_in_8bit=False, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        adapter="qlora", model_type=None, trust_remote_code=False, base_model_config=None,
        overrides_of_model_config=None, attn_implementation="eager", resize_token_embeddings_to_32x=None,
        fsdp_config=None, fsdp_version=None, liger_rms_norm=None, liger_glu_activation=None,
        liger_layer_norm=None, liger_rope=None, liger_swiglu=None,
    )
    base.update(kw)
    return types.SimpleNamespace(**base)


# ----------------------------------------------------------------------------- quantize_moe_experts

bnb = pytest.importorskip("bitsandbytes")


def tiny_qwen3_moe(path: Path):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=128, norm_topk_prob=True,
    )
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return model


def load_4bit(path: Path, cfg):
    from dft_peft.model.loading import Precision, load_model

    tokenizer = list(range(128))  # len() only
    return load_model(cfg, path, tokenizer, Precision(bf16=True, fp16=False))


def dequantized(module, name):
    """The packed NF4 bytes of `module.<name>` dequantized by bitsandbytes itself."""
    from bitsandbytes.functional import dequantize_4bit

    packed = module.parametrizations[name].original
    state = module.parametrizations[name][0].quant_state
    return dequantize_4bit(packed, state)


def reference_moe_forward(model, input_ids):
    """Qwen3-MoE written out by hand (the modeling file's maths, per token and expert), every
    expert weight read from the packed 4-bit bytes; attention is the model's own (not quantized)."""
    from transformers.masking_utils import create_causal_mask

    inner = model.model
    h = inner.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1])[None]
    pos = inner.rotary_emb(h, position_ids)
    mask = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=None, past_key_values=None, position_ids=position_ids)
    for layer in inner.layers:
        r = h
        h = layer.input_layernorm(h)
        h = layer.self_attn(hidden_states=h, position_embeddings=pos, attention_mask=mask)[0]
        h = r + h
        r = h
        x = layer.post_attention_layernorm(h)
        experts = layer.mlp.experts
        gate_up, down = dequantized(experts, "gate_up_proj").float(), dequantized(experts, "down_proj").float()
        logits = x.float() @ layer.mlp.gate.weight.float().T
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = probs.topk(model.config.num_experts_per_tok, dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        out = torch.zeros_like(x, dtype=torch.float32)
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                xt = x[b, t].float()
                for p, e in zip(top_p[b, t], top_i[b, t]):
                    g, u = (gate_up[e] @ xt).chunk(2)
                    out[b, t] += p * (down[e] @ (torch.nn.functional.silu(g) * u))
        h = r + out.to(h.dtype)
    h = inner.norm(h)
    return model.lm_head(h).float()


def test_quantized_moe_experts_forward_memory_and_lora(tmp_path):
    import peft

    from dft_peft.model.moe_quant import quantized_expert_bytes

    ref = tiny_qwen3_moe(tmp_path)
    bf16_expert_bytes = sum(p.numel() * p.element_size() for n, p in ref.named_parameters() if "experts" in n)
    model = load_4bit(tmp_path, _cfg(quantize_moe_experts=True, load_in_4bit=True))

    experts = model.model.layers[0].mlp.experts
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert set(experts.parametrizations) == {"gate_up_proj", "down_proj"}
    assert experts.parametrizations["gate_up_proj"].original.dtype == torch.uint8
    # packed NF4 bytes: a quarter of the bf16 experts
    assert quantized_expert_bytes(model) * 4 == bf16_expert_bytes
    # the stored bytes really are NF4 of the bf16 weights (error of 4-bit, not of a wrong tensor)
    original = ref.model.layers[0].mlp.experts.gate_up_proj.float()
    error = (dequantized(experts, "gate_up_proj").float() - original).abs().mean() / original.abs().mean()
    assert 0.01 < error < 0.2

    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        got = model(ids).logits.float()
        want = reference_moe_forward(model, ids)
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    with torch.no_grad():  # and not the unquantized model's output
        assert (ref(ids).logits.float() - got).abs().max() > 1e-3

    from dft_peft.model.adapter import attach_adapter

    lora = attach_adapter(model, types.SimpleNamespace(
        load_in_4bit=True, load_in_8bit=False, gradient_checkpointing=False, gradient_checkpointing_kwargs=None,
        lora_model_dir=None, lora_target_modules=["q_proj", "v_proj", "down_proj"], lora_target_linear=None,
        lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_modules_to_save=None, peft_use_rslora=None,
        lora_fan_in_fan_out=None,
    ))
    assert isinstance(lora, peft.PeftModel)
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and "self_attn" in n for n in trained)
    lora.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the Trainer runs a bf16 4-bit model
        loss = lora(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)


def test_quantize_moe_experts_needs_a_quantized_adapter(tmp_path):
    from dft_peft.model.moe_quant import check_moe_quant

    with pytest.raises(UserError, match="load_in_4bit"):
        check_moe_quant(_cfg(quantize_moe_experts=True))
    with pytest.raises(UserError, match="adapter"):
        check_moe_quant(_cfg(quantize_moe_experts=True, load_in_4bit=True, adapter=None))
    check_moe_quant(_cfg(quantize_moe_experts=False))


def test_without_the_key_experts_stay_unquantized(tmp_path):
    tiny_qwen3_moe(tmp_path)
    model = load_4bit(tmp_path, _cfg(load_in_4bit=True))
    experts = model.model.layers[0].mlp.experts
    assert not hasattr(experts, "parametrizations")
    assert experts.gate_up_proj.dtype == torch.bfloat16  # what Axolotl's key exists for


# ----------------------------------------------------------------------------- llama4_linearized_experts


def tiny_llama4():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    config = Llama4TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        max_position_embeddings=128, attention_chunk_size=64, moe_layers=[0, 1], interleave_moe_layer_step=1,
    )
    return Llama4ForCausalLM(config).eval()


def save_linearized(model, path: Path):
    """Axolotl's linearized layout, written by hand: expert e's gate/up/down as [out, in] weights."""
    from safetensors.torch import save_file

    model.config.save_pretrained(path)
    inter = model.config.intermediate_size
    state = {}
    for key, value in model.state_dict().items():
        prefix, _, name = key.rpartition(".")
        if name == "gate_up_proj":
            for e in range(value.shape[0]):
                state[f"{prefix}.gate_projs.{e}.weight"] = value[e, :, :inter].T.contiguous()
                state[f"{prefix}.up_projs.{e}.weight"] = value[e, :, inter:].T.contiguous()
        elif name == "down_proj" and value.ndim == 3:
            for e in range(value.shape[0]):
                state[f"{prefix}.down_projs.{e}.weight"] = value[e].T.contiguous()
        else:
            state[key] = value.contiguous()
    state.pop("lm_head.weight", None) if model.config.tie_word_embeddings else None
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_llama4_linearized_experts_match_the_fused_model(tmp_path):
    from dft_peft.model.llama4_experts import LinearizedLlama4Experts
    from dft_peft.model.loading import Precision, load_model

    fused = tiny_llama4()
    save_linearized(fused, tmp_path)
    cfg = _cfg(llama4_linearized_experts=True, adapter="lora")
    model = load_model(cfg, tmp_path, list(range(128)), Precision(bf16=False, fp16=False)).eval()
    experts = model.model.layers[0].feed_forward.experts
    assert isinstance(experts, LinearizedLlama4Experts) and len(experts.gate_projs) == 4
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fused(ids).logits, atol=1e-5, rtol=1e-5)

    q = load_model(_cfg(llama4_linearized_experts=True, load_in_4bit=True), tmp_path, list(range(128)),
                   Precision(bf16=True, fp16=False))
    assert isinstance(q.model.layers[0].feed_forward.experts.down_projs[3], bnb.nn.Linear4bit)
    with torch.no_grad():
        err = (q(ids).logits.float() - fused(ids).logits).abs().mean() / fused(ids).logits.abs().mean()
    assert err < 0.2


def test_llama4_linearized_experts_refuses_a_fused_checkpoint_and_other_models(tmp_path):
    from dft_peft.model.loading import Precision, load_model

    fused = tiny_llama4()
    fused.save_pretrained(tmp_path / "fused")
    with pytest.raises(UserError, match="fused experts"):
        load_model(_cfg(llama4_linearized_experts=True), tmp_path / "fused", list(range(128)), Precision(False, False))
    tiny_qwen3_moe(tmp_path / "qwen")
    with pytest.raises(UserError, match="not a Llama 4"):
        load_model(_cfg(llama4_linearized_experts=True), tmp_path / "qwen", list(range(128)), Precision(False, False))


# ----------------------------------------------------------------------------- tokenizer_use_mistral_common


def tekken_folder(tmp_path: Path, version: str | None = None) -> Path:
    mistral_common = pytest.importorskip("mistral_common")
    shipped = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    folder = tmp_path / f"tok_{version or 'v3'}"
    folder.mkdir()
    if version is None:
        shutil.copy(shipped, folder / "tekken.json")
    else:
        data = json.loads(shipped.read_text())
        data["config"]["version"] = version
        (folder / "tekken.json").write_text(json.dumps(data))
    return folder


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "  spaced  text\n"}, {"role": "assistant", "content": "  résumé 日本語 🙂\n\n"}],
]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *CONVERSATIONS[0]]


@pytest.mark.parametrize("version", [None, "v7"])
def test_mistral_common_chat_rows_match_mistral_common(tmp_path, version):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from dft_peft.config.datasets import DatasetConfig
    from dft_peft.data.report import TokenizeReport
    from dft_peft.data.tokenize import TokenizeOptions, make_batch_fn
    from dft_peft.model.loading import load_tokenizer

    folder = tekken_folder(tmp_path, version)
    cfg = types.SimpleNamespace(tokenizer_use_mistral_common=True, tokenizer_config=None, special_tokens=None,
                                tokens=None, chat_template=None, chat_template_jinja=None, base_model="x")
    tok = load_tokenizer(cfg, folder)
    assert tok.padding_side == "right" and tok.pad_token is not None
    rows = CONVERSATIONS + ([WITH_SYSTEM] if version == "v7" else [])  # v3 puts the system prompt last
    fn = make_batch_fn(DatasetConfig(path="x.jsonl", type="chat_template"), tok, TokenizeOptions(sequence_len=512),
                       "x", TokenizeReport())
    out = fn({"messages": rows}, list(range(len(rows))))

    reference = MistralTokenizer.from_file(str(folder / "tekken.json"), mode=ValidationMode.finetuning)
    raw = reference.instruct_tokenizer.tokenizer
    for messages, ids, labels in zip(rows, out["input_ids"], out["labels"]):
        want = reference.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
        assert ids == want
        trained = [t for t, label in zip(ids, labels) if label != -100]
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        expected = [t for r in replies for t in (*raw.encode(r, bos=False, eos=False), raw.eos_id)]
        assert trained == expected


def test_mistral_common_refuses_what_axolotl_refuses(tmp_path):
    from dft_peft.model.mistral_tokenizer import check_mistral_options

    for key, value in (("special_tokens", {"pad_token": "<pad>"}), ("tokens", ["<x>"]), ("chat_template", "chatml")):
        cfg = types.SimpleNamespace(special_tokens=None, tokens=None, chat_template=None, chat_template_jinja=None)
        setattr(cfg, key, value)
        with pytest.raises(UserError, match=key):
            check_mistral_options(cfg)


def test_mistral_common_row_holding_control_token_text_fails_loudly(tmp_path):
    from dft_peft.config.datasets import DatasetConfig
    from dft_peft.data.report import TokenizeReport
    from dft_peft.data.tokenize import TokenizeOptions, make_batch_fn
    from dft_peft.model.mistral_tokenizer import load_mistral_tokenizer

    tok = load_mistral_tokenizer(tekken_folder(tmp_path))
    row = [{"role": "user", "content": "say it"}, {"role": "assistant", "content": "ok [INST] done"}]
    fn = make_batch_fn(DatasetConfig(path="x.jsonl", type="chat_template"), tok, TokenizeOptions(sequence_len=512),
                       "x", TokenizeReport())
    with pytest.raises(UserError, match="control token"):
        fn({"messages": [row]}, [0])


def test_missing_mistral_common_names_the_extra(monkeypatch):
    import importlib.util

    from dft_peft.model import mistral_tokenizer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mistral_common" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'dft-peft\[mistral\]'"):
        mistral_tokenizer.load_mistral_tokenizer("/nonexistent")


# ----------------------------------------------------------------------------- Axolotl's example configs

EXAMPLES = [
    ("qwen3-next__qwen3-next-80b-a3b-qlora.yaml", "quantize_moe_experts"),
    ("nemotron-h__nano-30b-a3b-qlora.yaml", "quantize_moe_experts"),
    ("llama-4__scout-qlora-single-h100-flex.yaml", "llama4_linearized_experts"),
    ("magistral__magistral-small-qlora.yaml", "tokenizer_use_mistral_common"),
    ("ministral3__ministral3-3b-qlora.yaml", "tokenizer_use_mistral_common"),
]


@pytest.mark.parametrize("name,key", EXAMPLES)
def test_axolotl_examples_with_these_keys_pass_the_key_stage(name, key):
    from dft_peft.config import load_config

    path = AXOLOTL_EXAMPLES / name
    assert yaml.safe_load(path.read_text())[key]
    try:
        cfg = load_config(path, overrides=["loss=dft"])
    except UserError as err:
        assert key not in str(err), err  # other keys of the example may still be refused
    else:
        assert getattr(cfg, key)
