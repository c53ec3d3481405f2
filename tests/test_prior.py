"""The prior check: its figures against an independent float64 full-logits computation with the
unpatched model on a tiny model, the judgement on constructed cases, `train` and `validate
--prior` wiring, and DFT's `dft_sft_special_tokens` key against a float64 reference."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from tiny_run import alpaca_rows, config_dict, make_config, tiny_model_dir, write_jsonl, write_yaml

from dft_peft.evaluate import prior
from dft_peft.cli import main
from dft_peft.losses import fused_linear_loss
from dft_peft.losses.fused import fused_loss_from_plan, make_plan
from dft_peft.losses.objectives import resolve_special_token_ids


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", alpaca_rows(12))


# ----------------------------------------------------------------------------- figures


def reference_figures(model_dir, cfg, tokenizer, rows):
    """ln p of every target through the plain float64 model's full logits (no fused path)."""
    from transformers import AutoModelForCausalLM

    from dft_peft.evaluate.token_logprobs import load_rows

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    sample = load_rows(cfg, tokenizer, max_rows=rows)
    logps, ids = [], []
    with torch.no_grad():
        for inp, lab in zip(sample.input_ids, sample.labels):
            logits = model(input_ids=torch.tensor([inp])).logits[0, :-1]
            target = torch.tensor(lab[1:])
            keep = target != -100
            lp = torch.log_softmax(logits, -1)[keep].gather(1, target[keep].unsqueeze(1)).squeeze(1)
            logps.append(lp.numpy())
            ids.append(target[keep].numpy())
    return np.exp(np.concatenate(logps)), np.concatenate(ids), len(sample)


def test_figures_equal_float64_reference_with_adapter_disabled(model_dir, data):
    """A LoRA with random non-zero weights is attached: the check must see the base model."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = make_config(model_dir, data, model_dir / "unused-out", prior_check_rows=10)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    model = peft.get_peft_model(model, lora)
    report = prior.prior_check(cfg, model, tokenizer)

    p, ids, rows = reference_figures(model_dir, cfg, tokenizer, 10)
    assert report.rows == rows == 10 and report.tokens == p.size
    tol = 1.5 / p.size  # a token whose p sits at a threshold may fall either side in fp32
    assert report.mean_p == pytest.approx(p.mean(), rel=1e-5)
    assert report.median_p == pytest.approx(np.median(p), rel=1e-4)
    assert abs(report.share_p_below_1e_2 - (p < 1e-2).mean()) <= tol
    assert abs(report.share_p_below_1e_3 - (p < 1e-3).mean()) <= tol
    low = np.sort(p)[: math.ceil(p.size / 10)]
    assert report.dft_weight_low_tenth == pytest.approx(low.sum() / p.sum(), rel=1e-4)
    eos = p[ids == tokenizer.eos_token_id]
    assert report.eos_tokens == eos.size == rows  # alpaca rows end with the trained EOS
    assert report.eos_median_p == pytest.approx(np.median(eos), rel=1e-4)
    assert report.eos_mean_p == pytest.approx(eos.mean(), rel=1e-5)
    # the least likely token (by mean p over its occurrences) is the reference's
    uniq = np.unique(ids)
    means = {int(u): p[ids == u].mean() for u in uniq}
    repeated = {u: m for u, m in means.items() if (ids == u).sum() >= 2}
    assert report.least_likely[0]["id"] == min(repeated, key=repeated.get)
    # the adapter is active again afterwards
    assert not any(getattr(m, "disable_adapters", False) for m in model.modules() if hasattr(m, "lora_A"))


# ----------------------------------------------------------------------------- judgement


class Tok:
    def decode(self, ids):
        return f"<{ids[0]}>"


def constructed(low_share: float, eos_p: float = 0.5, n: int = 1000) -> prior.PriorReport:
    """A sample of n targets: `low_share` of them at p = 1e-4, the rest at 0.8; 50 EOS targets (id 2)."""
    p = np.full(n, 0.8)
    p[: int(round(low_share * n))] = 1e-4
    ids = np.arange(n) % 40 + 10
    ids[-50:] = 2
    p[-50:] = eos_p
    return prior.summarize(np.log(p), ids, {2}, Tok(), rows=50)


def test_judgement_follows_documented_thresholds():
    strong = prior.judge(constructed(0.03), "dft")
    assert strong.verdict == "strong" and "keep `loss: dft`" in strong.advice and strong.eos_warning is None
    mixed = prior.judge(constructed(0.18), "dft")
    assert mixed.verdict == "mixed" and f"dft_alpha: {prior.MIXED_DFT_ALPHA}" in mixed.advice
    weak = prior.judge(constructed(0.40), "dft")
    assert weak.verdict == "weak" and "loss: sft" in weak.advice
    assert "40%" in weak.advice  # the reason in numbers
    # at the boundaries
    assert prior.judge(constructed(prior.STRONG_MAX_LOW_SHARE), "dft").verdict == "strong"
    assert prior.judge(constructed(prior.WEAK_MIN_LOW_SHARE), "dft").verdict == "weak"


def test_judgement_with_sft_says_whether_dft_is_worth_a_try():
    assert "worth a try" in prior.judge(constructed(0.03), "sft").advice
    assert "keep `loss: sft`" in prior.judge(constructed(0.40), "sft").advice


def test_low_eos_warns_in_one_line_with_both_fixes():
    report = prior.judge(constructed(0.03, eos_p=0.002), "dft")
    assert report.verdict == "strong" and report.eos_warning
    assert "dft_sft_special_tokens: true" in report.eos_warning and "chat_template" in report.eos_warning
    assert "\n" not in report.eos_warning and "0.002" in report.eos_warning
    assert report.eos_share_p_below_1e_2 == 1.0
    # no warning where the end-of-turn token keeps SFT's weight
    assert prior.judge(constructed(0.03, eos_p=0.002), "sft").eos_warning is None
    assert prior.judge(constructed(0.03, eos_p=0.002), "dft", {"dft_sft_special_tokens": True}).eos_warning is None
    assert prior.judge(constructed(0.03, eos_p=0.2), "dft").eos_warning is None


def test_low_tenth_weight_share():
    assert prior.low_tenth_weight_share(np.full(20, 0.5)) == pytest.approx(0.1)
    p = np.array([1e-3] * 2 + [1.0] * 18)
    assert prior.low_tenth_weight_share(p) == pytest.approx(2e-3 / (2e-3 + 18))


# ----------------------------------------------------------------------------- wiring


def test_train_reports_prior_in_metrics(model_dir, data, tmp_path, caplog):
    from dft_peft.train import train

    cfg = make_config(model_dir, data, tmp_path / "out", max_steps=1, prior_check_rows=4, dft_sft_special_tokens=True)
    with caplog.at_level("INFO", logger="dft_peft"):
        train(cfg)
    metrics = json.loads((tmp_path / "out" / "train_metrics.json").read_text())
    figures = metrics["prior_check"]
    assert figures["rows"] == 4 and figures["tokens"] > 0 and figures["verdict"] in ("strong", "mixed", "weak")
    assert "prior check (4 rows" in caplog.text and "judgement:" in caplog.text
    assert metrics["loss_params"] == {"dft_alpha": 1.0, "dft_sft_special_tokens": True}


def test_prior_check_off(model_dir, data, tmp_path):
    from dft_peft.train import train

    train(make_config(model_dir, data, tmp_path / "out", max_steps=1, prior_check=False))
    assert json.loads((tmp_path / "out" / "train_metrics.json").read_text())["prior_check"] is None


def test_validate_prior_prints_report(model_dir, data, tmp_path, capsys):
    path = write_yaml(tmp_path / "cfg.yml", config_dict(model_dir, data, tmp_path / "out", prior_check_rows=3))
    assert main(["validate", str(path), "--prior"]) == 0
    out = capsys.readouterr().out
    assert "prior check (3 rows" in out and "judgement:" in out


# ----------------------------------------------------------------------------- the special-token key


def reference_dft_special(h, w, labels, special, alpha=1.0):
    logits = (h @ w.t())[..., :-1, :].reshape(-1, w.shape[0])
    target = labels[..., 1:].reshape(-1)
    mask = target != -100
    logp = torch.log_softmax(logits[mask], -1).gather(1, target[mask].unsqueeze(1)).squeeze(1)
    p = logp.detach().exp()
    weight = alpha * p + (1 - alpha)
    weight = torch.where(torch.isin(target[mask], torch.tensor(special)), torch.ones_like(p), weight)
    return -(weight * logp).sum() / mask.sum()


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_dft_sft_special_tokens_matches_float64_reference(fast, alpha):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 10, 8, generator=g, dtype=torch.float64)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64) * 1.5
    labels = torch.randint(0, 30, (2, 10), generator=g)
    labels[:, :2] = -100
    labels[:, -1] = 2  # the closing EOS
    labels[0, 5] = 1
    special = [1, 2]
    h_ref, w_ref = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = reference_dft_special(h_ref, w_ref, labels, special, alpha)
    ref.backward()
    plan = dataclasses.replace(
        make_plan("dft", {"dft_alpha": alpha, "dft_sft_special_tokens": special}, chunk_size=5), fast=fast
    )
    h_f, w_f = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = fused_loss_from_plan(plan, h_f, w_f, labels)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_f.grad, h_ref.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w_f.grad, w_ref.grad, rtol=1e-9, atol=1e-12)
    # and it differs from plain DFT (the key does something)
    plain = fused_linear_loss(h, w, labels, "dft", dft_alpha=alpha)
    assert not torch.allclose(plain, got.detach())


def test_special_tokens_resolved_from_tokenizer(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    params = resolve_special_token_ids({"dft_alpha": 1.0, "dft_sft_special_tokens": True}, tok)
    assert tok.eos_token_id in params["dft_sft_special_tokens"] and tok.bos_token_id in params["dft_sft_special_tokens"]
    assert resolve_special_token_ids({"dft_alpha": 1.0}, tok) == {"dft_alpha": 1.0}
    with pytest.raises(ValueError, match="resolved"):
        fused_linear_loss(torch.randn(1, 4, 8), torch.randn(10, 8), torch.tensor([[1, 2, 3, 4]]), "dft", dft_sft_special_tokens=True)


def test_prior_check_leaves_4bit_weights_trainable(model_dir, data):
    """bitsandbytes repacks a Linear4bit for inference the first time it runs in eval mode without
    gradients on an AVX512-bf16 CPU; a prior check that did so changed the QLoRA run after it."""
    bnb = pytest.importorskip("bitsandbytes")
    from dft_peft.model import adapter, loading

    cfg = make_config(model_dir, data, model_dir / "unused-out", adapter="qlora", load_in_4bit=True, prior_check_rows=2)
    tokenizer = loading.load_tokenizer(cfg, model_dir)
    model = adapter.attach_adapter(loading.load_model(cfg, model_dir, tokenizer, loading.resolve_precision(False, False)), cfg)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    if not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers):
        pytest.skip("this CPU has no AVX512-bf16: bitsandbytes never repacks here")
    prior.prior_check(cfg, model, tokenizer)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
