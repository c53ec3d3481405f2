"""Print the study's results as Markdown tables (run.sh writes them to results/summary.md).

Reads results/eval.json (dft-peft eval), results/inspect.json (dft-peft inspect) and the two
runs' results/train-{sft,dft}.json (copies of each adapter's train_metrics.json + log history).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def main() -> None:
    lines: list[str] = []
    train = {}
    for loss in ("sft", "dft"):
        path = RESULTS / f"train-{loss}.json"
        if path.is_file():
            train[loss] = json.loads(path.read_text())
    if train:
        lines += [
            "**Training** (first -> last logged step; `ce` is plain cross-entropy and `p_mean` the mean",
            "target-token probability on the training batches, whatever the objective)",
            "",
            "| run | steps | objective | ce | p_mean | token_acc | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for loss, t in train.items():
            logs = [h for h in t["log_history"] if "loss" in h and "train_runtime" not in h]
            first, last = logs[0], logs[-1]
            runtime = next((h["train_runtime"] for h in t["log_history"] if "train_runtime" in h), float("nan"))

            def arrow(key: str) -> str:
                return f"{float(first[key]):.3f} -> {float(last[key]):.3f}"

            lines.append(
                f"| {loss} | {t['global_step']} | {arrow('loss')} | {arrow('ce')} | {arrow('p_mean')} "
                f"| {arrow('token_acc')} | {float(runtime):.0f} |"
            )
        lines.append("")

    ev = json.loads((RESULTS / "eval.json").read_text())
    s = ev["settings"]
    lines += [
        f"**GSM accuracy** ({ev['summary'][0]['n']} problems of gsm_test.jsonl, greedy, "
        f"max_new_tokens {s['max_new_tokens']}, prompt format {s['prompt_format']})",
        "",
        "| model | n | accuracy | correct | answers in `#### N` form | hit the token limit | mean answer tokens |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in ev["summary"]:
        correct = round(m["accuracy"] * m["n"])
        gens = [r["models"][m["model"]] for r in ev["records"]]
        hashed = sum("####" in g["generation"] for g in gens)
        capped = sum(g["tokens"] >= s["max_new_tokens"] for g in gens)
        lines.append(
            f"| {m['model']} | {m['n']} | {pct(m['accuracy'])} | {correct} | {hashed} | {capped} | {m['mean_tokens']:.1f} |"
        )
    lines.append("")

    ins = json.loads((RESULTS / "inspect.json").read_text())
    lines += [
        f"**Target-token probabilities** ({ins['tokens']} trained tokens in the first {ins['rows']} rows of gsm_train.jsonl)",
        "",
        "| model | mean p | median p | p < 1e-3 | p > 0.9 | mean ln p |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in ins["models"]:
        lines.append(
            f"| {m['label']} | {m['mean_p']:.3f} | {m['median_p']:.3f} | {pct(m['frac_p_below_1e-3'])} "
            f"| {pct(m['frac_p_above_0.9'])} | {m['mean_log_p']:.3f} |"
        )
    for m in ins["models"][1:]:
        mv = m["movers"]
        up = ", ".join(f"`{e['token']!r}` {e['mean_delta_log_p']:+.2f}" for e in mv["up"][:6])
        down = ", ".join(f"`{e['token']!r}` {e['mean_delta_log_p']:+.2f}" for e in mv["down"][:6])
        lines += ["", f"{m['label']} vs base, mean change of ln p (tokens seen >= {mv['min_count']} times):", f"- up: {up}", f"- down: {down}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
