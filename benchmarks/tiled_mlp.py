"""Step time and peak memory of a LoRA model with tiled MLPs versus untiled, side by side in one run.

    python benchmarks/tiled_mlp.py                        # CPU: 4096 tokens, 4 shards
    python benchmarks/tiled_mlp.py --tokens 8192 --shards 8

The model is a small random Llama (hidden 512, intermediate 1536, 4 layers, vocab 4096, sdpa
attention) with LoRA on every linear layer. Time: one model, switched between tiled
(`apply_tiled_mlp(model, num_shards=S)`) and untiled (`num_shards=1`, which calls the original
forward) every step, so drift of the machine hits both equally; median of the timed steps after
warm-ups. Memory: on CUDA `max_memory_allocated` over what is allocated before the step; on CPU
the resident-set high-water mark over the resident set before the step (reset through
/proc/self/clear_refs), measured in a child process run with a fixed malloc mmap threshold so that
freed tensors go back to the OS at once and the resident set follows live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import peft
import torch
import transformers

from dft_peft.memory.tiled_mlp import apply_tiled_mlp, mlp_shard_count

SHAPE = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
VOCAB = 4096


def build(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=32768, **SHAPE)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    model = peft.get_peft_model(model, lora).to(device).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """One forward + backward; returns (seconds, peak bytes over the bytes held before it)."""
    model.zero_grad(set_to_none=True)
    cuda = ids.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS:") * 1024
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM:") * 1024
    return seconds, float(peak - base)


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    model = build(args.device)
    ids = torch.randint(0, VOCAB, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(args.device)
    times: dict[str, list[float]] = {"untiled": [], "tiled": []}
    peaks: dict[str, list[float]] = {"untiled": [], "tiled": []}
    for i in range(args.warmup + args.reps):
        order = ("tiled", "untiled") if i % 2 else ("untiled", "tiled")
        for case in order:
            apply_tiled_mlp(model, num_shards=args.shards if case == "tiled" else 1)
            seconds, peak = step(model, ids)
            if i >= args.warmup:
                times[case].append(seconds)
                peaks[case].append(peak)
    return {
        c: {
            "median_s": statistics.median(times[c]),
            "min_s": min(times[c]),
            "peak_mb": max(peaks[c]) / 2**20,
        }
        for c in times
    }


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child:  # CPU memory run: fixed mmap threshold set by the parent
        print(json.dumps(run(args)))
        return

    auto = mlp_shard_count(args.tokens, SHAPE["intermediate_size"], 4)
    print(
        f"Llama hidden {SHAPE['hidden_size']}, intermediate {SHAPE['intermediate_size']}, "
        f"{SHAPE['num_hidden_layers']} layers, vocab {VOCAB}, LoRA r=16 on all linear layers; "
        f"{args.tokens} tokens, {args.device}, fp32, {args.shards} shards (the 256 MiB default rule would pick {auto}); "
        f"forward+backward, median of {args.reps} after {args.warmup} warm-up, alternating"
    )
    timing = run(args)
    if args.device == "cpu":
        env = {
            **os.environ,
            "MALLOC_MMAP_THRESHOLD_": "65536",
            "MALLOC_TRIM_THRESHOLD_": "0",
        }
        cmd = [sys.executable, __file__, "--memory-child", "--tokens", str(args.tokens), "--shards", str(args.shards),
               "--warmup", "1", "--reps", "1", "--device", "cpu"]  # fmt: skip
        memory = json.loads(
            subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
    else:
        memory = timing
    print(f"{'case':<10}{'median s':>10}{'min s':>10}{'peak MB':>10}")
    for case in ("untiled", "tiled"):
        t = timing[case]
        print(f"{case:<10}{t['median_s']:>10.3f}{t['min_s']:>10.3f}{memory[case]['peak_mb']:>10.1f}")
    u, t = timing["untiled"], timing["tiled"]
    print(
        f"ratios tiled/untiled: step time {t['median_s'] / u['median_s']:.3f} (median), "
        f"{t['min_s'] / u['min_s']:.3f} (min); peak memory {memory['tiled']['peak_mb'] / memory['untiled']['peak_mb']:.3f}"
    )


if __name__ == "__main__":
    main()
