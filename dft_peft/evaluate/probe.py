"""`dft-peft inspect`: where the target-token probabilities of the training data sit, per model.

The DFT paper's Figure 2 is the evidence users look for: SFT lifts the probability of every
training token towards 1, while DFT (each token's CE scaled by its own detached probability)
pushes a minority of tokens further *down* and concentrates the rest near 1. This module runs the
same training rows (same prompt format, same trained tokens) through the base model and each
adapter, collects p(y_t) for every trained token, and writes

* a PNG: the histogram of p(y_t) on log-spaced bins (1e-8 .. 1), one line per model, plus a
  panel per adapter with the tokens whose log-probability moved most up/down versus the base;
* a JSON with the same numbers (bin edges and counts, mean/median p, share of tokens with
  p < 1e-3, mean ln p, and the movers).

Probabilities come from the final hidden states and the LM head, a chunk of trained positions at
a time: the `[tokens, vocab]` logits of a batch are never built.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from dft_peft.errors import UserError
from dft_peft.evaluate.labels import adapter_label, display_path
from dft_peft.evaluate.token_logprobs import IGNORE_INDEX, Rows, load_rows, target_logprobs  # noqa: F401

log = logging.getLogger(__name__)

# Log-spaced bins, 5 per decade from 1e-8 to 1. Probabilities below 1e-8 count in the first bin.
BIN_EDGES = np.logspace(-8, 0, 41)
P_FLOOR = 1e-8
LOW_P = 1e-3
HIGH_P = 0.9
TOP_MOVERS = 15
MIN_COUNT = 3
# Rows of the LM head projected at once: ~4M logits (16 MB in fp32), at least 8 rows.
CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------- statistics


def histogram(logp: np.ndarray) -> list[int]:
    """Counts of p = exp(logp) on BIN_EDGES; p below 1e-8 counts in the first bin."""
    p = np.clip(np.exp(logp), P_FLOOR, 1.0)
    return np.histogram(p, bins=BIN_EDGES)[0].astype(int).tolist()


def summarize(logp: np.ndarray) -> dict[str, Any]:
    p = np.exp(logp)
    n = int(p.size)
    return {
        "tokens": n,
        "bin_edges": BIN_EDGES.tolist(),
        "counts": histogram(logp),
        "mean_p": float(p.mean()) if n else math.nan,
        "median_p": float(np.median(p)) if n else math.nan,
        "frac_p_below_1e-3": float((p < LOW_P).mean()) if n else math.nan,
        "frac_p_above_0.9": float((p > HIGH_P).mean()) if n else math.nan,
        "mean_log_p": float(logp.mean()) if n else math.nan,
    }


def movers(
    base_logp: np.ndarray,
    logp: np.ndarray,
    token_ids: np.ndarray,
    tokenizer: Any,
    *,
    top: int = TOP_MOVERS,
    min_count: int = MIN_COUNT,
) -> dict[str, Any]:
    """Token ids (seen >= min_count times) whose mean change of ln p versus the base is largest,
    each way. Positions are aligned: both models saw the same rows."""
    if base_logp.shape != logp.shape:
        raise ValueError("movers need the same positions for both models")
    size = int(token_ids.max()) + 1 if token_ids.size else 0
    count = np.bincount(token_ids, minlength=size)
    delta = np.bincount(token_ids, weights=logp - base_logp, minlength=size)
    p_base = np.bincount(token_ids, weights=np.exp(base_logp), minlength=size)
    p_new = np.bincount(token_ids, weights=np.exp(logp), minlength=size)
    seen = np.nonzero(count >= min_count)[0]
    mean_delta = delta[seen] / count[seen]

    def entry(i: int) -> dict[str, Any]:
        tid = int(seen[i])
        return {
            "token_id": tid,
            "token": tokenizer.decode([tid]),
            "count": int(count[tid]),
            "mean_delta_log_p": float(mean_delta[i]),
            "mean_p_base": float(p_base[tid] / count[tid]),
            "mean_p": float(p_new[tid] / count[tid]),
        }

    order = np.argsort(mean_delta, kind="stable")
    up = [entry(i) for i in order[::-1][:top] if mean_delta[i] > 0]
    down = [entry(i) for i in order[:top] if mean_delta[i] < 0]
    return {"min_count": min_count, "up": up, "down": down}


# ----------------------------------------------------------------------------- report


@dataclass
class ModelResult:
    label: str
    adapter: str | None
    logp: np.ndarray = field(repr=False)
    stats: dict[str, Any] = field(default_factory=dict)
    movers: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "adapter": self.adapter, **self.stats}
        if self.movers is not None:
            out["movers"] = self.movers
        return out


@dataclass
class InspectReport:
    config: str
    source: str
    rows: int
    models: list[ModelResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "dataset": self.source,
            "rows": self.rows,
            "tokens": self.models[0].stats["tokens"] if self.models else 0,
            "bin_edges": BIN_EDGES.tolist(),
            "models": [m.to_dict() for m in self.models],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InspectReport":
        """A report read back from its JSON (enough to redraw the figure with `plot`)."""
        stat_keys = ("tokens", "bin_edges", "counts", "mean_p", "median_p", "frac_p_below_1e-3", "frac_p_above_0.9", "mean_log_p")
        models = [
            ModelResult(m["label"], m.get("adapter"), np.zeros(0), {k: m[k] for k in stat_keys if k in m}, m.get("movers"))
            for m in data["models"]
        ]
        return cls(config=data.get("config", ""), source=data.get("dataset", ""), rows=data["rows"], models=models)

    def table(self) -> str:
        header = f"{'model':<32} {'tokens':>8} {'mean p':>8} {'median p':>9} {'p<1e-3':>8} {'p>0.9':>7} {'mean ln p':>10}"
        lines = [header]
        for m in self.models:
            s = m.stats
            lines.append(
                f"{m.label[:32]:<32} {s['tokens']:>8} {s['mean_p']:>8.3f} {s['median_p']:>9.3f} "
                f"{100 * s['frac_p_below_1e-3']:>7.1f}% {100 * s['frac_p_above_0.9']:>6.1f}% {s['mean_log_p']:>10.3f}"
            )
        return "\n".join(lines)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(
            "inspect draws its report with matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'dft-peft[plot]')"
        ) from None


def inspect(
    cfg: Any,
    *,
    adapters: Sequence[str | Path] = (),
    dataset: str | Path | None = None,
    max_rows: int | None = 200,
    out: str | Path,
    batch_size: int = 8,
    chunk_rows: int | None = None,
    config_path: str | None = None,
) -> InspectReport:
    """Run the rows through the base model and every adapter; write `out` (PNG) and its JSON."""
    from dft_peft.data.collator import pad_id_of
    from dft_peft.evaluate.math_eval import merged
    from dft_peft.model.loading import load_for_inference

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the report is a PNG; give a file name ending in .png")
    require_matplotlib()
    labelled = [adapter_label(a) for a in adapters]
    for _, folder in labelled:
        if not Path(folder, "adapter_config.json").is_file():
            raise UserError(f"`{folder}` holds no adapter (adapter_config.json); pass a trained adapter folder.")
    seen: dict[str, int] = {}
    models_spec: list[tuple[str, str | None]] = [("base", None)]
    for label, folder in labelled:
        seen[label] = seen.get(label, 0) + 1
        models_spec.append((label if seen[label] == 1 else f"{label} ({seen[label]})", folder))

    rows: Rows | None = None
    token_ids: np.ndarray | None = None
    results: list[ModelResult] = []
    tokenizer = None
    for label, folder in models_spec:
        model, tok = load_for_inference(cfg, folder)
        model = merged(model)
        if rows is None:
            tokenizer = tok
            rows = load_rows(cfg, tokenizer, dataset, max_rows)
            log.info("inspect: %d rows from %s", len(rows), rows.source)
        logp, ids = target_logprobs(
            model, rows, batch_size=batch_size, chunk_rows=chunk_rows, pad_id=pad_id_of(tokenizer)
        )
        if token_ids is None:
            token_ids = ids
        log.info("inspect: %s: %d target tokens, mean p %.4f", label, logp.size, float(np.exp(logp).mean()))
        results.append(ModelResult(label, folder and display_path(folder), logp, summarize(logp)))
        del model
        gc.collect()
    assert rows is not None and token_ids is not None
    base = results[0]
    for r in results[1:]:
        r.movers = movers(base.logp, r.logp, token_ids, tokenizer)

    report = InspectReport(config=display_path(config_path) if config_path else "", source=rows.source, rows=len(rows), models=results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    plot(report, out)
    return report


# ----------------------------------------------------------------------------- the figure


def _token_label(text: str) -> str:
    shown = repr(text)
    return shown if len(shown) <= 18 else shown[:17] + "…"


def plot(report: InspectReport, out: Path) -> None:
    """Histogram panel on top; one movers panel per adapter below. No pyplot: no global state."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_movers = [m for m in report.models if m.movers is not None]
    ncols = max(1, len(with_movers))
    fig = Figure(figsize=(max(8.0, 5.5 * ncols), 4.2 + (6.5 if with_movers else 0)), dpi=90)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 if with_movers else 1, ncols, height_ratios=[1.0, 1.6] if with_movers else [1.0])
    ax = fig.add_subplot(grid[0, :])
    centers = np.sqrt(BIN_EDGES[:-1] * BIN_EDGES[1:])
    for m in report.models:
        counts = np.asarray(m.stats["counts"], dtype=float)
        frac = np.where(counts > 0, counts / max(counts.sum(), 1.0), np.nan)  # empty bins: gaps
        ax.plot(
            centers,
            frac,
            marker="o",
            markersize=3,
            linewidth=1.6,
            label=f"{m.label} (mean p {m.stats['mean_p']:.3f}, p<1e-3: {100 * m.stats['frac_p_below_1e-3']:.1f}%)",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")  # the low-probability tail is a few percent of tokens: log y shows it
    tokens = report.models[0].stats["tokens"] if report.models else 0
    ax.set_ylim(0.5 / max(tokens, 1), 1.5)
    ax.set_xlim(BIN_EDGES[0], 1.0)
    ax.set_xlabel("target-token probability p(y_t)  (log scale; p < 1e-8 in the first bin)")
    ax.set_ylabel("fraction of tokens (log scale)")
    ax.set_title(f"p(y_t) of {tokens} trained tokens in {report.rows} rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")

    for col, m in enumerate(with_movers):
        axm = fig.add_subplot(grid[1, col])
        items = sorted(m.movers["up"] + m.movers["down"], key=lambda e: e["mean_delta_log_p"])
        values = [e["mean_delta_log_p"] for e in items]
        names = [f"{_token_label(e['token'])} ×{e['count']}" for e in items]
        colors = ["#2a9d8f" if v > 0 else "#e76f51" for v in values]
        axm.barh(range(len(items)), values, color=colors)
        axm.set_yticks(range(len(items)))
        axm.set_yticklabels(names, fontsize=7)
        axm.axvline(0.0, color="black", linewidth=0.8)
        axm.set_xlabel("mean change of ln p vs base")
        axm.set_title(
            f"{m.label}\ntop {TOP_MOVERS} up / down by mean Δ ln p (tokens seen ≥ {m.movers['min_count']}×)", fontsize=9
        )
        axm.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png")
