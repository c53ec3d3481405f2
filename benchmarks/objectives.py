"""Time of the fused path per objective, alternating in one process, as ratios to `sft`.

    python benchmarks/objectives.py                  # CPU: 1024 tokens, Llama-3-8B head, 5 rounds

The objectives share one fused path, so their differences are small and a side-by-side run in
separate processes (benchmarks/loss.py) is dominated by machine noise; alternating the order
each round and reporting min and median per objective gives a steadier ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dft_peft

HIDDEN, VOCAB = 4096, 128256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--losses", nargs="+", default=["sft", "dft", "prob"])
    args = parser.parse_args()

    torch.manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN) * 0.02
    hidden = torch.randn(1, args.tokens, HIDDEN).requires_grad_()
    labels = torch.randint(0, VOCAB, (1, args.tokens))
    labels[:, : args.tokens // 8] = -100
    times: dict[str, list[float]] = {name: [] for name in args.losses}
    for round_ in range(args.rounds):
        order = args.losses if round_ % 2 == 0 else list(reversed(args.losses))
        for name in order:
            start = time.perf_counter()
            dft_peft.fused_linear_loss(hidden, weight, labels, name).backward()
            times[name].append(time.perf_counter() - start)
            hidden.grad = None
    base_min, base_median = min(times["sft"]), statistics.median(times["sft"])
    print(f"fused path, {args.tokens} tokens, hidden {HIDDEN}, vocab {VOCAB}, {args.rounds} alternating rounds")
    print(f"{'loss':<8}{'min s':>9}{'median s':>10}{'min/sft':>9}{'median/sft':>12}")
    for name, values in times.items():
        low, mid = min(values), statistics.median(values)
        print(f"{name:<8}{low:>9.3f}{mid:>10.3f}{low / base_min:>9.3f}{mid / base_median:>12.3f}")


if __name__ == "__main__":
    main()
