"""Peak memory and time of the naive loss path versus the fused path, side by side in one run.

    python benchmarks/loss.py                 # CPU: 1024 tokens at Llama-3-8B's head
    python benchmarks/loss.py --tokens 4096   # default on a GPU

The head is Llama-3-8B's (hidden 4096, vocab 128256). "naive" is what most trainers do: build
the full [tokens, vocab] logits, upcast to fp32, log-softmax, gather (SFT: CE; DFT: TRL's
`-exp(logp).detach() * logp`). "fused" is `dft_peft.fused_linear_loss`. Each case runs forward +
backward in its own fresh process so peaks do not leak between cases. Extra memory is the peak
over what the inputs already occupy: on CUDA `max_memory_allocated`, on CPU the resident-set
high-water mark (reset through /proc/self/clear_refs just before the measured call).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch

from loss_paths import fused_loss, naive_loss  # noqa: E402 - benchmarks/ is the script's folder

HIDDEN, VOCAB = 4096, 128256




def _rss_peak_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _rss_now_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_case(path: str, loss: str, tokens: int, device: str, dtype_name: str, head_grad: bool, repeats: int, queue):
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    fn = naive_loss if path == "naive" else fused_loss
    weight = (torch.randn(VOCAB, HIDDEN, device=device) * 0.02).to(dtype).requires_grad_(head_grad)
    hidden = torch.randn(1, tokens, HIDDEN, device=device).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (1, tokens), device=device)
    labels[:, : tokens // 8] = -100  # a prompt
    # warm-up on a small slice (kernel selection, lazy init), not measured
    fn(hidden[:, :64], weight, labels[:, :64], loss).backward()
    hidden.grad = weight.grad = None
    times, extra_mb = [], 0.0
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_rss_peak()
            base = _rss_now_kb() * 1024
        start = time.perf_counter()
        value = fn(hidden, weight, labels, loss)
        value.backward()
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_peak_kb() * 1024
        times.append(time.perf_counter() - start)
        # the gradients themselves (same in both paths) are part of the peak; count them once
        extra_mb = max(extra_mb, (peak - base) / 2**20)
        hidden.grad = weight.grad = None
    queue.put({"path": path, "loss": loss, "seconds": min(times), "extra_mb": extra_mb, "value": value.item()})


def measure(path, loss, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=run_case,
        args=(path, loss, args.tokens, args.device, args.dtype, args.head_grad, args.repeats, queue),
    )
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096 if cuda else 1024)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--head-grad", action="store_true", help="train the LM head too (default: frozen, as in LoRA)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    print(
        f"Llama-3-8B head (hidden {HIDDEN}, vocab {VOCAB}), {args.tokens} tokens, {args.device}, "
        f"{args.dtype}, head {'trained' if args.head_grad else 'frozen'}; forward+backward, best of {args.repeats}"
    )
    results = {(p, l): measure(p, l, args) for l in ("sft", "dft") for p in ("naive", "fused")}
    print(f"{'case':<12}{'extra MB':>12}{'seconds':>10}{'loss':>12}")
    for (p, l), r in results.items():
        print(f"{p + ' ' + l:<12}{r['extra_mb']:>12.1f}{r['seconds']:>10.3f}{r['value']:>12.6f}")
    print("ratios:")
    for l in ("sft", "dft"):
        n, f = results[("naive", l)], results[("fused", l)]
        print(f"  {l}: fused/naive peak extra memory {f['extra_mb'] / n['extra_mb']:.3f}, time {f['seconds'] / n['seconds']:.3f}")
    fd, fs = results[("fused", "dft")], results[("fused", "sft")]
    print(f"  fused dft / fused sft time {fd['seconds'] / fs['seconds']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r for r in results.values()], f, indent=2)


if __name__ == "__main__":
    main()
