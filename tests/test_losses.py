"""The fused loss against independent references: float64 naive full logits, and TRL's formula."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import dft_peft
from dft_peft.errors import UserError
from dft_peft.losses import registry

IGNORE = -100


def naive_loss(hidden, weight, labels, loss, *, bias=None, num_items=None, alpha=1.0, softcap=None):
    """Float64 full-logits reference written from the paper's equations, not from our code."""
    h = hidden.double()
    logits = h @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits[..., :-1, :]
    targets = labels[..., 1:]
    mask = targets != IGNORE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if loss == "sft":
        per_token = -logp
    else:
        weight_p = alpha * logp.exp().detach() + (1 - alpha)
        per_token = -weight_p * logp
    total = (per_token * mask).sum()
    denom = mask.sum() if num_items is None else num_items
    return total / max(int(denom), 1)


def trl_dft_loss(logits, labels, num_items_in_batch):
    """TRL SFTTrainer(loss_type="dft"): -exp(logp).detach() * logp, summed, / num_items_in_batch."""
    logits = logits[..., :-1, :].double()
    labels = labels[..., 1:]
    mask = labels != IGNORE
    log_probs = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    log_probs = log_probs * mask
    per_token_loss = -log_probs * log_probs.exp().detach()
    return per_token_loss.sum() / torch.as_tensor(num_items_in_batch).clamp(min=1)


def random_case(seed, batch, seq, hidden, vocab, dtype=torch.float32, masked_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(batch, seq, hidden, generator=g) * 0.5).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < masked_frac] = IGNORE
    return h.requires_grad_(), w.requires_grad_(), labels


def grads_of(fn, *tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    out.backward()
    return out.detach(), [t.grad.clone() for t in tensors]


SHAPES = [(1, 5, 8, 11), (2, 17, 16, 37), (3, 9, 32, 101), (2, 64, 24, 257)]


@pytest.mark.parametrize("loss", ["sft", "dft"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_fp32_matches_float64_naive(loss, shape, chunk_size):
    h, w, labels = random_case(hash((loss, shape)) % 1000, *shape)
    got, (gh, gw) = grads_of(
        lambda: dft_peft.fused_linear_loss(h, w, labels, loss, chunk_size=chunk_size), h, w
    )
    ref, (rh, rw) = grads_of(lambda: naive_loss(h, w, labels, loss), h, w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gh.double(), rh.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gw.double(), rw.double(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_dft_alpha_mixes_weight_and_zero_is_sft(alpha):
    h, w, labels = random_case(3, 2, 13, 16, 29, dtype=torch.float64)
    bias = torch.randn(29, dtype=torch.float64, requires_grad=True)
    got, grads = grads_of(
        lambda: dft_peft.fused_linear_loss(h, w, labels, "dft", bias=bias, dft_alpha=alpha), h, w, bias
    )
    ref, ref_grads = grads_of(lambda: naive_loss(h, w, labels, "dft", bias=bias, alpha=alpha), h, w, bias)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    if alpha == 0.0:
        sft = dft_peft.fused_linear_loss(h, w, labels, "sft", bias=bias)
        torch.testing.assert_close(got, sft.detach(), atol=1e-12, rtol=0)


def test_softcap_and_scale_are_honoured():
    h, w, labels = random_case(5, 2, 11, 16, 23, dtype=torch.float64)
    got, grads = grads_of(lambda: dft_peft.fused_linear_loss(h, w, labels, "dft", logit_softcap=3.0), h, w)
    ref, ref_grads = grads_of(lambda: naive_loss(h, w, labels, "dft", softcap=3.0), h, w)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    scaled = dft_peft.fused_linear_loss(h, w, labels, "sft", logit_scale=0.5)
    torch.testing.assert_close(scaled, naive_loss(h * 0.5, w, labels, "sft"), atol=1e-12, rtol=1e-12)


def test_bf16_inputs_accumulate_in_fp32():
    """bf16 hidden/head: the fused loss equals the float64 loss of the same bf16 numbers to 1e-5
    (fp32 accumulation), and the bf16 gradients are within bf16 rounding (2e-2 relative)."""
    h, w, labels = random_case(11, 2, 33, 64, 301, dtype=torch.bfloat16)
    got, (gh, gw) = grads_of(lambda: dft_peft.fused_linear_loss(h, w, labels, "dft"), h, w)
    ref, (rh, rw) = grads_of(lambda: naive_loss(h, w, labels, "dft"), h, w)
    assert got.dtype == torch.float32 and gh.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh.double(), rh.double(), atol=1e-4, rtol=2e-2)
    torch.testing.assert_close(gw.double(), rw.double(), atol=1e-4, rtol=2e-2)


@pytest.mark.parametrize("shift", [True, False])
def test_all_masked_gives_zero_not_nan(shift):
    h, w, labels = random_case(1, 2, 6, 8, 13)
    labels[:] = IGNORE
    got, (gh, gw) = grads_of(lambda: dft_peft.fused_linear_loss(h, w, labels, "dft", shift=shift), h, w)
    assert got.item() == 0.0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()


def test_preshifted_labels():
    h, w, labels = random_case(2, 2, 9, 8, 19, dtype=torch.float64)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    a = dft_peft.fused_linear_loss(h, w, labels, "dft")
    b = dft_peft.fused_linear_loss(h, w, shifted, "dft", shift=False)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_dft_equals_trl_formula_with_num_items():
    h, w, labels = random_case(7, 3, 21, 32, 97, dtype=torch.float64)
    num_items = 100  # as if this micro-batch were part of a larger accumulated batch
    ours = dft_peft.fused_linear_loss(h, w, labels, "dft", num_items_in_batch=num_items)
    trl = trl_dft_loss(h.double() @ w.double().t(), labels, num_items)
    torch.testing.assert_close(ours, trl, atol=1e-12, rtol=1e-12)
    logits = (h @ w.t()).detach()
    via_logits = dft_peft.loss_from_logits(logits, labels, "dft", num_items_in_batch=num_items)
    torch.testing.assert_close(via_logits, trl, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("loss", ["sft", "dft"])
def test_gradient_accumulation_with_num_items_equals_one_big_batch(loss):
    h, w, labels = random_case(9, 8, 15, 16, 41)
    labels[0, :] = IGNORE  # an all-masked micro-batch row, uneven valid counts per micro-batch
    labels[5, 3:] = IGNORE
    num_items = int((labels[:, 1:] != IGNORE).sum())
    w.grad = None
    for part in range(4):
        sl = slice(2 * part, 2 * part + 2)
        dft_peft.fused_linear_loss(h[sl], w, labels[sl], loss, num_items_in_batch=num_items).backward()
    accumulated = w.grad.clone()
    w.grad = None
    dft_peft.fused_linear_loss(h, w, labels, loss).backward()
    torch.testing.assert_close(accumulated, w.grad, atol=1e-6, rtol=1e-5)


def test_compute_loss_func_matches_reference_and_gradients():
    h, w, labels = random_case(4, 2, 12, 16, 31, dtype=torch.float64)
    fn = dft_peft.compute_loss_func("dft", dft_alpha=0.7)
    logits = (h @ w.t()).detach().requires_grad_()

    class Out:
        pass

    out = Out()
    out.logits = logits
    got = fn(out, labels, num_items_in_batch=17)
    got.backward()
    ref_logits = logits.detach().clone().requires_grad_()
    mask = labels[:, 1:] != IGNORE
    logp = torch.log_softmax(ref_logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    weight = 0.7 * logp.exp().detach() + 0.3
    ref = (-(weight * logp) * mask).sum() / 17
    ref.backward()
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("fast", [True, False])
def test_stats_report_ce_probability_accuracy_entropy(fast):
    import dataclasses

    from dft_peft.losses.fused import fused_loss_from_plan, make_plan

    h, w, labels = random_case(6, 2, 10, 8, 17, dtype=torch.float64)
    stats = dft_peft.TokenStats()
    plan = dataclasses.replace(make_plan("dft", {}, chunk_size=3, stats=stats), fast=fast)
    fused_loss_from_plan(plan, h, w, labels).backward()
    got = stats.pop()
    logits = (h.double() @ w.double().t())[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0][mask]
    entropy = -(logp_all.exp() * logp_all).sum(-1)[mask]
    acc = (logits.argmax(-1) == targets)[mask].double()
    assert got["tokens"] == mask.sum().item()
    assert got["ce"] == pytest.approx(-logp.mean().item(), rel=1e-9)
    assert got["p_mean"] == pytest.approx(logp.exp().mean().item(), rel=1e-9)
    assert got["token_acc"] == pytest.approx(acc.mean().item(), rel=1e-9)
    assert got["entropy"] == pytest.approx(entropy.mean().item(), rel=1e-9)
    assert got["objective"] == pytest.approx((-(logp.exp() * logp)).mean().item(), rel=1e-9)
    assert stats.pop() == {}  # popping resets


def test_registry_errors_are_one_line_and_helpful():
    with pytest.raises(UserError, match="Did you mean `dft`"):
        dft_peft.get_loss("dtf")
    with pytest.raises(UserError, match="dft_alpha"):
        registry.validate_loss_params("dft", {"dft_alpha": 1.5})
    with pytest.raises(UserError, match="`dft_alpha` is a parameter of loss `dft`"):
        registry.validate_loss_params("sft", {"dft_alpha": 0.5})
    with pytest.raises(UserError, match="Did you mean `dft_alpha`"):
        registry.validate_loss_params("dft", {"dft_alpah": 0.5})
    with pytest.raises(UserError):
        dft_peft.fused_linear_loss(torch.zeros(1, 2, 4), torch.zeros(3, 4), torch.zeros(1, 2).long(), "dft", dft_alpha=-1)
    assert registry.validate_loss_params("dft", {}) == {"dft_alpha": 1.0}
    assert {"sft", "dft"} <= set(dft_peft.available_losses())


def test_register_loss_decorator_and_entry_point(tmp_path, monkeypatch):
    @dft_peft.register_loss("test_half_sft")
    def half_sft(logits, targets):
        """Half the cross-entropy."""
        return 0.5 * torch.nn.functional.cross_entropy(logits, targets, reduction="none")

    h, w, labels = random_case(8, 1, 9, 8, 13, dtype=torch.float64)
    torch.testing.assert_close(
        dft_peft.fused_linear_loss(h, w, labels, "test_half_sft"),
        0.5 * naive_loss(h, w, labels, "sft"),
    )
    # A real entry point: a package on sys.path with dist-info metadata declaring the group.
    pkg = tmp_path / "my_objectives.py"
    pkg.write_text(textwrap.dedent('''
        import torch
        def cubic(logits, targets):
            """1 - p cubed."""
            p = torch.softmax(logits, -1).gather(1, targets[:, None])[:, 0]
            return 1 - p ** 3
    '''))
    dist = tmp_path / "my_objectives-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-objectives\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dft_peft.losses]\ncubic = my_objectives:cubic\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert "cubic" in dft_peft.available_losses()
        assert dft_peft.get_loss("cubic").description == "1 - p cubed."
    finally:
        registry._REGISTRY.pop("cubic", None)
        registry._REGISTRY.pop("test_half_sft", None)
        sys.modules.pop("my_objectives", None)
