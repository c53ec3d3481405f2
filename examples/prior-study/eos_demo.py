"""Does `dft_sft_special_tokens: true` make a DFT model stop in a foreign prompt format?

The quickstart model (SmolLM2-135M-Instruct) trained on the shipped GSM rows in the alpaca format
(not its own chat template): its end-of-turn token starts near p = 0.002 there, and DFT weights
each token by p, so it barely learns to stop. This script trains, at the quickstart's budget,
`loss: dft` without and with the key (and `loss: sft` with --sft), then on held-out problems
(examples/data/gsm_test.jsonl) measures

* p(EOS) at the end of the reference answers (teacher-forced, through the fused path's target
  log-probabilities; the median and mean over rows), and
* the share of greedy generations that emit EOS within --max-new-tokens (no other stop rule).

Usage (from the repository root, project venv active; 35 minutes measured on 2 heavily shared cores):
    OMP_NUM_THREADS=1 python examples/prior-study/eos_demo.py [--steps 30] [--limit 10] [--sft]
Writes outputs/eos-demo/results.json and prints one table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
QUICKSTART = ROOT / "examples/yaml/quickstart.yml"
TEST = ROOT / "examples/data/gsm_test.jsonl"


def foreign_config(out: Path, steps: int) -> Path:
    """The quickstart config in the alpaca format (the same rows carry an alpaca layout)."""
    import yaml

    cfg = yaml.safe_load(QUICKSTART.read_text())
    cfg["datasets"] = [{"path": str(ROOT / "examples/data/gsm_train.jsonl"), "type": "alpaca"}]
    cfg["max_steps"] = steps
    cfg["save_steps"] = steps
    cfg.pop("chat_template", None)
    path = out / "quickstart-alpaca.yml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(config: Path, out_dir: Path, overrides: list[str]) -> float:
    if (out_dir / "adapter_config.json").is_file():
        return 0.0
    start = time.time()
    cmd = [sys.executable, "-m", "dft_peft", "train", str(config), f"--output_dir={out_dir}", *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.time() - start


def measure(config: Path, adapter: Path | None, limit: int, max_new: int) -> dict:
    import numpy as np
    import torch

    from dft_peft.config import load_config
    from dft_peft.data.collator import pad_id_of
    from dft_peft.data.tokenize import default_prefix_ids
    from dft_peft.evaluate.math_eval import load_problems
    from dft_peft.evaluate.prompts import build_prompt
    from dft_peft.model.loading import load_for_inference
    from dft_peft.evaluate.prior import end_of_turn_ids
    from dft_peft.evaluate.token_logprobs import load_rows, target_logprobs

    cfg = load_config(config)
    model, tok = load_for_inference(cfg, adapter)
    eos_ids = end_of_turn_ids(tok, model)
    rows = load_rows(cfg, tok, dataset=TEST, max_rows=limit)
    # p(EOS) at each row's end: the last target of every row is the closing EOS.
    ends = np.cumsum([sum(1 for l in r[1:] + [-100] if l != -100) for r in rows.labels]) - 1
    logp, ids = target_logprobs(model, rows, pad_id=pad_id_of(tok))
    p_end = np.exp(logp[ends])
    assert np.isin(ids[ends], list(eos_ids)).all(), "the last target of a row is not EOS"
    entry, problems = load_problems(cfg, TEST, limit)
    prefix = default_prefix_ids(tok)
    stopped, lengths = 0, []
    eos = sorted(eos_ids)
    for i, row in enumerate(problems):
        ids_in = prefix + tok(build_prompt(row, entry, tok, None, "demo"), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids_in]), max_new_tokens=max_new, do_sample=False,
                eos_token_id=eos, pad_token_id=pad_id_of(tok),
            )
        new = out[0, len(ids_in):].tolist()
        hit = next((k for k, t in enumerate(new) if t in eos_ids), None)
        stopped += hit is not None
        lengths.append(hit + 1 if hit is not None else len(new))
    return {
        "p_eos_median": float(np.median(p_end)),
        "p_eos_mean": float(p_end.mean()),
        "stopped": stopped / len(problems),
        "mean_tokens": float(np.mean(lengths)),
        "n": len(problems),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--sft", action="store_true", help="also train and measure loss: sft")
    ap.add_argument("--out", default=str(ROOT / "outputs/eos-demo"))
    args = ap.parse_args()
    out = Path(args.out)
    config = foreign_config(out, args.steps)
    variants = {"dft": ["--loss=dft"], "dft+special": ["--loss=dft", "--dft_sft_special_tokens=true", "--prior_check=false"]}
    if args.sft:
        variants["sft"] = ["--loss=sft", "--prior_check=false"]
    results = {"settings": vars(args), "models": {}}
    results["models"]["base"] = measure(config, None, args.limit, args.max_new_tokens)
    for name, overrides in variants.items():
        seconds = train(config, out / name, overrides)
        results["models"][name] = measure(config, out / name, args.limit, args.max_new_tokens) | {"train_seconds": seconds}
        (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'model':<14} {'p(EOS) median':>14} {'p(EOS) mean':>12} {'stops':>7} {'mean tokens':>12}")
    for name, r in results["models"].items():
        print(f"{name:<14} {r['p_eos_median']:>14.4f} {r['p_eos_mean']:>12.4f} {100 * r['stopped']:>6.0f}% {r['mean_tokens']:>12.1f}")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
