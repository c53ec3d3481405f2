"""patch_model on real transformers models (tiny, random), plain, under peft LoRA and in 4-bit."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES, batch, tiny_causal_lm

import dft_peft
from dft_peft.losses.patch import patch_state

peft = pytest.importorskip("peft")


def reference_from_logits(logits, labels, loss="dft", num_items=None):
    """Float64 objective from full logits and HF labels, written independently of dft_peft."""
    logits = logits[:, :-1].double()
    targets = labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    per_token = -logp if loss == "sft" else -(logp.exp().detach() * logp)
    return (per_token * mask).sum() / (mask.sum() if num_items is None else num_items)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("loss", ["sft", "dft"])
def test_patched_loss_matches_unpatched_logits(arch, loss):
    model = tiny_causal_lm(arch)
    inputs = batch()
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    expected = reference_from_logits(logits, inputs["labels"], loss)
    dft_peft.patch_model(model, loss=loss)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits is None  # no full logits on the loss path
    torch.testing.assert_close(out.loss.double(), expected, atol=1e-5, rtol=1e-5)


def test_without_labels_behaves_exactly_as_before_and_unpatch_restores():
    model = tiny_causal_lm("llama")
    inputs = batch()
    del inputs["labels"]
    with torch.no_grad():
        before = model(**inputs).logits
        generated = model.generate(inputs["input_ids"][:1], max_new_tokens=5, do_sample=False)
    original_forward = model.forward
    dft_peft.patch_model(model, loss="dft")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
        assert torch.equal(model.generate(inputs["input_ids"][:1], max_new_tokens=5, do_sample=False), generated)
    dft_peft.unpatch_model(model)
    assert "forward" not in model.__dict__ and patch_state(model) is None
    assert model.forward == original_forward
    with torch.no_grad():
        assert model(**batch()).logits is not None  # the original loss path is back


def test_patch_again_switches_objective():
    model = tiny_causal_lm("llama")
    inputs = batch()
    dft_peft.patch_model(model, loss="sft")
    with torch.no_grad():
        sft = model(**inputs).loss
    dft_peft.patch_model(model, loss="dft")
    with torch.no_grad():
        dft = model(**inputs).loss
    assert not torch.isclose(sft, dft)
    with torch.no_grad():
        logits = tiny_causal_lm("llama")(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    torch.testing.assert_close(dft.double(), reference_from_logits(logits, inputs["labels"]), atol=1e-5, rtol=1e-5)


def lora(model):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, config)
    # B starts at zero; give it values so LoRA changes the output and every LoRA weight gets a gradient.
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("patch_before_peft", [False, True])
def test_lora_loss_and_gradients_match_compute_loss_func(patch_before_peft):
    inputs = batch(rows=3)
    num_items = 40
    reference = lora(tiny_causal_lm("llama")).train()
    loss_fn = dft_peft.compute_loss_func("dft")
    out = reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    ref_loss = loss_fn(out, inputs["labels"], num_items_in_batch=num_items)
    ref_loss.backward()
    # and compute_loss_func itself against the independent float64 formula
    torch.testing.assert_close(
        ref_loss.double(), reference_from_logits(out.logits, inputs["labels"], num_items=num_items),
        atol=1e-6, rtol=1e-6,
    )

    base = tiny_causal_lm("llama")
    if patch_before_peft:
        model = lora(dft_peft.patch_model(base, loss="dft")).train()
    else:
        model = dft_peft.patch_model(lora(base), loss="dft").train()
    loss = model(**inputs, num_items_in_batch=num_items).loss
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    got, expected = lora_grads(model), lora_grads(reference)
    assert got.keys() == expected.keys() and len(got) == 12
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_modules_to_save_lm_head_gets_gradient():
    inputs = batch()
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    reference = peft.get_peft_model(tiny_causal_lm("qwen2"), config).train()
    out = reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    dft_peft.compute_loss_func("dft")(out, inputs["labels"]).backward()
    model = dft_peft.patch_model(peft.get_peft_model(tiny_causal_lm("qwen2"), config), loss="dft").train()
    model(**inputs).loss.backward()
    got, expected = lora_grads(model), lora_grads(reference)
    head = [n for n in got if "lm_head" in n]
    assert head, "lm_head copy should be trainable"
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_train_stats_are_collected_per_mode():
    model = dft_peft.patch_model(tiny_causal_lm("llama"), loss="dft")
    state = patch_state(model)
    model.train()
    model(**batch())
    model.eval()
    with torch.no_grad():
        model(**batch(seed=1))
    train, evaluation = state.train_stats.pop(), state.eval_stats.pop()
    assert train["tokens"] == evaluation["tokens"] == 13
    assert train["objective"] < train["ce"]  # DFT reads lower than CE: both are logged


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_causal_lm("llama", hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def test_real_4bit_nf4_qlora_on_cpu(tiny_llama_dir):
    """Real bitsandbytes NF4 weights on CPU (no mock): patched loss and LoRA grads equal the
    unpatched 4-bit model's logits through compute_loss_func and the float64 formula."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def load():
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quant, dtype=torch.float32)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return lora(model).train()

    reference = load()
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in reference.modules())
    inputs = batch()
    out = reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    ref_loss = dft_peft.compute_loss_func("dft")(out, inputs["labels"])
    ref_loss.backward()
    torch.testing.assert_close(
        ref_loss.double(), reference_from_logits(out.logits, inputs["labels"]), atol=1e-6, rtol=1e-6
    )
    model = dft_peft.patch_model(load(), loss="dft")
    loss = model(**inputs).loss
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    got, expected = lora_grads(model), lora_grads(reference)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
