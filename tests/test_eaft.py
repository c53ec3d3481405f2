"""`loss: eaft` through the fused path against a float64 full-logits reference of Axolotl 0.19's
formula (axolotl/monkeypatch/loss/eaft.py, written out here), values and gradients; and the
Axolotl keys (`use_eaft`, `eaft_alpha`, `eaft_k`) in a config."""

from __future__ import annotations

import math

import pytest
import torch

from dft_peft.config import Config
from dft_peft.errors import UserError
from dft_peft.losses import fused_linear_loss


def reference_eaft(hidden, weight, labels, alpha=1.0, k=20, normalize=False, num_items=None):
    """Axolotl 0.19's eaft_loss on full float64 logits: shift, mask, top-k entropy ^ alpha * CE."""
    logits = (hidden @ weight.t())[..., :-1, :].reshape(-1, weight.shape[0])
    target = labels[..., 1:].reshape(-1)
    mask = target != -100
    with torch.no_grad():
        top = torch.topk(logits[mask], k=min(k, weight.shape[0]), dim=-1).values
        probs = torch.softmax(top, dim=-1)
        entropy = -(probs * torch.log(probs + 1e-10)).sum(-1)
        if normalize:
            entropy = entropy / math.log(top.shape[-1])
        w = entropy**alpha
    ce = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="none")
    total = (ce * w).sum()
    return total / num_items if num_items is not None else total / mask.sum()


def make_inputs(seed=0, rows=3, length=9, hidden=16, vocab=50, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, length, hidden, generator=g, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.7
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    labels[:, :3] = -100
    labels[1, -2:] = -100
    return h, w, labels


@pytest.mark.parametrize(
    "params",
    [
        {},  # Axolotl 0.19's defaults: alpha 1, K 20, raw entropy
        {"eaft_alpha": 0.5, "eaft_k": 5},
        {"eaft_alpha": 2.0, "eaft_k": 7, "eaft_normalize": True},
        {"eaft_k": 500},  # K above the vocabulary: all logits, as Axolotl's min(k, V)
    ],
)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_eaft_matches_float64_reference(params, chunk_size):
    h, w, labels = make_inputs()
    h_ref, w_ref = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = reference_eaft(
        h_ref, w_ref, labels,
        alpha=params.get("eaft_alpha", 1.0), k=params.get("eaft_k", 20), normalize=params.get("eaft_normalize", False),
    )
    ref.backward()
    h_f, w_f = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = fused_linear_loss(h_f, w_f, labels, "eaft", chunk_size=chunk_size, **params)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_f.grad, h_ref.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w_f.grad, w_ref.grad, rtol=1e-9, atol=1e-12)


def test_eaft_differs_from_sft_and_respects_num_items():
    """The weight is not 1 (the test could fail if EAFT silently fell back to CE), and the
    `num_items_in_batch` divisor is used as given."""
    h, w, labels = make_inputs(seed=3)
    sft = fused_linear_loss(h, w, labels, "sft")
    eaft = fused_linear_loss(h, w, labels, "eaft")
    assert not torch.allclose(sft, eaft)
    got = fused_linear_loss(h, w, labels, "eaft", num_items_in_batch=7)
    torch.testing.assert_close(got, reference_eaft(h, w, labels, num_items=7), rtol=1e-10, atol=1e-12)


def test_eaft_fp32_close_to_reference():
    h, w, labels = make_inputs(seed=1, dtype=torch.float32)
    got = fused_linear_loss(h, w, labels, "eaft", eaft_k=10)
    ref = reference_eaft(h.double(), w.double(), labels, k=10)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


BASE = dict(
    base_model="some/model",
    adapter="lora",
    lora_target_linear=True,
    datasets=[{"path": "train.jsonl", "type": "alpaca"}],
    learning_rate=1e-4,
)


def test_axolotl_keys_select_eaft():
    cfg = Config.from_dict({**BASE, "use_eaft": True, "eaft_alpha": 0.5, "eaft_k": 10})
    assert cfg.loss == "eaft"
    assert cfg.loss_kwargs() == {"eaft_alpha": 0.5, "eaft_k": 10}
    assert Config.from_dict({**BASE, "loss": "eaft"}).loss_kwargs() == {"eaft_alpha": 1.0, "eaft_k": 20}
    assert Config.from_dict({**BASE, "use_eaft": False}).loss == "sft"
    assert Config.from_dict({**BASE, "loss": "eaft", "eaft_normalize": True}).loss_kwargs()["eaft_normalize"] is True


@pytest.mark.parametrize(
    "extra,needle",
    [
        ({"use_eaft": True, "loss": "dft"}, "use_eaft"),
        ({"use_eaft": "yes"}, "use_eaft"),
        ({"eaft_k": 5}, "eaft_k"),  # a parameter of eaft while loss is sft
        ({"loss": "eaft", "eaft_k": 1}, "eaft_k"),
        ({"loss": "eaft", "eaft_alpha": -1}, "eaft_alpha"),
    ],
)
def test_bad_eaft_keys_are_one_line(extra, needle):
    with pytest.raises(UserError) as err:
        Config.from_dict({**BASE, **extra})
    assert needle in str(err.value) and "\n" not in str(err.value)
