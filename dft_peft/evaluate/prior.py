"""The prior check: does the base model's prior on the training targets suit DFT?

DFT scales each target token's cross-entropy by the model's own detached probability p of it. So
it trains hardest where the base model already agrees with the data and barely trains tokens the
base model finds unlikely. Where those unlikely tokens are the point of the fine-tune (a new
answer format, an end-of-turn token in a prompt format the model does not know), DFT gives up on
exactly them: the run "finishes", the training CE stays high and the tuned model answers in the
old format or never stops. SFT (weight 1 for every token) learns them. arXiv 2510.00526 makes the
same point in theory: `-p`-like objectives win where the prior is strong, NLL where it is weak.

So before training, one no-grad pass over a sample of training rows (the first `prior_check_rows`
rows, tokenized exactly as training tokenizes them) goes through the base model (adapters
disabled) and the fused path's target log-probabilities (`probe.target_logprobs`: only trained
positions are projected through the head, a chunk at a time; no [tokens, vocab] logits). The
report holds:

* mean and median target probability p, and the share of targets with p < 1e-2 and p < 1e-3;
* the same for end-of-turn / EOS targets (targets whose id is the tokenizer's EOS, one of the
  generation config's EOS ids or a known chat end-of-turn marker);
* `dft_weight_low_tenth`: DFT's per-token weight is sg(p), so the share of the total DFT weight
  sum(p) held by the lowest-probability tenth of target tokens (under SFT every token weighs 1,
  so that tenth holds 10%). It is measured on weights, not on gradient norms: the gradient of a
  token with respect to its logits is sg(p) * (softmax - onehot), whose norm also shrinks as p
  grows, so the weight share is the simpler and slightly larger of the two;
* the few token strings with the lowest mean p (which part of the format is new to the model);

and a judgement (strong / mixed / weak prior for DFT) with what to do, plus a one-line warning
when the end-of-turn token is unlikely (DFT would never teach the model to stop). The thresholds
come from `examples/prior-study/` (see the README, "Does DFT suit my data?").
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("dft_peft")

DEFAULT_ROWS = 64
LEAST_LIKELY = 5

# Thresholds of the judgement, from examples/prior-study (README, "Does DFT suit my data?").
# The share of target tokens the base model gives p < 1e-2:
STRONG_MAX_LOW_SHARE = 0.10  # at most this: strong prior, keep dft
WEAK_MIN_LOW_SHARE = 0.25  # at least this: weak prior, use sft (or a low dft_alpha)
MIXED_DFT_ALPHA = 0.5  # the mix to try in between
# End-of-turn targets: a median p below this means DFT will not teach the model to stop. Measured
# on the quickstart model and GSM rows: median 0.0017 in the alpaca format (DFT's model then never
# stops, examples/prior-study/eos_demo.py), 0.017 in its own chat template (the quickstart's
# format). One model, one data set: the boundary is a judgement between two measured points.
LOW_EOS_P = 0.01

# Chat markers that end a turn in common templates (looked up in the vocabulary when present).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass
class PriorReport:
    """The prior check's figures and judgement; `metrics()` is what goes to train_metrics.json."""

    rows: int
    tokens: int
    mean_p: float
    median_p: float
    share_p_below_1e_2: float
    share_p_below_1e_3: float
    dft_weight_low_tenth: float
    eos_tokens: int
    eos_mean_p: float | None
    eos_median_p: float | None
    eos_share_p_below_1e_2: float | None
    eos_share_p_below_1e_3: float | None
    least_likely: list[dict[str, Any]] = field(default_factory=list)
    verdict: str = ""
    advice: str = ""
    eos_warning: str | None = None
    seconds: float = 0.0
    loss: str = ""

    def metrics(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{100 * x:.1f}%"

        def num(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3g}"

        out = [
            f"prior check ({self.rows} rows, {self.tokens} target tokens, base model, {self.seconds:.1f}s):",
            f"  target p: mean {num(self.mean_p)}, median {num(self.median_p)}; "
            f"p < 1e-2: {pct(self.share_p_below_1e_2)}, p < 1e-3: {pct(self.share_p_below_1e_3)}",
            f"  end-of-turn/EOS targets ({self.eos_tokens}): mean {num(self.eos_mean_p)}, median "
            f"{num(self.eos_median_p)}; p < 1e-2: {pct(self.eos_share_p_below_1e_2)}, "
            f"p < 1e-3: {pct(self.eos_share_p_below_1e_3)}",
            f"  DFT weight held by the least likely tenth of tokens: {pct(self.dft_weight_low_tenth)} (SFT: 10%)",
        ]
        if self.least_likely:
            shown = ", ".join(f"{t['token']!r} ({t['mean_p']:.1e}, x{t['count']})" for t in self.least_likely)
            out.append(f"  least likely targets: {shown}")
        out.append(f"  judgement: {self.verdict} prior for DFT: {self.advice}")
        if self.eos_warning:
            out.append(f"  warning: {self.eos_warning}")
        return out

    def text(self) -> str:
        return "\n".join(self.lines())


# ----------------------------------------------------------------------------- figures


def end_of_turn_ids(tokenizer: Any, model: Any = None) -> set[int]:
    """Ids that end an answer: the tokenizer's EOS, the generation config's EOS ids and the known
    chat end-of-turn markers that this vocabulary has."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    for i in eos if isinstance(eos, (list, tuple)) else [eos]:
        if i is not None:
            ids.add(int(i))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for name in END_OF_TURN_TOKENS:
        if name in vocab:
            ids.add(int(vocab[name]))
    return ids


def _share_below(p: np.ndarray, threshold: float) -> float | None:
    return float((p < threshold).mean()) if p.size else None


def low_tenth_weight_share(p: np.ndarray) -> float:
    """Share of sum(p) (DFT's total per-token weight) held by the ceil(n/10) least likely tokens."""
    if p.size == 0 or p.sum() <= 0:
        return math.nan
    k = max(1, math.ceil(p.size / 10))
    low = np.partition(p, k - 1)[:k]
    return float(low.sum() / p.sum())


def least_likely_tokens(p: np.ndarray, ids: np.ndarray, tokenizer: Any, top: int = LEAST_LIKELY) -> list[dict[str, Any]]:
    """The `top` token ids with the lowest mean p; ids seen at least twice come first when enough are."""
    if p.size == 0:
        return []
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=p) / counts
    order = np.argsort(means, kind="stable")
    repeated = [i for i in order if counts[i] >= 2]
    chosen = (repeated if len(repeated) >= top else list(order))[:top]
    return [
        {"token": tokenizer.decode([int(uniq[i])]), "id": int(uniq[i]), "mean_p": float(means[i]), "count": int(counts[i])}
        for i in chosen
    ]


def summarize(logp: np.ndarray, ids: np.ndarray, eos_ids: set[int], tokenizer: Any, rows: int) -> PriorReport:
    """The report's figures from (ln p, target id) of every target token of the sample."""
    p = np.exp(logp.astype(np.float64))
    eos_mask = np.isin(ids, np.fromiter(eos_ids, dtype=np.int64)) if eos_ids else np.zeros(p.shape, bool)
    pe = p[eos_mask]
    return PriorReport(
        rows=rows,
        tokens=int(p.size),
        mean_p=float(p.mean()) if p.size else math.nan,
        median_p=float(np.median(p)) if p.size else math.nan,
        share_p_below_1e_2=_share_below(p, 1e-2) or 0.0,
        share_p_below_1e_3=_share_below(p, 1e-3) or 0.0,
        dft_weight_low_tenth=low_tenth_weight_share(p),
        eos_tokens=int(pe.size),
        eos_mean_p=float(pe.mean()) if pe.size else None,
        eos_median_p=float(np.median(pe)) if pe.size else None,
        eos_share_p_below_1e_2=_share_below(pe, 1e-2),
        eos_share_p_below_1e_3=_share_below(pe, 1e-3),
        least_likely=least_likely_tokens(p, ids, tokenizer),
    )


# ----------------------------------------------------------------------------- judgement


def judge(report: PriorReport, loss: str, loss_params: dict[str, Any] | None = None) -> PriorReport:
    """Fill in verdict, advice and the EOS warning from the documented thresholds."""
    params = loss_params or {}
    low = report.share_p_below_1e_2
    why = f"{100 * low:.0f}% of target tokens have p < 1e-2, median p {report.median_p:.2f}"
    if low <= STRONG_MAX_LOW_SHARE:
        verdict = "strong"
        advice = (
            f"keep `loss: dft` ({why}); a new output format is still learned more slowly than "
            "with SFT: check the outputs, or `dft-peft compare --losses sft,dft`."
        )
        if loss == "sft":
            advice = f"DFT is worth a try (`loss: dft`, or `dft-peft compare --losses sft,dft`): {why}."
    elif low >= WEAK_MIN_LOW_SHARE:
        verdict = "weak"
        advice = (
            f"use `loss: sft` or at most `dft_alpha: {MIXED_DFT_ALPHA}` ({why}: DFT barely trains the "
            "tokens that are new to the model), or fix the prompt format if it is not the model's own."
        )
        if loss == "sft":
            advice = f"keep `loss: sft`; DFT is unlikely to help ({why})."
    else:
        verdict = "mixed"
        advice = (
            f"try `dft_alpha: {MIXED_DFT_ALPHA}` or compare both (`dft-peft compare --losses "
            f"sft,dft,dft_alpha={MIXED_DFT_ALPHA}`): {why}."
        )
        if loss == "sft":
            advice = f"DFT might help; compare (`dft-peft compare --losses sft,dft,dft_alpha={MIXED_DFT_ALPHA}`): {why}."
    if loss == "dft" and verdict != "strong" and params.get("dft_alpha", 1.0) < 1.0:
        advice = f"`dft_alpha: {params['dft_alpha']}` already mixes in SFT; {advice}"
    report.verdict, report.advice = verdict, advice
    report.eos_warning = eos_warning(report, loss, params)
    return report


def eos_warning(report: PriorReport, loss: str, params: dict[str, Any]) -> str | None:
    """Issue 11's pre-flight: a low end-of-turn probability under DFT means a model that never stops."""
    if report.eos_median_p is None:
        if report.tokens:
            return "no end-of-turn/EOS token among the targets: the tuned model may not learn to stop (check train_on_eos and the prompt format)."
        return None
    if report.eos_median_p >= LOW_EOS_P or loss not in ("dft", "asft"):
        return None
    if params.get("dft_sft_special_tokens") or params.get("dft_alpha", 1.0) < 1.0:
        return None  # the end-of-turn token keeps (some of) SFT's weight already
    return (
        f"the base model gives the end-of-turn token median p = {report.eos_median_p:.3g} (< {LOW_EOS_P}): "
        "DFT will push it lower and the tuned model may never stop. Use the model's own prompt "
        "format (`type: chat_template`, `chat_template: tokenizer_default`) or set "
        "`dft_sft_special_tokens: true`."
    )


# ----------------------------------------------------------------------------- the pass


@contextlib.contextmanager
def base_model_view(model: Any):
    """The model with its peft adapters disabled (the base model's prior), restored afterwards."""
    disable = getattr(model, "disable_adapter", None)
    if callable(disable):
        with disable():
            yield model
    else:
        yield model


def eval_mode_except_4bit(model: Any) -> None:
    """Dropout off for the pass, but bitsandbytes 4-bit layers stay in training mode.

    On a CPU with AVX512-bf16, bitsandbytes repacks a Linear4bit's weight into an inference-only
    layout the first time it runs in eval mode without gradients, and keeps it: the QLoRA run that
    follows then trains on that layout and learns differently (measured: the tiny QLoRA test's CE
    stopped falling). The flag only gates that repacking, so leaving it on changes no figure.
    """
    model.eval()
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.training = True


def prior_check(cfg: Any, model: Any, tokenizer: Any, *, rows: int | None = None, batch_size: int = 8) -> PriorReport:
    """Run the prior check of `cfg`'s training data through `model` with adapters disabled."""
    import torch

    from dft_peft.data.collator import pad_id_of
    from dft_peft.evaluate.token_logprobs import load_rows, target_logprobs

    n = rows if rows is not None else getattr(cfg, "prior_check_rows", DEFAULT_ROWS)
    start = time.perf_counter()
    sample = load_rows(cfg, tokenizer, max_rows=n)
    was_training = model.training
    eval_mode_except_4bit(model)
    try:
        with base_model_view(model), torch.no_grad():
            logp, ids = target_logprobs(model, sample, batch_size=batch_size, pad_id=pad_id_of(tokenizer))
    finally:
        model.train(was_training)
    report = summarize(logp, ids, end_of_turn_ids(tokenizer, model), tokenizer, len(sample))
    report.seconds = time.perf_counter() - start
    report.loss = cfg.loss
    return judge(report, cfg.loss, cfg.loss_kwargs())


def run_prior_check(cfg: Any, model: Any, tokenizer: Any) -> PriorReport | None:
    """`train`'s step: the check unless `prior_check: false`, logged; None when off or failing.

    A failure here must not cost the user the run, so it is logged as a warning and training goes on.
    """
    if not getattr(cfg, "prior_check", True):
        return None
    try:
        report = prior_check(cfg, model, tokenizer)
    except Exception as exc:  # noqa: BLE001 - diagnostics never stop a training run
        log.warning("prior check skipped: %s", exc)
        return None
    for line in report.lines():
        (log.warning if line.lstrip().startswith("warning:") else log.info)(line)
    return report


def validate_prior(cfg: Any) -> PriorReport:
    """`dft-peft validate --prior`: load the tokenizer and base model (no adapter) and check."""
    from dft_peft.model import loading, source

    path = source.resolve_model_path(cfg.base_model, cfg.model_revision, cfg.gguf_file)
    tokenizer = loading.load_tokenizer(cfg, path)
    model = loading.load_model(cfg, path, tokenizer, loading.resolve_precision(cfg.bf16, cfg.fp16))
    return prior_check(cfg, model, tokenizer)
