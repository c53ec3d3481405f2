"""The planner's longest trainable sequence for Llama-3.1-8B QLoRA r32 (all linear layers, bf16,
paged_adamw_8bit, batch 1) under 16 and 24 GiB: naive vs fused loss, checkpointing vs offload.

    python benchmarks/plan_llama8b.py

Estimates from the model's config alone (no GPU, no weights); `benchmarks/gpu/e2e.py` measures
the same settings on a GPU. Printed side by side so a change to the planner or to what dft-peft
keeps in memory shows up as a ratio.
"""

from __future__ import annotations

from dataclasses import replace

from dft_peft.memory import planner
from dft_peft.memory.planner import Setup

LLAMA_31_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
    tie_word_embeddings=False, head_dim=128,
)
GIB = 1 << 30


def main() -> None:
    shape = planner.shape_from_config(LLAMA_31_8B)
    base = Setup(quant="nf4", act_bytes=2, lora_r=32, optimizer="paged_adamw_8bit", attention="flash_attention_2")
    rows = [
        ("naive loss, checkpointing, fp32 embeddings (peft's default)", replace(base, loss="naive", checkpointing=True, upcast_frozen=True)),
        ("fused, checkpointing, fp32 embeddings (peft's default)", replace(base, checkpointing=True, upcast_frozen=True)),
        ("fused, checkpointing", replace(base, checkpointing=True)),
        ("fused, offload", replace(base, checkpointing="offload")),
    ]
    naive = {}
    print(f"{'setup':62s} {'16 GiB':>8s} {'24 GiB':>8s}  x naive (16 / 24)")
    for i, (name, setup) in enumerate(rows):
        found = [planner.longest_sequence_len(shape, setup, gib * GIB) or 0 for gib in (16, 24)]
        if i == 0:
            naive = found
        ratio = " / ".join(f"{f / n:.1f}" if n else "-" for f, n in zip(found, naive))
        print(f"{name:62s} {found[0]:8,d} {found[1]:8,d}  {ratio}")


def _base_config() -> dict:
    return dict(
        base_model="meta-llama/Llama-3.1-8B", load_in_4bit=True, adapter="qlora", lora_r=32, lora_alpha=16,
        lora_target_linear=True, bf16=True, optimizer="paged_adamw_8bit", gradient_checkpointing=True,
        micro_batch_size=1, learning_rate=1e-4, datasets=[{"path": "d.jsonl", "type": "alpaca"}], loss="dft",
        attn_implementation="flash_attention_2", sequence_len=2048,
    )


MODES = {
    "checkpointing": {},
    "activation_offloading": {"activation_offloading": True},
    "activation_offloading + tiled_mlp": {"activation_offloading": True, "tiled_mlp": True},
}


def _modes():
    """(name, config, rehearser) for each activation-memory mode of MODES."""
    from dft_peft.config import Config
    from dft_peft.memory.rehearsal import Rehearser

    for name, extra in MODES.items():
        cfg = Config.model_validate({**_base_config(), **extra})
        yield name, cfg, Rehearser(cfg, LLAMA_31_8B)


def peaks(lengths: tuple[int, ...] = (2048, 8192, 32768)) -> None:
    """Peak GiB, planner / rehearsal, at fixed sequence lengths: where the two disagree, and by how much."""
    shape = planner.shape_from_config(LLAMA_31_8B)
    print(f"\n{'peak GiB, planner / rehearsed':40s} " + " ".join(f"{n:>16,d}" for n in lengths))
    for name, cfg, rehearser in _modes():
        cells = []
        for n in lengths:
            plan = planner.estimate(shape, replace(planner.setup_from_config(cfg), sequence_len=n)).total / GIB
            cells.append(f"{plan:6.2f} / {rehearser.step(n).total / GIB:6.2f}")
        print(f"{name:40s} " + " ".join(f"{c:>16s}" for c in cells), flush=True)


def rehearsed(budgets: tuple[int, ...] = (16, 24)) -> None:
    """Longest sequence_len (multiples of 1024) by the planner and by rehearsing the real step on
    the meta device (dft_peft/memory/rehearsal.py), for the three activation-memory modes."""
    shape = planner.shape_from_config(LLAMA_31_8B)
    print(f"\n{'longest sequence_len (dft, r32, batch 1)':40s} " + " ".join(f"{f'{g} GiB plan / rehearsed':>24s}" for g in budgets))
    for name, cfg, rehearser in _modes():
        cells = []
        for g in budgets:
            plan = planner.longest_sequence_len(shape, planner.setup_from_config(cfg), g * GIB, multiple=1024) or 0
            found, runs = rehearser.longest(g * GIB, hint=plan)
            cells.append(f"{plan:>11,d} / {found or 0:>10,d}")
        print(f"{name:40s} " + " ".join(f"{c:>24s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
    peaks()
    rehearsed()
