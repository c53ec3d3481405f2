"""Axolotl's `llama4_linearized_experts`: Llama 4's routed experts as one `nn.Linear` per expert.

transformers' `Llama4TextExperts` holds all experts in two fused 3-D parameters
(`gate_up_proj` [experts, hidden, 2*inter], `down_proj` [experts, inter, hidden]), which neither
bitsandbytes' 4-bit loading nor LoRA can reach. Axolotl 0.19
(src/axolotl/monkeypatch/models/llama4/modeling.py) swaps that module for `gate_projs`,
`up_projs`, `down_projs` ModuleLists of `nn.Linear`, and loads a checkpoint already written in
that layout (`axolotl-quants/Llama-4-Scout-17B-16E-Linearized-bnb-nf4-bf16`, ...): the experts
are then 4-bit Linear4bit layers and LoRA may target `experts.gate_projs.[0-9]+$`. The forward is
the same function as the fused module's: expert i computes down_i(up_i(x) * act(gate_i(x))) on
its slice of the (expert-sorted) routed tokens.

A checkpoint with the fused layout is refused before loading: its experts would be left at their
random initialisation.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dft_peft.errors import UserError

FUSED_KEY = "feed_forward.experts.gate_up_proj"


class LinearizedLlama4Experts(nn.Module):
    """Llama4TextExperts with one nn.Linear per expert and projection (Axolotl's layout and names)."""

    def __init__(self, config: Any):
        super().__init__()
        from transformers.activations import ACT2FN

        self.num_experts = config.num_local_experts
        self.hidden_size = config.hidden_size
        self.expert_dim = config.intermediate_size
        self.gate_projs = nn.ModuleList(
            nn.Linear(self.hidden_size, self.expert_dim, bias=False) for _ in range(self.num_experts)
        )
        self.up_projs = nn.ModuleList(
            nn.Linear(self.hidden_size, self.expert_dim, bias=False) for _ in range(self.num_experts)
        )
        self.down_projs = nn.ModuleList(
            nn.Linear(self.expert_dim, self.hidden_size, bias=False) for _ in range(self.num_experts)
        )
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(experts * tokens, hidden), grouped by expert -> same shape (as Llama4TextExperts)."""
        grouped = hidden_states.view(self.num_experts, -1, self.hidden_size)
        outputs = [
            self.down_projs[i](self.up_projs[i](grouped[i]) * self.act_fn(self.gate_projs[i](grouped[i])))
            for i in range(self.num_experts)
        ]
        return torch.stack(outputs).view(-1, self.hidden_size)


def checkpoint_keys(model_path: Path) -> list[str]:
    """The tensor names of a safetensors checkpoint folder (index file or single file)."""
    path = Path(model_path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return list(f.keys())
    return []


def check_linearized_checkpoint(model_path: Path) -> None:
    keys = checkpoint_keys(model_path)
    if any(FUSED_KEY in k for k in keys):
        raise UserError(
            "llama4_linearized_experts: true needs a checkpoint with per-expert layers (e.g. "
            "axolotl-quants/Llama-4-Scout-17B-16E-Linearized-bnb-nf4-bf16); this base_model stores Llama 4's "
            "fused experts (feed_forward.experts.gate_up_proj): drop the key to train it as it is."
        )


@contextmanager
def linearized_experts(cfg: Any, model_path: Path):
    """While the model is built, every Llama4TextMoe gets LinearizedLlama4Experts. Yields the list
    of MoE blocks patched (empty: the model is not Llama 4, which is an error)."""
    patched: list[nn.Module] = []
    if not getattr(cfg, "llama4_linearized_experts", False):
        yield patched
        return
    check_linearized_checkpoint(model_path)
    from transformers.models.llama4 import modeling_llama4

    moe_cls = modeling_llama4.Llama4TextMoe
    original_init = moe_cls.__init__

    def init(self, config, *args, **kwargs):
        original_init(self, config, *args, **kwargs)
        self.experts = LinearizedLlama4Experts(config)
        patched.append(self)

    moe_cls.__init__ = init
    try:
        yield patched
    finally:
        moe_cls.__init__ = original_init
    if not patched:
        raise UserError("llama4_linearized_experts: true, but base_model is not a Llama 4 model (no Llama4TextMoe); drop the key.")
