"""Tiled MLP (dft_peft.memory.tiled_mlp) against the untiled model, on real tiny models with real
peft LoRA on every linear layer: loss, every LoRA gradient and the gradient at the input
embeddings must be the same, per model family, under dropout, composed with gradient
checkpointing (both flavours) and with real bitsandbytes 4-bit base weights on CPU."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from tiny_models import COMMON, batch, tiny_causal_lm, tiny_family_lm

from dft_peft.errors import UserError
from dft_peft.memory.tiled_mlp import (
    DEFAULT_SHARD_BUDGET_BYTES,
    SUPPORTED_MLPS,
    TiledMLPFunction,
    apply_tiled_mlp,
    mlp_shard_count,
)

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"]
EXACT = {"rtol": 1e-10, "atol": 1e-12}  # float64: only summation order differs


def build(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    return tiny_family_lm(arch, seed, **overrides)


def lora(model: torch.nn.Module, dropout: float = 0.0) -> torch.nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, config)
    torch.manual_seed(2)  # B starts at zero: give it values so every LoRA weight gets a gradient
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def step(model: torch.nn.Module, inputs: dict, seed: int = 123) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """One forward + backward from the input embeddings: (loss, LoRA grads, input-embedding grad)."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(
        inputs_embeds=embeds,
        attention_mask=inputs["attention_mask"],
        labels=inputs["labels"],
    )
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "mlp" in n), "an MLP LoRA weight got no gradient"
    return out.loss.detach(), grads, embeds.grad.detach().clone()


def assert_same(got, expected, **tol) -> None:
    (loss, grads, embeds), (ref_loss, ref_grads, ref_embeds) = got, expected
    torch.testing.assert_close(loss, ref_loss, **tol)
    assert grads.keys() == ref_grads.keys() and any("mlp" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name, **tol)
    torch.testing.assert_close(embeds, ref_embeds, **tol)


def mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in SUPPORTED_MLPS]


@pytest.mark.parametrize("arch", FAMILIES)
def test_tiled_equals_untiled_per_family(arch):
    model = lora(build(arch).double())
    inputs = batch(length=12)
    reference = step(model, inputs)
    assert apply_tiled_mlp(model, num_shards=5) == 2  # 12 positions -> uneven shards 3,3,2,2,2
    assert_same(step(model, inputs), reference, **EXACT)


def naive_sharded(model: torch.nn.Module, n: int) -> None:
    """The independent reference: each MLP runs its shards under plain autograd and concatenates
    them, drawing dropout masks in the same order as the tiled forward."""
    for mlp in mlps(model):
        original = mlp.forward
        mlp.forward = lambda x, run=original: torch.cat([run(s) for s in x.tensor_split(n, dim=-2)], dim=-2)


@pytest.mark.parametrize("checkpointing", [None, False, True], ids=["plain", "non-reentrant", "reentrant"])
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_dropout_and_gradient_checkpointing(arch, checkpointing):
    model = lora(build(arch).double(), dropout=0.3)
    inputs = batch(length=12)
    naive_sharded(model, 4)
    reference = step(model, inputs)
    for mlp in mlps(model):
        del mlp.forward  # back to the class's forward
    assert not torch.allclose(step(model, inputs)[0], reference[0])  # dropout is live and shard-shaped
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    apply_tiled_mlp(model, num_shards=4)
    assert_same(step(model, inputs), reference, **EXACT)
    assert_same(step(model, inputs), reference, **EXACT)  # the global RNG was left as found


def test_input_without_grad_and_gradcheck():
    """When the MLP input does not require grad, LoRA weights still get their gradients and the
    input gets None; the input gradient itself passes torch.autograd.gradcheck."""
    model = lora(build("llama").double())
    mlp = mlps(model)[0]
    x = torch.randn(2, 7, COMMON["hidden_size"], dtype=torch.float64)
    mlp(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.requires_grad}
    mlp.zero_grad(set_to_none=True)
    out = TiledMLPFunction.apply(mlp.forward, 3, x, torch.empty(0, requires_grad=True))
    out.square().sum().backward()
    assert x.grad is None
    for name, p in mlp.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], **EXACT)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: TiledMLPFunction.apply(mlp.forward, 3, t, None), (xg,))


def test_real_4bit_qlora_on_cpu(tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_causal_lm("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)
    model = lora(peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False))
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * 7
    inputs = batch(length=12)
    reference = step(model, inputs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert apply_tiled_mlp(model, num_shards=3) == 2
    assert_same(step(model, inputs), reference, rtol=1e-5, atol=1e-6)


def test_automatic_shard_count_and_idempotence():
    model = lora(build("qwen2").double())
    inputs = batch(length=12)
    reference = step(model, inputs)
    # one call holds 3 x (2 rows x 12 positions) x 64 x 8 bytes = 36 KiB: a 12 KiB budget means 3 shards
    assert apply_tiled_mlp(model, shard_budget_bytes=12 * 1024) == 2
    mlp = mlps(model)[0]
    untiled = mlp._dft_untiled_forward
    assert untiled.__func__ is type(mlp).forward
    calls = []
    mlp._dft_untiled_forward = lambda x: calls.append(x.shape[-2]) or untiled(x)
    got = step(model, inputs)
    assert calls == [4, 4, 4] * 2  # forward, then the backward's recomputation
    mlp._dft_untiled_forward = untiled
    assert_same(got, reference, **EXACT)
    assert apply_tiled_mlp(model, num_shards=100) == 2  # again: settings change, no double wrapping
    assert mlp._dft_untiled_forward is untiled and mlp._dft_tiling.num_shards == 100
    assert_same(step(model, inputs), reference, **EXACT)  # 100 shards clamp to 12 positions
    with torch.no_grad():  # no-grad path (eval, first pass of reentrant checkpointing) is sharded too
        model.eval()
        tiled = model(**inputs).logits
        assert apply_tiled_mlp(model, num_shards=1) == 2
        torch.testing.assert_close(tiled, model(**inputs).logits, **EXACT)


def test_shard_count_rule():
    assert mlp_shard_count(12, 64, 4, num_shards=5) == 5
    assert mlp_shard_count(12, 64, 4, num_shards=50) == 12
    assert mlp_shard_count(1, 14336, 2) == 1
    assert mlp_shard_count(100, 64, 4) == 1  # tiny: one shard, the original forward
    # Llama-3-8B in bf16 under the 256 MiB default: 4k tokens -> 2 shards, 32k -> 11
    assert DEFAULT_SHARD_BUDGET_BYTES == 256 * 2**20
    assert mlp_shard_count(4096, 14336, 2) == 2
    assert mlp_shard_count(32768, 14336, 2) == 11
    assert mlp_shard_count(4096, 14336, 2, batch_size=4) == 6


def test_unsupported_models_raise_user_error():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=128))
    with pytest.raises(UserError, match=r"`gpt2`.*llama"):
        apply_tiled_mlp(gpt2)

    class MoeBlock(torch.nn.Module):
        pass

    class FooDecoderLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MoeBlock()

    with pytest.raises(UserError, match=r"MoeBlock.*qwen3.*phi3"):
        apply_tiled_mlp(torch.nn.Sequential(FooDecoderLayer()))
    with pytest.raises(UserError, match="num_shards"):
        apply_tiled_mlp(build("llama"), num_shards=0)
