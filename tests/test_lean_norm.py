"""Memory-lean RMSNorm (dft_peft.memory.lean_norm) against Hugging Face's own norms, on real tiny
models with real peft LoRA on every linear layer: loss, every LoRA gradient and the gradient at
the input embeddings must be the same, per model family, alone and with gradient checkpointing and
offload; and the meta-device rehearsal must show the fp32 copies gone."""

from __future__ import annotations

import copy
import pickle
from types import SimpleNamespace

import peft
import pytest
import torch
import transformers
from tiny_models import COMMON, batch, tiny_family_lm

from dft_peft.memory import lean_norm
from dft_peft.memory.activations import apply_activation_memory
from dft_peft.memory.lean_norm import LeanRMSNormFunction, apply_lean_norm

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gemma3"]
NORMS_PER_LAYER = {"qwen3": 4, "gemma2": 4, "gemma3": 6}  # q/k norms, pre/post feed-forward norms


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    return tiny_family_lm(arch, seed)


def lora(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(2)  # B starts at zero: give it values so every LoRA weight gets a gradient
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():  # Gemma's weights start at zero (scale 1 + w): make the weight matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(std=0.5)
    return model.train()


def step(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """One forward + backward from the input embeddings: (loss, LoRA grads, input-embedding grad)."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["labels"])
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, embeds.grad.detach().clone()


def assert_close(got, expected, rel: float) -> None:
    """Each tensor within `rel` of the reference, relative to the reference's largest value."""
    (loss, grads, embeds), (ref_loss, ref_grads, ref_embeds) = got, expected
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, a, b in [("loss", loss, ref_loss), ("embeds", embeds, ref_embeds)] + [
        (n, grads[n], ref_grads[n]) for n in grads
    ]:
        assert a.dtype == b.dtype, name
        scale = b.double().abs().max().item()
        assert scale > 0, name
        assert (a.double() - b.double()).abs().max().item() <= rel * scale, name


def lean_count(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if getattr(m, "_lean_form", None))


@pytest.mark.parametrize("arch", FAMILIES)
def test_lean_equals_hf_norm_per_family(arch):
    model = lora(build(arch).double())
    inputs = batch(length=12)
    reference = step(model, inputs)
    keys = list(model.state_dict())
    expected = COMMON["num_hidden_layers"] * NORMS_PER_LAYER.get(arch, 2) + 1
    assert apply_lean_norm(model) == expected == lean_count(model)
    assert apply_lean_norm(model) == 0  # idempotent
    assert list(model.state_dict()) == keys
    assert_close(step(model, inputs), reference, rel=1e-6)


@pytest.mark.parametrize("checkpointing", [True, "offload"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "phi3"])
def test_with_checkpointing_and_offload(arch, checkpointing):
    model = lora(build(arch).double())
    inputs = batch(length=12)
    reference = step(model, inputs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    applied = apply_activation_memory(model, SimpleNamespace(gradient_checkpointing=checkpointing))
    assert any("RMSNorm" in line for line in applied) and lean_count(model) > 0
    assert_close(step(model, inputs), reference, rel=1e-6)


def test_not_applied_without_checkpointing():
    model = lora(build("llama"))
    assert apply_activation_memory(model, SimpleNamespace(gradient_checkpointing=False)) == []
    assert lean_count(model) == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bf16_within_bf16_tolerance(arch):
    model = lora(build(arch)).to(torch.bfloat16)
    inputs = batch(length=12)
    reference = step(model, inputs)
    apply_lean_norm(model)
    assert_close(step(model, inputs), reference, rel=1e-2)


@pytest.mark.parametrize("cls_name", ["LlamaRMSNorm", "Gemma2RMSNorm"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_bf16_norm_alone_with_trainable_weight(cls_name, weight_dtype):
    """The module alone, in the dtypes a QLoRA run mixes (bf16 input, fp32 or bf16 weight), with
    the weight trainable too; fp32 accumulation may only differ by bf16 rounding."""
    cls = getattr(transformers, cls_name, None) or getattr(
        __import__(f"transformers.models.{cls_name[:-7].lower()}.modeling_{cls_name[:-7].lower()}", fromlist=["x"]),
        cls_name,
    )
    torch.manual_seed(0)
    norm = cls(64)
    with torch.no_grad():
        norm.weight.normal_()
    norm = norm.to(weight_dtype)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    results = []
    for klass in (cls, lean_norm.lean_class(cls)):
        norm.__class__ = klass
        out = norm(x)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        results.append((out, *torch.autograd.grad(out, (x, norm.weight), g)))
    for got, ref in zip(results[1], results[0]):
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=1e-2 * ref.float().abs().max().item())


def test_chunked_rows_equal_one_chunk(monkeypatch):
    x = torch.randn(2, 37, 16, dtype=torch.float32, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    g = torch.randn(2, 37, 16)
    for gemma in (False, True):
        whole = LeanRMSNormFunction.apply(x, w, 1e-6, gemma)
        grads = torch.autograd.grad(whole, (x, w), g)
        monkeypatch.setattr(lean_norm, "CHUNK_ELEMENTS", 16 * 5)  # 5 rows per chunk: 15 chunks, uneven
        chunked = LeanRMSNormFunction.apply(x, w, 1e-6, gemma)
        chunked_grads = torch.autograd.grad(chunked, (x, w), g)
        monkeypatch.undo()
        torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
        torch.testing.assert_close(chunked_grads[0], grads[0], rtol=0, atol=0)  # per row: identical
        torch.testing.assert_close(chunked_grads[1], grads[1], rtol=1e-5, atol=1e-5)  # summed over rows: order


def test_unknown_and_hooked_norms_are_left_alone():
    class MyRMSNorm(transformers.models.llama.modeling_llama.LlamaRMSNorm):  # a subclass may differ
        pass

    model = torch.nn.Sequential(MyRMSNorm(8), transformers.models.llama.modeling_llama.LlamaRMSNorm(8),
                                transformers.models.llama.modeling_llama.LlamaRMSNorm(8))
    model[2].forward = lambda x: x  # another library's hook
    assert apply_lean_norm(model) == 1
    assert type(model[0]) is MyRMSNorm and type(model[1]).__name__ == "LeanLlamaRMSNorm"
    copy.deepcopy(model)
    assert type(pickle.loads(pickle.dumps(model[1]))) is type(model[1])


def test_rehearsal_shows_the_fp32_copies_gone(monkeypatch):
    """Llama-3.1-8B shape, 2 of its layers, 32k tokens (the recomputed layer is the peak there): the recomputed layer's two fp32 norm inputs
    (2 x N x H x 4 bytes) leave the saved activations, and the norm's fp32 backward temporaries
    shrink to row chunks."""
    pytest.importorskip("bitsandbytes")
    from test_long_context import LLAMA_31_8B, config

    from dft_peft.memory import activations
    from dft_peft.memory.rehearsal import Rehearser

    n, hidden = 32768, LLAMA_31_8B["hidden_size"]
    cfg = config(activation_offloading=True, tiled_mlp=True)
    lean = Rehearser(cfg, LLAMA_31_8B, layers=2).step(n)
    monkeypatch.setattr(activations, "apply_lean_norm", lambda model: 0)
    plain = Rehearser(cfg, LLAMA_31_8B, layers=2).step(n)
    saved = "activations (saved for backward)"
    assert plain.parts[saved] - lean.parts[saved] >= 0.99 * 2 * n * hidden * 4
    assert plain.total - lean.total >= 4 * n * hidden * 4
