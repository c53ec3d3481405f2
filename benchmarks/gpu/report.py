"""Gather what run.sh produced into one results.json and one results.md.

    python benchmarks/gpu/report.py OUT_DIR

Reads OUT_DIR/{env.json, pytest.xml, loss.json, e2e.json} (each optional: a stage that failed or
timed out leaves its part empty and says so) and writes OUT_DIR/results.json and results.md.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

GiB = 1 << 30


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_results(path: Path) -> list[dict] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    rows = []
    for case in root.iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, detail = tag, (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
        rows.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)), "detail": detail})
    return rows


def gib(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def markdown(results: dict) -> str:
    out = ["# dft-peft on the GPU", ""]
    gpu = results.get("gpu") or {}
    out.append(f"GPU: {gpu.get('name', '?')} ({gib(gpu.get('total_memory'))} GiB), torch {gpu.get('torch', '?')}, "
               f"transformers {gpu.get('transformers', '?')}, bitsandbytes {gpu.get('bitsandbytes', '?')}")
    out += ["", "## GPU tests (`pytest -m gpu`)", ""]
    tests = results.get("tests")
    if tests is None:
        out.append("not run (no pytest.xml)")
    else:
        out += ["| test | outcome | s | detail |", "|---|---|---:|---|"]
        out += [f"| {t['test']} | {t['outcome']} | {t['seconds']:.1f} | {t['detail']} |" for t in tests]
    out += ["", "## Loss alone (hidden 4096, vocab 128,256, bf16): `python benchmarks/gpu/loss.py`", ""]
    loss = results.get("loss")
    if not loss:
        out.append("not run")
    else:
        out += ["| tokens | case | peak extra GiB | ms | memory / naive | time / naive |", "|---:|---|---:|---:|---:|---:|"]
        for r in loss:
            mem = "OOM" if r.get("oom") else gib(r.get("extra_bytes"))
            ms = "-" if r.get("seconds") is None else f"{1000 * r['seconds']:.1f}"
            mv = "-" if r.get("memory_vs_naive") is None else f"{r['memory_vs_naive']:.3f}"
            tv = "-" if r.get("time_vs_naive") is None else f"{r['time_vs_naive']:.3f}"
            out.append(f"| {r['tokens']} | {r['case']} | {mem} | {ms} | {mv} | {tv} |")
    out += ["", "## Llama-3.1-8B-shaped QLoRA step (NF4, LoRA r32 all linear, bf16, batch 1): `python benchmarks/gpu/e2e.py`", ""]
    e2e = results.get("e2e")
    if not e2e:
        out.append("not run")
    else:
        out += ["| N | loss | checkpointing | reserved GiB | allocated GiB | tokens/s | planner GiB | planner error |",
                "|---:|---|---|---:|---:|---:|---:|---:|"]
        for r in e2e.get("steps", []):
            if r.get("oom"):
                out.append(f"| {r['tokens']} | {r['loss']} | {r['checkpointing']} | OOM | | | {gib(r['planned_reserved'])} | |")
                continue
            err = "-" if r.get("planner_error") is None else f"{100 * r['planner_error']:+.1f}%"
            out.append(f"| {r['tokens']} | {r['loss']} | {r['checkpointing']} | {gib(r['max_memory_reserved'])} | "
                       f"{gib(r['max_memory_allocated'])} | {r['tokens_per_s']:.0f} | {gib(r['planned_reserved'])} | {err} |")
        if e2e.get("longest"):
            out += ["", "| cap | loss | checkpointing | longest N that trains | planner's longest |", "|---:|---|---|---:|---:|"]
            out += [f"| {r['cap_gib']:g} GiB | {r['loss']} | {r['checkpointing']} | {r['longest_tokens']} | {r['planner_longest']} |"
                    for r in e2e["longest"]]
    stages = results.get("stages") or {}
    if stages:
        out += ["", "Stage exit codes: " + ", ".join(f"{k} {v}" for k, v in stages.items())]
    return "\n".join(out) + "\n"


def main(out_dir: str) -> dict:
    out = Path(out_dir)
    env = read_json(out / "env.json") or {}
    results = {
        "gpu": env.get("gpu"),
        "stages": env.get("stages"),
        "tests": pytest_results(out / "pytest.xml"),
        "loss": read_json(out / "loss.json"),
        "e2e": read_json(out / "e2e.json"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/gpu/results")
