"""asft, prob, power and per-token weights against float64 naive references."""

from __future__ import annotations

import pytest
import torch
from test_losses import grads_of, naive_loss, random_case
from tiny_models import batch, tiny_causal_lm

import dft_peft
from dft_peft.errors import UserError
from dft_peft.losses.registry import validate_loss_params

peft = pytest.importorskip("peft")


def naive_family(hidden, weight, labels, loss, *, ref_hidden=None, lam=0.1, q=0.5, token_weights=None):
    logits = (hidden.double() @ weight.double().t())[:, :-1]
    targets = labels[:, 1:]
    mask = (targets != -100).double()
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    p = logp.exp()
    if loss == "prob":
        per_token = 1 - p
    elif loss == "power":
        per_token = -(p**q - 1) / q
    elif loss == "asft":
        # the anchor is a fixed target: no gradient flows through the reference model
        ref_logp = torch.log_softmax((ref_hidden.double() @ weight.detach().double().t())[:, :-1], -1)
        kl = (ref_logp.exp() * (ref_logp - logp_all)).sum(-1)
        per_token = -(p.detach() * logp) + lam * kl
    if token_weights is not None:
        per_token = per_token * token_weights[:, 1:].double()
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("loss,kwargs,ref_kwargs", [
    ("prob", {}, {}),
    ("power", {"power_q": 0.3}, {"q": 0.3}),
    ("power", {"power_q": 1.0}, {"q": 1.0}),
    ("asft", {"asft_lambda": 0.25}, {"lam": 0.25}),
])
def test_values_and_gradients_match_float64(loss, kwargs, ref_kwargs):
    h, w, labels = random_case(21, 2, 15, 16, 37, dtype=torch.float64)
    ref_h = None
    if loss == "asft":
        ref_h = h.detach() + 0.3 * torch.randn_like(h)
        kwargs = {**kwargs, "ref_hidden_states": ref_h}
        ref_kwargs = {**ref_kwargs, "ref_hidden": ref_h}
    got, grads = grads_of(lambda: dft_peft.fused_linear_loss(h, w, labels, loss, chunk_size=4, **kwargs), h, w)
    ref, ref_grads = grads_of(lambda: naive_family(h, w, labels, loss, **ref_kwargs), h, w)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_prob_gradient_equals_dft_gradient():
    h, w, labels = random_case(22, 2, 11, 8, 23, dtype=torch.float64)
    _, prob_grads = grads_of(lambda: dft_peft.fused_linear_loss(h, w, labels, "prob"), h, w)
    _, dft_grads = grads_of(lambda: naive_loss(h, w, labels, "dft"), h, w)
    for a, b in zip(prob_grads, dft_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_power_approaches_sft_as_q_goes_to_zero():
    h, w, labels = random_case(23, 2, 11, 8, 23, dtype=torch.float64)
    small_q = dft_peft.fused_linear_loss(h, w, labels, "power", power_q=1e-7)
    torch.testing.assert_close(small_q, naive_loss(h, w, labels, "sft"), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="power_q"):
        validate_loss_params("power", {"power_q": 0})


def test_asft_lambda_zero_equals_dft():
    h, w, labels = random_case(24, 2, 13, 8, 29, dtype=torch.float64)
    ref_h = torch.randn_like(h)
    got = dft_peft.fused_linear_loss(h, w, labels, "asft", asft_lambda=0.0, ref_hidden_states=ref_h)
    torch.testing.assert_close(got, naive_loss(h, w, labels, "dft"), atol=1e-12, rtol=1e-12)


def test_token_weights_of_one_reproduce_unweighted_and_weights_scale_rows():
    h, w, labels = random_case(25, 3, 10, 8, 19, dtype=torch.float64)
    ones = torch.ones(labels.shape, dtype=torch.float64)
    torch.testing.assert_close(
        dft_peft.fused_linear_loss(h, w, labels, "dft", token_weights=ones), naive_loss(h, w, labels, "dft")
    )
    row_weights = torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64)[:, None].expand_as(ones)
    got, grads = grads_of(lambda: dft_peft.fused_linear_loss(h, w, labels, "dft", token_weights=row_weights), h, w)
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()

    def reference():
        logits = (h2 @ w2.t())[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        per_token = -(logp.exp().detach() * logp) * row_weights[:, 1:]
        return (per_token * mask).sum() / mask.sum()

    ref, ref_grads = grads_of(reference, h2, w2)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_asft_kl_is_zero_when_lora_b_is_zero_and_positive_after():
    """With B = 0 the adapted model equals the base: the anchor term is exactly zero, so asft = dft."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(tiny_causal_lm("llama"), config)
    inputs = batch()
    dft_peft.patch_model(model, loss="dft")
    with torch.no_grad():
        dft_loss = model(**inputs).loss
    dft_peft.patch_model(model, loss="asft", asft_lambda=10.0)
    with torch.no_grad():
        asft_loss = model(**inputs).loss
    assert asft_loss.item() == dft_loss.item()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        moved_asft = model(**inputs).loss
        dft_peft.patch_model(model, loss="dft")
        moved_dft = model(**inputs).loss
    assert moved_asft.item() > moved_dft.item()  # KL > 0 once the adapter changes the model
    # the adapters are re-enabled after the reference pass
    assert all(not m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))


def test_asft_without_adapter_is_a_clear_error():
    model = dft_peft.patch_model(tiny_causal_lm("llama"), loss="asft")
    with pytest.raises(ValueError, match="peft adapter"):
        model(**batch())


@pytest.mark.parametrize("loss,kwargs", [("sft", {}), ("dft", {"dft_alpha": 0.6}), ("prob", {}), ("power", {"power_q": 0.4})])
@pytest.mark.parametrize("fast", [True, False])
def test_fast_logp_path_and_general_autograd_path_both_match_float64(loss, kwargs, fast):
    """Objectives of log p have an in-place analytic gradient; the general path runs autograd
    over the logits. Both must equal the float64 reference."""
    import dataclasses

    from dft_peft.losses.fused import fused_loss_from_plan, make_plan

    h, w, labels = random_case(26, 2, 17, 16, 41, dtype=torch.float64)
    plan = dataclasses.replace(make_plan(loss, kwargs, chunk_size=5), fast=fast)
    got, grads = grads_of(lambda: fused_loss_from_plan(plan, h, w, labels), h, w)
    if loss in ("sft", "dft"):
        ref, ref_grads = grads_of(lambda: naive_loss(h, w, labels, loss, alpha=kwargs.get("dft_alpha", 1.0)), h, w)
    else:
        ref, ref_grads = grads_of(lambda: naive_family(h, w, labels, loss, q=kwargs.get("power_q", 0.5)), h, w)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
