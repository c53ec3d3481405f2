"""The loss alone at Llama-3's head on a GPU: naive full logits vs dft-peft fused vs Liger.

    python benchmarks/gpu/loss.py                       # 4k, 8k, 16k, 32k tokens, bf16, CUDA
    python benchmarks/gpu/loss.py --tokens 4096 16384   # chosen lengths
    python benchmarks/gpu/loss.py --smoke               # tiny shapes on CPU: proves it runs

Head: hidden 4096, vocab 128,256 (Llama-3), bf16, frozen (as under LoRA); the hidden states get
their gradient. Cases, each forward + backward, side by side in one process:

* naive sft / naive dft: full logits, upcast to fp32, log-softmax, gather, as TRL's SFTTrainer
  does (`loss_type="dft"`: `-exp(logp).detach() * logp`);
* fused sft / fused dft: `dft_peft.fused_linear_loss` (chunked, no full logits);
* liger dft: Liger's fused linear cross-entropy with `use_token_scaling=True` (its DFT), where
  liger-kernel imports.

Peak extra memory is `max_memory_allocated` during the call minus what the inputs held before
it; time is the best of `--repeats` after one warm-up. Ratios are printed against the naive path
of the same objective. A case that runs out of memory is reported as OOM, not as a crash.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for loss_paths
from loss_paths import fused_loss, naive_loss  # noqa: E402

HIDDEN, VOCAB = 4096, 128256
SMOKE_HIDDEN, SMOKE_VOCAB = 64, 512




def liger_dft() -> Callable | None:
    """Liger's fused linear CE with token scaling (DFT), or None where it does not import."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        fn = LigerFusedLinearCrossEntropyLoss(use_token_scaling=True)
    except (ImportError, TypeError, RuntimeError):
        return None

    def run(hidden, weight, labels, loss):
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        out = fn(weight, h, labels[:, 1:].reshape(-1))
        return out if torch.is_tensor(out) else out.loss

    return run


def cases() -> dict[str, tuple[Callable, str]]:
    found = {
        "naive sft": (naive_loss, "sft"),
        "fused sft": (fused_loss, "sft"),
        "naive dft": (naive_loss, "dft"),
        "fused dft": (fused_loss, "dft"),
    }
    liger = liger_dft()
    if liger is not None and torch.cuda.is_available():
        found["liger dft"] = (liger, "dft")
    return found


def run_case(fn, loss, tokens, hidden_size, vocab, device, dtype, repeats) -> dict:
    torch.manual_seed(0)
    weight = (torch.randn(vocab, hidden_size, device=device) * 0.02).to(dtype)
    hidden = torch.randn(1, tokens, hidden_size, device=device).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), device=device)
    labels[:, : tokens // 8] = -100  # a prompt
    cuda = device == "cuda"
    try:
        fn(hidden[:, :64], weight, labels[:, :64], loss).backward()  # warm-up, not measured
        hidden.grad = None
        times, extra = [], 0
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            value = fn(hidden, weight, labels, loss)
            value.backward()
            if cuda:
                torch.cuda.synchronize()
                extra = max(extra, torch.cuda.max_memory_allocated() - base)
            times.append(time.perf_counter() - start)
            hidden.grad = None
        return {"seconds": min(times), "extra_bytes": extra if cuda else None, "value": float(value.detach())}
    except torch.OutOfMemoryError:
        return {"seconds": None, "extra_bytes": None, "value": None, "oom": True}
    finally:
        del weight, hidden
        if cuda:
            torch.cuda.empty_cache()


def ratio(a, b) -> float | None:
    return None if not a or not b else a / b


def run(tokens_list, *, smoke: bool, repeats: int) -> list[dict]:
    device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    hidden, vocab = (SMOKE_HIDDEN, SMOKE_VOCAB) if smoke else (HIDDEN, VOCAB)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows = []
    for tokens in tokens_list:
        for name, (fn, loss) in cases().items():
            result = run_case(fn, loss, tokens, hidden, vocab, device, dtype, repeats)
            rows.append({"tokens": tokens, "case": name, "loss": loss, **result})
    by = {(r["tokens"], r["case"]): r for r in rows}
    for r in rows:
        naive = by[(r["tokens"], f"naive {r['loss']}")]
        r["memory_vs_naive"] = ratio(r["extra_bytes"], naive["extra_bytes"])
        r["time_vs_naive"] = ratio(r["seconds"], naive["seconds"])
        if r["case"] == "fused dft":
            r["time_vs_fused_sft"] = ratio(r["seconds"], by[(r["tokens"], "fused sft")]["seconds"])
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'tokens':>7} {'case':<10} {'extra MiB':>10} {'ms':>9} {'mem/naive':>10} {'time/naive':>11} {'loss':>10}")
    for r in rows:
        mem = "OOM" if r.get("oom") else "-" if r["extra_bytes"] is None else f"{r['extra_bytes'] / 2**20:.0f}"
        ms = "-" if r["seconds"] is None else f"{1000 * r['seconds']:.1f}"
        mv = "-" if r["memory_vs_naive"] is None else f"{r['memory_vs_naive']:.3f}"
        tv = "-" if r["time_vs_naive"] is None else f"{r['time_vs_naive']:.3f}"
        val = "-" if r["value"] is None else f"{r['value']:.5f}"
        print(f"{r['tokens']:>7} {r['case']:<10} {mem:>10} {ms:>9} {mv:>10} {tv:>11} {val:>10}")
    for r in rows:
        if r.get("time_vs_fused_sft"):
            print(f"{r['tokens']} tokens: fused dft / fused sft time {r['time_vs_fused_sft']:.3f}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI proves the script runs)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    tokens = args.tokens or ([64, 128] if args.smoke else [4096, 8192, 16384, 32768])
    rows = run(tokens, smoke=args.smoke, repeats=1 if args.smoke else args.repeats)
    shape = f"hidden {SMOKE_HIDDEN}, vocab {SMOKE_VOCAB} (smoke)" if args.smoke else f"hidden {HIDDEN}, vocab {VOCAB}"
    print(f"loss alone, {shape}, forward+backward, frozen head; liger: {'yes' if liger_dft() else 'not installed'}")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
