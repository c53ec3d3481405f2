"""`gradient_checkpointing: offload` gives the loss and LoRA gradients of plain checkpointing and
of no checkpointing (on CPU; the memory it saves is measured by benchmarks/gpu/e2e.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_models import batch, tiny_causal_lm

import dft_peft
from dft_peft.memory.activations import apply_activation_memory
from dft_peft.model import adapter
from dft_peft.memory.offload import offload_checkpointed_inputs, offloaded_checkpoint


def adapter_cfg(checkpointing, dropout: float) -> SimpleNamespace:
    return SimpleNamespace(
        load_in_4bit=False, load_in_8bit=False, gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs=None, lora_model_dir=None, lora_target_modules=None,
        lora_target_linear=True, lora_r=4, lora_alpha=8, lora_dropout=dropout, lora_modules_to_save=None,
    )


def loss_and_lora_grads(checkpointing, *, dropout: float = 0.1, arch: str = "llama"):
    model = tiny_causal_lm(arch, seed=3, num_hidden_layers=3)
    cfg = adapter_cfg(checkpointing, dropout)
    model = adapter.attach_adapter(model, cfg)
    apply_activation_memory(model, cfg)
    torch.manual_seed(7)
    with torch.no_grad():  # peft starts B at zero, which would leave every A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    dft_peft.patch_model(model, loss="dft")
    model.train()
    torch.manual_seed(11)  # same dropout masks in every mode (the recomputation must replay them)
    out = model(**batch(seed=5, rows=2, length=16))
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_offload_matches_plain_and_no_checkpointing(arch):
    ref_loss, ref_grads, _ = loss_and_lora_grads(False, arch=arch)
    plain_loss, plain_grads, _ = loss_and_lora_grads(True, arch=arch)
    off_loss, off_grads, model = loss_and_lora_grads("offload", arch=arch)
    layers = model.base_model.model.model.layers
    assert all(layer._gradient_checkpointing_func is offloaded_checkpoint for layer in layers)
    assert ref_grads.keys() == off_grads.keys() and len(off_grads) == 3 * 7 * 2
    torch.testing.assert_close(off_loss, ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(off_loss, plain_loss, rtol=1e-6, atol=1e-7)
    for name, ref in ref_grads.items():
        assert ref.abs().sum() > 0, name
        torch.testing.assert_close(off_grads[name], ref, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(off_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_offload_keeps_layer_inputs_off_the_autograd_graph():
    """What the GPU saves: the layer's input is held as a host copy, not as a saved tensor."""
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = offloaded_checkpoint(layer, x)
    assert not saved  # nothing of the layer kept for backward
    y.sum().backward()
    ref = x.detach().clone().requires_grad_()
    layer.zero_grad()
    w_grad = layer.weight.grad
    layer(ref).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)
    assert w_grad is None or torch.is_tensor(w_grad)


def test_offload_needs_checkpointing_enabled():
    with pytest.raises(ValueError, match="enable gradient checkpointing first"):
        offload_checkpointed_inputs(tiny_causal_lm("llama"))


def test_offload_under_cpu_autocast_matches_plain_checkpointing():
    """bf16 autocast is restored for the recomputation: same loss and gradients as plain
    checkpointing under the same autocast."""
    results = []
    for mode in (True, "offload"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_lora_grads(mode, dropout=0.0))
    (plain_loss, plain_grads, _), (off_loss, off_grads, _) = results
    torch.testing.assert_close(off_loss, plain_loss)
    for name, ref in plain_grads.items():
        torch.testing.assert_close(off_grads[name], ref, msg=name)


def test_dft_peft_train_with_offload_logs_the_losses_of_plain_checkpointing(tmp_path_factory, monkeypatch):
    """Through `dft-peft train` (Trainer, peft, the patched loss): two steps with offloaded
    checkpointing log the same losses as with plain checkpointing."""
    import tiny_run

    from dft_peft.memory import offload
    from dft_peft.config import Config
    from dft_peft.train import train

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return offloaded_checkpoint(*args, **kwargs)

    monkeypatch.setattr(offload, "offloaded_checkpoint", counted)

    model_dir = tiny_run.tiny_model_dir(tmp_path_factory)
    data = tiny_run.write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", tiny_run.alpaca_rows(8))
    losses = {}
    for mode in (True, "offload"):
        out = tmp_path_factory.mktemp(f"out-{mode}")
        cfg = Config.from_dict(tiny_run.config_dict(model_dir, data, out, gradient_checkpointing=mode, max_steps=2))
        result = train(cfg)
        losses[mode] = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses["offload"]) == 2 and len(calls) >= 2 * 2  # every layer, every step
    assert losses["offload"] == pytest.approx(losses[True], rel=1e-5)
