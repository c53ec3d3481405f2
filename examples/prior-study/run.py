"""The study behind the prior check's thresholds: where does DFT beat SFT, and what did the base
model's prior look like there?

For each small task (spanning strong and weak priors) this trains SFT, DFT and the mix
`dft_alpha=0.5` at the same budget from the quickstart config (SmolLM2-135M-Instruct, LoRA, CPU)
with `dft-peft compare`, which also records the prior check's figures before training and scores
every model on held-out problems of the task with `dft-peft eval`'s scorer. One table comes out:
task, prior figures, accuracy of base / each objective.

Tasks:
  gsm-chat      the shipped GSM rows in the model's own chat template (a strong prior)
  gsm-alpaca    the same rows in the alpaca format (foreign prompt, foreign end-of-turn)
  chain_sum     reasoning-gym sums, chat format, `a + b - c = N` then `#### N`
  leg_counting  reasoning-gym animal legs, chat format, `#### N`
  invented      reasoning-gym sums answered in an invented format (`<<4|-1|-7>> ~> -4`) then `#### N`

Usage (project venv active, from anywhere):
    OMP_NUM_THREADS=1 python examples/prior-study/run.py            # the full study
    OMP_NUM_THREADS=1 python examples/prior-study/run.py --quick    # CI-sized check (minutes)
    ... --tasks chain_sum,invented --steps 40 --limit 30            # a part of it
Resumes: trained variants are not trained again (delete outputs/prior-study/<task> to redo one).
Writes outputs/prior-study/table.md and table.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GSM_TRAIN = ROOT / "examples/data/gsm_train.jsonl"
GSM_TEST = ROOT / "examples/data/gsm_test.jsonl"
LOSSES = "sft,dft,dft_alpha=0.5"
ALL_TASKS = ("gsm-chat", "gsm-alpaca", "chain_sum", "leg_counting", "invented")

# (steps, held-out problems, training rows) of the full study and of --quick. The full study's
# ~1 hour on 2 quiet cores is an estimate (quickstart: 30 GSM steps in ~5 min; short tasks ~3x
# cheaper per step; eval 4 models x 30 problems), not a measurement: see the README.
FULL = dict(steps=40, limit=30, train_rows=200)
QUICK = dict(steps=2, limit=3, train_rows=16)


# ----------------------------------------------------------------------------- task data


def row(question: str, output: str, answer: str) -> dict[str, Any]:
    """One example in both layouts (chat messages and alpaca fields), with its reference answer."""
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": output}],
        "instruction": question,
        "input": "",
        "output": output,
        "answer": answer,
    }


def reasoning_gym_rows(task: str, size: int, seed: int) -> list[dict[str, Any]]:
    import reasoning_gym

    rows = []
    for item in reasoning_gym.create_dataset("chain_sum" if task == "invented" else task, size=size, seed=seed):
        q, a = item["question"], str(item["answer"]).strip()
        if task == "chain_sum":
            expr = q.rsplit(":", 1)[-1].strip().rstrip("=").strip()
            out = f"{expr} = {a}\n#### {a}"
        elif task == "invented":
            expr = q.rsplit(":", 1)[-1].strip().rstrip("=").strip()
            terms = expr.replace(" - ", " -").replace(" + ", " +").split()
            out = f"<<{'|'.join(terms)}>> ~> {a}\n#### {a}"
        else:
            out = f"#### {a}"
        rows.append(row(q, out, a))
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def task_data(task: str, folder: Path, train_rows: int, test_rows: int) -> tuple[Path, Path, str]:
    """(train file, held-out file, dataset type) of a task."""
    if task.startswith("gsm-"):
        lines = GSM_TRAIN.read_text(encoding="utf-8").splitlines()[:train_rows]
        train = folder / "train.jsonl"
        folder.mkdir(parents=True, exist_ok=True)
        train.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return train, GSM_TEST, "alpaca" if task == "gsm-alpaca" else "chat_template"
    train = write_jsonl(folder / "train.jsonl", reasoning_gym_rows(task, train_rows, seed=1))
    test = write_jsonl(folder / "test.jsonl", reasoning_gym_rows(task, test_rows, seed=2))
    return train, test, "chat_template"


def task_config(task: str, folder: Path, train: Path, kind: str, steps: int) -> Path:
    """The quickstart config with the task's data and the study's budget."""
    cfg = yaml.safe_load((ROOT / "examples/yaml/quickstart.yml").read_text())
    entry: dict[str, Any] = {"path": str(train), "type": kind}
    if kind == "chat_template":
        entry["field_messages"] = "messages"
    else:
        cfg.pop("chat_template", None)
    cfg.update(
        datasets=[entry],
        max_steps=steps,
        save_steps=max(steps, 1),
        output_dir=str(folder / "runs"),
        sequence_len=256 if task.startswith("gsm") else 128,
        warmup_steps=min(3, max(steps - 1, 0)),
    )
    for key in ("loss", "dft_alpha"):
        cfg.pop(key, None)
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the table


# What a generation in the task's trained output format looks like (the part DFT may not learn).
FORMATS = {
    "gsm-chat": r"#### -?[\d,.]+\s*$",
    "gsm-alpaca": r"#### -?[\d,.]+\s*$",
    "chain_sum": r"^[-\d +]+= -?\d+\n#### -?\d+\s*$",
    "leg_counting": r"^#### \d+\s*$",
    "invented": r"^<<[^>]*>> ~> -?\d+\n#### -?\d+\s*$",
}


def format_share(task: str, eval_json: Path) -> dict[str, float]:
    """Per model, the share of greedy generations in the task's trained output format."""
    import re

    if not eval_json.is_file():
        return {}
    records = json.loads(eval_json.read_text())["records"]
    pattern = re.compile(FORMATS[task])
    models = records[0]["models"] if records else {}
    return {m: sum(bool(pattern.search(r["models"][m]["generation"] or "")) for r in records) / len(records) for m in models}


def table_row(task: str, report: dict[str, Any], seconds: float, formats: dict[str, float] | None = None) -> dict[str, Any]:
    p = report["prior_check"] or {}
    acc = {r["variant"]: r.get("accuracy") for r in report["variants"]}
    ce = {r["variant"]: r.get("final_ce") for r in report["variants"] if r.get("final_ce") is not None}
    folders = {r["variant"]: Path(r["folder"]).name for r in report["variants"] if r.get("folder")}
    fmt = {v: (formats or {}).get(folders.get(v, v)) for v in acc}
    return {
        "final_ce": ce,
        "format": fmt,
        "task": task,
        "mean_p": p.get("mean_p"),
        "median_p": p.get("median_p"),
        "p<1e-2": p.get("share_p_below_1e_2"),
        "p<1e-3": p.get("share_p_below_1e_3"),
        "eos_median_p": p.get("eos_median_p"),
        "dft_weight_low_tenth": p.get("dft_weight_low_tenth"),
        "verdict": p.get("verdict"),
        "accuracy": acc,
        "n": next((r.get("n") for r in report["variants"] if r.get("n")), None),
        "seconds": round(seconds),
    }


def markdown(rows: list[dict[str, Any]], variants: list[str]) -> str:
    def f(x: Any, pattern: str) -> str:
        return "-" if x is None else pattern.format(x)

    head = ["task", "mean p", "median p", "p<1e-2", "p<1e-3", "EOS median p", "verdict", "n"]
    head += [f"acc {v}" for v in ["base", *variants]] + [f"format {v}" for v in ["base", *variants]]
    head += [f"final CE {v}" for v in variants]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["task"], f(r["mean_p"], "{:.3f}"), f(r["median_p"], "{:.3f}"), f(r["p<1e-2"], "{:.1%}"),
            f(r["p<1e-3"], "{:.1%}"), f(r["eos_median_p"], "{:.4f}"), r["verdict"] or "-", f(r["n"], "{}"),
        ] + [f(r["accuracy"].get(v), "{:.0%}") for v in ["base", *variants]]
        cells += [f(r.get("format", {}).get(v), "{:.0%}") for v in ["base", *variants]]
        cells += [f(r.get("final_ce", {}).get(v), "{:.2f}") for v in variants]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def earlier_rows(path: Path, settings: dict[str, Any], tasks: list[str]) -> list[dict[str, Any]]:
    """Rows of other tasks from an earlier call with the same settings: the table grows task by task."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    if earlier.get("settings") != settings:
        return []
    return [r for r in earlier.get("rows", []) if r["task"] not in tasks]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="SFT vs DFT vs dft_alpha across priors (see the module docstring)")
    ap.add_argument("--quick", action="store_true", help="CI-sized: two short tasks, 2 steps, 3 problems")
    ap.add_argument("--tasks", help=f"comma-separated subset of {','.join(ALL_TASKS)}")
    ap.add_argument("--losses", default=LOSSES)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--limit", type=int, help="held-out problems per task")
    ap.add_argument("--train-rows", type=int)
    ap.add_argument("--max-new-tokens", type=int, help="default: 200 for GSM, 48 for the short tasks")
    ap.add_argument("--out", default=str(ROOT / "outputs/prior-study"))
    ap.add_argument("--table-only", action="store_true", help="rebuild the table from the tasks' finished compare.json files")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    steps = args.steps or preset["steps"]
    limit = args.limit or preset["limit"]
    train_rows = args.train_rows or preset["train_rows"]
    tasks = args.tasks.split(",") if args.tasks else (["chain_sum", "invented"] if args.quick else list(ALL_TASKS))
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        print(f"unknown task {unknown[0]}: choose from {', '.join(ALL_TASKS)}", file=sys.stderr)
        return 2

    from dft_peft.cli import _setup_logging
    from dft_peft.cli.compare import compare, parse_variants

    _setup_logging()
    variants = [v.label for v in parse_variants(args.losses)]
    out = Path(args.out)
    settings = {"steps": steps, "limit": limit, "train_rows": train_rows, "losses": args.losses, "quick": args.quick}
    rows_before = json.loads((out / "table.json").read_text()).get("rows", []) if (out / "table.json").is_file() else []
    rows = earlier_rows(out / "table.json", settings, tasks)
    started = time.time()
    for task in tasks:
        folder = out / task
        t0 = time.time()
        train, test, kind = task_data(task, folder, train_rows, max(limit, 1))
        config = task_config(task, folder, train, kind, steps)
        max_new = args.max_new_tokens or (200 if task.startswith("gsm") else 48)
        if args.quick:
            max_new = min(max_new, 16)
        if args.table_only:
            report_dict = json.loads((folder / "runs" / "compare.json").read_text())
            seconds = next((r["seconds"] for r in rows_before if r["task"] == task), 0)
        else:
            report_dict = compare(config, args.losses, eval_dataset=test, limit=limit, max_new_tokens=max_new).to_dict()
            seconds = time.time() - t0
        formats = format_share(task, folder / "runs" / "compare-eval.json")
        rows.append(table_row(task, report_dict, seconds, formats))
        (out / "table.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
        (out / "table.md").write_text(markdown(rows, variants) + "\n")
        print(f"=== {task} done in {time.time() - t0:.0f}s", flush=True)
    print(markdown(rows, variants))
    print(f"\nstudy: {len(tasks)} tasks in {time.time() - started:.0f}s; table in {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
