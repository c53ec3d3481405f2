"""QLoRA in bf16: the frozen embeddings and LM head go back to bf16 after peft's
`prepare_model_for_kbit_training` casts them to fp32 (issue 8: memory of the residual stream and
of a second, fp32 head). Real bitsandbytes NF4 on CPU; the reference is the same model left as
peft prepares it (fp32 embeddings and head)."""

from __future__ import annotations

import types

import pytest
import torch
from tiny_models import tiny_causal_lm

from dft_peft.losses import patch_model
from dft_peft.model.adapter import restore_half_precision_embeddings

pytest.importorskip("bitsandbytes")


def _prepared_qlora(folder, lora_seed: int = 0):
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16)
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _lora_loss_and_grads(model):
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    patch_model(model, loss="dft")
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :6] = -100
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten().float() for n, p in model.named_parameters() if p.requires_grad])
    return loss.detach().float(), grads


def test_frozen_embeddings_and_head_return_to_bf16_and_the_loss_agrees(tmp_path):
    tiny_causal_lm("llama", seed=3, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path / "m")
    cfg = types.SimpleNamespace(lora_modules_to_save=None)

    reference = _prepared_qlora(tmp_path / "m")
    assert reference.get_output_embeddings().weight.dtype == torch.float32  # what peft leaves
    ref_loss, ref_grads = _lora_loss_and_grads(reference)

    model = _prepared_qlora(tmp_path / "m")
    assert sorted(restore_half_precision_embeddings(model, cfg)) == ["embed_tokens", "lm_head"]
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    loss, grads = _lora_loss_and_grads(model)

    assert torch.isfinite(loss) and torch.allclose(loss, ref_loss, rtol=2e-2), (loss, ref_loss)
    cosine = torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0)
    assert cosine > 0.99, cosine


def test_a_trained_head_keeps_fp32(tmp_path):
    tiny_causal_lm("llama", seed=3, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path / "m")
    model = _prepared_qlora(tmp_path / "m")
    cast = restore_half_precision_embeddings(model, types.SimpleNamespace(lora_modules_to_save=["lm_head"]))
    assert cast == ["embed_tokens"] and model.get_output_embeddings().weight.dtype == torch.float32


def _layer_input_dtypes(model) -> set[torch.dtype]:
    """The dtype of every decoder layer's input (the residual stream), seen by forward hooks."""
    seen: set[torch.dtype] = set()
    decoder = model.get_decoder()  # the decoder alone: the head is the fused loss's business

    def record(module, args, kwargs):
        seen.add((args[0] if args else kwargs["hidden_states"]).dtype)

    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in decoder.layers]
    with torch.no_grad():
        decoder(input_ids=torch.randint(0, model.config.vocab_size, (1, 8)))
    for hook in hooks:
        hook.remove()
    return seen


def test_frozen_norms_return_to_bf16_so_the_residual_stream_stays_bf16(tmp_path):
    """peft leaves norm weights fp32; a Llama RMSNorm then returns fp32, Linear4bit returns its
    input's dtype, and every layer input after the first becomes fp32 (twice the memory of each
    checkpointed input). The reference is peft's own preparation (fp32 norms): same loss and LoRA
    gradients within bf16 precision."""
    from dft_peft.model.adapter import restore_half_precision_norms

    tiny_causal_lm("llama", seed=3, hidden_size=128, intermediate_size=256, num_hidden_layers=3).save_pretrained(tmp_path / "m")
    cfg = types.SimpleNamespace(lora_modules_to_save=None)

    reference = _prepared_qlora(tmp_path / "m")
    restore_half_precision_embeddings(reference, cfg)
    assert torch.float32 in _layer_input_dtypes(reference)  # the cost the cast removes
    ref_loss, ref_grads = _lora_loss_and_grads(reference)

    model = _prepared_qlora(tmp_path / "m")
    restore_half_precision_embeddings(model, cfg)
    assert restore_half_precision_norms(model) == 3 * 2 + 1  # two per layer and the final norm
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "norm" in n)
    assert _layer_input_dtypes(model) == {torch.bfloat16}
    loss, grads = _lora_loss_and_grads(model)

    assert torch.isfinite(loss) and torch.allclose(loss, ref_loss, rtol=2e-2), (loss, ref_loss)
    cosine = torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0)
    assert cosine > 0.99, cosine


def test_norms_stay_fp32_without_a_half_precision_compute_dtype(tmp_path):
    from dft_peft.model.adapter import restore_half_precision_norms

    model = tiny_causal_lm("llama", seed=3, hidden_size=128, intermediate_size=256)
    assert restore_half_precision_norms(model) == 0
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
