"""Will it fit? Peak GPU memory of a LoRA/QLoRA run from the model's config alone.

No weights and no GPU are needed: the shape of the model (hidden size, layers, heads, vocabulary,
from a `config.json`, a GGUF header or a cached hub config) and the YAML's choices (quantization,
LoRA rank and targets, optimizer, precision, checkpointing, sequence length, batch) give each part
of the peak. Every formula is written out below and in /work/notes/issue-8.md; the constants that
only a GPU can settle (allocator slack, the CUDA context, the per-layer activation count) are named
so that the measured calibration changes one number, not the code.

Peak = weights + trainable (LoRA weights, their fp32 gradients, optimizer states)
       + max(loss phase, backward phase) + CUDA overhead,

where the loss phase holds the checkpointed layer inputs, the final norm and the loss's working
memory, and the backward phase holds the checkpointed inputs plus one decoder layer's recomputed
activations and its gradient temporaries (without checkpointing: every layer's activations).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dft_peft.errors import UserError
from dft_peft.memory.tiling_plan import mlp_shard_tokens
from dft_peft.model.shape import LLAMA_LINEARS, ModelShape, config_from_gguf, model_config, shape_from_config

__all__ = ["LLAMA_LINEARS", "ModelShape", "Setup", "Estimate", "config_from_gguf", "model_config", "shape_from_config",
           "estimate", "longest_sequence_len", "memory_report", "check_fits", "parse_memory"]

GiB = 1 << 30
MiB = 1 << 20

# ----------------------------------------------------------------------------- calibration
# Constants to be measured on a GPU (benchmarks/gpu/e2e.py prints planner vs measured peaks).
CUDA_CONTEXT_BYTES = 600 * MiB  # driver context + cuBLAS/cuDNN handles: outside torch's allocator
ALLOCATOR_SLACK = 0.05  # max_memory_reserved / max_memory_allocated - 1 (fragmentation)
NF4_BLOCK = 64  # bitsandbytes 4-bit block size (one absmax per 64 weights)
NESTED_BLOCK = 256  # double quant: one fp32 absmax per 256 first-level absmax bytes
QUANT_TENSOR_OVERHEAD = 1100  # per 4-bit tensor: code books and offset of its quant state

OPTIMIZER_STATE_BYTES = {  # bytes per trainable parameter
    "adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_32bit": 8, "adamw_bnb_8bit": 2, "paged_adamw_8bit": 2,
}


# ----------------------------------------------------------------------------- the run's choices


@dataclass(frozen=True)
class Setup:
    """The YAML choices that move the peak. `act_bytes` is the compute dtype's size (2 for
    bf16/fp16, 4 for fp32); `upcast_frozen` says the non-quantized weights (embeddings, head)
    stay in fp32 as peft's `prepare_model_for_kbit_training` leaves them, which also makes the
    residual stream fp32. dft-peft casts them back to the 4-bit compute dtype
    (`adapter.restore_half_precision_embeddings`), so by default they are not upcast."""

    quant: str | None = "nf4"  # "nf4", "fp4", "int8" or None (16-bit base weights)
    double_quant: bool = True
    act_bytes: int = 2
    lora_r: int = 32
    targets: tuple[str, ...] = LLAMA_LINEARS
    lora_dropout: float = 0.0
    trainable_embeddings: int = 0  # embed_tokens / lm_head in lora_modules_to_save (0, 1 or 2)
    optimizer: str = "paged_adamw_8bit"
    checkpointing: bool | str = True  # False, True or "offload"
    sequence_len: int = 4096
    micro_batch_size: int = 1
    loss: str = "fused"  # "fused" (dft-peft's chunked head) or "naive" (full logits, TRL's path)
    loss_stats: bool = True  # dft-peft logs entropy etc.: one more [rows, vocab] buffer per chunk
    attention: str = "sdpa"  # "sdpa", "flash_attention_2" or "eager"
    packing: bool = False
    upcast_frozen: bool | None = None  # None: false (dft-peft restores bf16/fp16 after peft's cast)
    tiled_mlp: bool = False  # MLP intermediates exist for one sequence shard at a time (tiled_mlp.py)
    tiled_mlp_num_shards: int | None = None

    @property
    def tokens(self) -> int:
        return self.sequence_len * self.micro_batch_size

    @property
    def frozen_bytes(self) -> int:
        upcast = bool(self.upcast_frozen)
        return 4 if upcast else self.act_bytes

    @property
    def residual_bytes(self) -> int:
        """Layer inputs are as wide as the embedding output (fp32 when it was upcast)."""
        return max(self.frozen_bytes, self.act_bytes)


def setup_from_config(cfg: Any, *, act_bytes: int | None = None) -> Setup:
    """A `Setup` from a validated Config. `bf16: auto` plans for a GPU (bf16) unless told."""
    if act_bytes is None:
        act_bytes = 4 if (cfg.bf16 is False or cfg.bf16 is None) and not cfg.fp16 else 2
    quant = cfg.bnb_4bit_quant_type if cfg.load_in_4bit else "int8" if cfg.load_in_8bit else None
    saved = {m for m in (cfg.lora_modules_to_save or []) if m in ("embed_tokens", "lm_head")}
    attention = cfg.attn_implementation or "sdpa"  # planned as asked: the GPU decides at load time
    return Setup(
        quant=quant,
        double_quant=cfg.bnb_4bit_use_double_quant,
        act_bytes=act_bytes,
        lora_r=cfg.lora_r,
        targets=lora_targets(cfg),
        lora_dropout=cfg.lora_dropout,
        trainable_embeddings=len(saved),
        optimizer=cfg.optimizer,
        checkpointing=cfg.gradient_checkpointing,
        sequence_len=cfg.sequence_len,
        micro_batch_size=cfg.micro_batch_size,
        attention=attention,
        packing=cfg.sample_packing,
        tiled_mlp=bool(getattr(cfg, "tiled_mlp", False)),
        tiled_mlp_num_shards=getattr(cfg, "tiled_mlp_num_shards", None),
    )


def lora_targets(cfg: Any) -> tuple[str, ...]:
    """Which of a Llama layer's linears get LoRA, as peft would match `lora_target_modules`."""
    if cfg.lora_target_linear:
        return LLAMA_LINEARS
    wanted = cfg.lora_target_modules
    if not wanted:
        return ("q_proj", "v_proj")  # peft's default for Llama-family models
    if isinstance(wanted, str):  # a regex, matched by peft against the full module name
        paths = {n: f"model.layers.0.{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}" for n in LLAMA_LINEARS}
        return tuple(n for n, p in paths.items() if re.fullmatch(wanted, p))
    return tuple(n for n in LLAMA_LINEARS if n in set(wanted))


# ----------------------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    """Bytes of each part of the peak, in the order they are printed."""

    parts: dict[str, int] = field(default_factory=dict)
    tokens: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def torch_reserved(self) -> int:
        """What `torch.cuda.max_memory_reserved` should read (no CUDA context)."""
        return self.total - self.parts.get("CUDA context", 0)

    def table(self) -> str:
        width = max(len(k) for k in self.parts)
        lines = [f"  {name:<{width}}  {gib(size):>9}" for name, size in self.parts.items()]
        lines.append(f"  {'total (peak)':<{width}}  {gib(self.total):>9}")
        return "\n".join(lines)


def weight_bytes(shape: ModelShape, setup: Setup) -> int:
    """Quantized decoder linears + the rest (embeddings, head, norms) in their dtype.

    NF4/FP4: 0.5 byte per weight + one absmax per 64 weights (fp32, or with double quant one
    byte plus one fp32 per 256 blocks) + a small fixed quant state per tensor. int8: 1 byte per
    weight + one fp32 scale per output row. The head and embeddings are never quantized.
    """
    linears = shape.linears().values()
    per_layer = 0
    for fan_in, fan_out in linears:
        n = fan_in * fan_out
        if setup.quant in ("nf4", "fp4"):
            blocks = math.ceil(n / NF4_BLOCK)
            absmax = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) if setup.double_quant else 4 * blocks
            per_layer += n // 2 + absmax + QUANT_TENSOR_OVERHEAD
        elif setup.quant == "int8":
            per_layer += n + 4 * fan_out
        else:
            per_layer += n * setup.act_bytes
    return shape.layers * per_layer + shape.other_params() * setup.frozen_bytes


def lora_parameters(shape: ModelShape, setup: Setup) -> int:
    """r * (in + out) per targeted linear per layer, plus full copies of modules_to_save."""
    linears = shape.linears()
    per_layer = sum(setup.lora_r * (linears[n][0] + linears[n][1]) for n in setup.targets)
    return shape.layers * per_layer + setup.trainable_embeddings * shape.vocab * shape.hidden


def trainable_bytes(shape: ModelShape, setup: Setup) -> dict[str, int]:
    """LoRA weights in fp32 (peft's autocast_adapter_dtype), fp32 gradients, optimizer states
    (AdamW: two fp32 moments, 8 bytes; bitsandbytes 8-bit AdamW: two uint8 moments, 2 bytes).
    Paged optimizers live in unified memory and are counted as resident (the worst case)."""
    n = lora_parameters(shape, setup)
    return {
        "adapter weights": 4 * n,
        "adapter gradients": 4 * n,
        "optimizer states": OPTIMIZER_STATE_BYTES.get(setup.optimizer, 8) * n,
    }


def layer_activation_bytes_per_token(shape: ModelShape, setup: Setup) -> int:
    """Tensors one decoder layer keeps for its backward pass, per token (Hugging Face Llama
    layer, LoRA on `targets`, frozen base):

    * each RMSNorm keeps its input upcast to fp32: 2 x 4H; with checkpointing, lean_norm.py's: a*H;
    * attention block input to q/k/v (a*H) and, for o_proj, the reshaped attention output (a*q);
    * q, k, v after RoPE and the attention output, kept by the attention kernel (a*(2q + 2kv));
      sdpa with a mask (eager, or packing without flash-attn) repeats k/v to all heads;
      plus the kernel's fp32 logsumexp (4 per head);
    * MLP input (a*H); gate, silu(gate), up and their product (4 a*I);
    * LoRA: the A output of each targeted linear (fp32: 4r each) and, with lora_dropout > 0, the
      dropped-out input copy and its mask per targeted linear ((a + 1) * in_features).
    Eager attention also keeps the [heads, T] attention probabilities per token (a*heads*T).
    """
    a, h, i = setup.act_bytes, shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    repeated = setup.attention == "eager" or (setup.packing and setup.attention != "flash_attention_2")
    kv_kept = q if repeated and shape.kv_heads != shape.heads else kv
    total = a * h if setup.checkpointing else 8 * h
    total += a * (h + q)
    total += a * (2 * q + 2 * kv_kept) + 4 * shape.heads
    total += a * (h + (0 if setup.tiled_mlp else 4 * i))  # tiled: see mlp_shard_tokens
    total += sum(4 * setup.lora_r for _ in setup.targets)
    if setup.lora_dropout > 0:
        linears = shape.linears()
        total += sum((a + 1) * linears[n][0] for n in setup.targets)
    if setup.attention == "eager":
        total += a * shape.heads * setup.sequence_len
    return total


def layer_backward_transient(shape: ModelShape, setup: Setup) -> int:
    """Gradient temporaries while one layer runs backward: the gradients of the MLP's widest
    tensors (2 a*I per token) and of the residual stream (2 x 4H per token), plus the two
    largest weights dequantized to the compute dtype (bitsandbytes rebuilds them each call)."""
    a = setup.act_bytes
    largest = max(fi * fo for fi, fo in shape.linears().values())
    dequant = 2 * largest * a if setup.quant else 0
    return setup.tokens * 8 * shape.hidden + mlp_shard_tokens(shape, setup) * 2 * a * shape.intermediate + dequant


def loss_working_bytes(shape: ModelShape, setup: Setup) -> int:
    """The loss's own memory on top of the final hidden states.

    fused (dft_peft/losses/fused.py): a copy of the valid rows' hidden states (in the residual
    dtype), their fp32 gradient [n, H], and per chunk one fp32 [rows, V] buffer (plus one more for
    the logged entropy), rows chosen as fused.py does on CUDA (>= 16M logits, or n/8 rows when larger, at most 64M logits).
    naive (TRL): logits [n, V] in the compute dtype, their fp32 upcast, log-softmax and its
    gradient in fp32 (a + 12 bytes per logit).
    """
    n, v, h = setup.tokens, shape.vocab, shape.hidden
    if setup.loss == "naive":
        return n * v * (setup.act_bytes + 12)
    rows = fused_chunk_rows(v, n)
    chunk = rows * v * 4 * (2 if setup.loss_stats else 1) + rows * h * 4
    return n * h * (setup.residual_bytes + 4) + chunk


def fused_chunk_rows(vocab: int, rows: int) -> int:
    """Rows per chunk as dft_peft/losses/fused.py picks them on a CUDA GPU."""
    from dft_peft.losses.fused import chunk_rows

    return min(rows, chunk_rows(vocab, rows, "cuda"))


def estimate(shape: ModelShape, setup: Setup) -> Estimate:
    """The peak, part by part (see the module docstring for how the parts combine)."""
    t = setup.tokens
    parts: dict[str, int] = {"weights": weight_bytes(shape, setup)}
    parts.update(trainable_bytes(shape, setup))
    layer = layer_activation_bytes_per_token(shape, setup) * t
    if setup.tiled_mlp:  # gate, up, act and product of one shard, held while it is back-propagated
        layer += 4 * setup.act_bytes * shape.intermediate * mlp_shard_tokens(shape, setup)
    checkpoint_in = shape.hidden * setup.residual_bytes * t
    if setup.checkpointing == "offload":
        kept = 2 * checkpoint_in  # the layer being recomputed and the next one's input coming back
    elif setup.checkpointing:
        kept = shape.layers * checkpoint_in
    else:
        kept = shape.layers * layer
    final_norm = shape.hidden * (4 + setup.residual_bytes) * t
    loss_phase = final_norm + loss_working_bytes(shape, setup)
    backward_phase = layer_backward_transient(shape, setup) + (layer if setup.checkpointing else 0)
    parts["activations" + (" (checkpointed inputs, offloaded)" if setup.checkpointing == "offload" else " (checkpointed inputs)" if setup.checkpointing else "")] = kept
    if max(loss_phase, backward_phase) == loss_phase:
        parts[f"loss working memory ({setup.loss})"] = loss_phase
    else:
        parts["layer recompute + backward"] = backward_phase
    if setup.packing and setup.attention != "flash_attention_2":
        parts["attention mask"] = setup.micro_batch_size * setup.sequence_len**2
    parts["allocator slack"] = int(ALLOCATOR_SLACK * sum(parts.values()))
    parts["CUDA context"] = CUDA_CONTEXT_BYTES
    return Estimate(parts, t)


def longest_sequence_len(shape: ModelShape, setup: Setup, budget: int, *, multiple: int = 256) -> int | None:
    """The longest `sequence_len` (a multiple of `multiple`) whose estimate fits in `budget`
    bytes at the setup's micro_batch_size, or None when not even `multiple` tokens fit."""

    def fits(length: int) -> bool:
        return estimate(shape, replace(setup, sequence_len=length)).total <= budget

    if not fits(multiple):
        return None
    lo, hi = 1, 2
    while fits(hi * multiple) and hi < 1 << 16:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * multiple) else (lo, mid)
    return lo * multiple


# ----------------------------------------------------------------------------- sizes and reports


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def parse_memory(text: str) -> int:
    """`16GB`, `16GiB`, `24G`, `16000MB`, `16` (GiB) -> bytes. GB means GiB, as GPU makers'
    "16 GB" cards hold 16 GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise UserError(f"--gpu-memory `{text}`: write a size such as 16GB, 24GiB or 12000MB.")
    scale = {"": GiB, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}[match.group(2)]
    return int(float(match.group(1)) * scale)


def cuda_memory() -> tuple[int, str] | None:
    """(total bytes, name) of the current CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.total_memory, props.name


def plan_for(cfg: Any, model_path: str | Path | None = None) -> tuple[ModelShape, Setup]:
    """Shape and setup of a config's run; `model_path`: the already resolved local model folder."""
    if model_path is not None and not cfg.base_model_config:
        config = model_config(str(model_path))
    else:
        config = model_config(
            cfg.base_model,
            revision=cfg.model_revision,
            base_model_config=cfg.base_model_config,
            gguf_file=getattr(cfg, "gguf_file", None),
        )
    return shape_from_config(config), setup_from_config(cfg)


def memory_report(cfg: Any, gpu_memory: int | None = None) -> str:
    """The breakdown for `dft-peft validate`, and the longest sequence_len that fits."""
    shape, setup = plan_for(cfg)
    est = estimate(shape, setup)
    lines = [
        f"# will it fit (estimate from the model config; {shape.model_type}, {shape.parameter_count() / 1e9:.2f}B parameters)",
        f"sequence_len {setup.sequence_len} x micro_batch_size {setup.micro_batch_size}; "
        f"{setup.quant or '16-bit'} weights; gradient_checkpointing {setup.checkpointing}; {setup.optimizer}",
        est.table(),
    ]
    card = cuda_memory()
    if gpu_memory:
        budgets = [(gpu_memory, f"--gpu-memory ({gib(gpu_memory)})")]
    elif card:
        budgets = [(card[0], f"{card[1]} ({gib(card[0])})")]
    else:
        budgets = [(16 * GiB, "a 16 GiB card"), (24 * GiB, "a 24 GiB card")]
    for budget, name in budgets:
        longest = longest_sequence_len(shape, setup, budget)
        verdict = "fits" if est.total <= budget else "does NOT fit"
        lines.append(
            f"{name}: {verdict}; longest sequence_len that fits: "
            + (f"{longest}" if longest else "none (the weights and states alone do not fit)")
        )
    return "\n".join(lines)


def check_fits(cfg: Any, model_path: str | Path | None = None) -> None:
    """Before `dft-peft train` loads weights on a CUDA machine: stop with one line when the
    estimate exceeds the card. `memory_check: false` turns this off."""
    card = cuda_memory()
    if card is None or not getattr(cfg, "memory_check", True):
        return
    try:
        shape, setup = plan_for(cfg, model_path)
    except UserError:
        return  # no config to plan from: loading the model will say what is missing
    est = estimate(shape, setup)
    if est.total <= card[0]:
        return
    longest = longest_sequence_len(shape, setup, card[0])
    hint = f"sequence_len to {longest}" if longest else "load_in_4bit: true"
    raise UserError(
        f"estimated peak GPU memory {gib(est.total)} exceeds the {gib(card[0])} of {card[1]}: lower {hint}"
        f" or micro_batch_size, or set gradient_checkpointing: offload; `dft-peft validate` shows the breakdown;"
        f" memory_check: false trains anyway."
    )
