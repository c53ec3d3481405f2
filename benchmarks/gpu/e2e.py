"""A full QLoRA training step of a Llama-3.1-8B-shaped model: peak VRAM and tokens/s, naive vs
fused DFT, and the longest sequence that trains in 16 GB and 24 GB.

    python benchmarks/gpu/e2e.py                         # N = 2k..32k, then the 16/24 GB searches
    python benchmarks/gpu/e2e.py --tokens 4096 --no-search
    python benchmarks/gpu/e2e.py --smoke                 # tiny shapes on CPU: proves it runs

The model is built from Llama-3.1-8B's config with random weights (nothing is downloaded), one
decoder layer at a time directly on the GPU, each layer's linears quantized to NF4 with double
quant as soon as it exists, so neither host nor GPU ever holds the 16 GB bf16 model. Then it goes
through dft-peft's own `attach_adapter` (LoRA r32 on every linear layer, as `lora_target_linear:
true`; peft's kbit preparation; gradient checkpointing), bf16 autocast, paged 8-bit AdamW, batch 1,
one sequence of N tokens. Each step is forward + backward + optimizer step.

* naive: the unpatched model returns full [N, vocab] logits and the DFT loss is taken from them as
  TRL does (upcast to fp32, log-softmax, `-exp(logp).detach() * logp`);
* fused: `patch_model(model, loss="dft")`, dft-peft's chunked head.

Per step: `max_memory_reserved` and `max_memory_allocated` (torch's allocator; the CUDA context
comes on top), tokens/s, and the planner's estimate of the reserved peak beside it. The longest
N under a cap is found by doubling then bisection (to a multiple of 1024), with the allocator
limited by `torch.cuda.set_per_process_memory_fraction` to the cap minus the planner's CUDA-context
allowance (a 16 GB card's context is not available to tensors either).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dft_peft.memory.activations import apply_activation_memory  # noqa: E402
from dft_peft.model import adapter  # noqa: E402
from dft_peft.memory import planner  # noqa: E402

LLAMA_31_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=False,
)
MEDIUM = dict(  # ~1B parameters: the planner's GPU test (tests/test_gpu.py)
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=65536, tie_word_embeddings=False,
)
SMOKE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False,
)
LORA_R = 32


# ----------------------------------------------------------------------------- the model


def quantize_linears(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every nn.Linear under `module` by a bitsandbytes NF4 (double quant) Linear4bit."""
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            q = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None,
                compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                child.weight.data.to(dtype), requires_grad=False, compress_statistics=True, quant_type="nf4"
            ).to(device)  # quantized here; the bf16 weight is freed with `child`
            setattr(module, name, q)
            del child
        else:
            quantize_linears(child, dtype, device)


def build_model(shape: dict, device: str, dtype: torch.dtype):
    """A random Llama-shaped causal LM with NF4 decoder layers, built one layer at a time."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    config.use_cache = False
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    dev = torch.device(device)
    torch.manual_seed(0)
    with torch.device(dev):
        model.model.embed_tokens = torch.nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        model.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        model.model.norm = type(model.model.norm)(config.hidden_size, eps=config.rms_norm_eps).to(dtype)
        model.model.rotary_emb = LlamaRotaryEmbedding(config)  # built under torch.device(dev)
        for i in range(config.num_hidden_layers):
            layer = LlamaDecoderLayer(config, i).to(dtype)
            for lin in layer.modules():
                if isinstance(lin, torch.nn.Linear):
                    torch.nn.init.normal_(lin.weight, std=0.02)
            quantize_linears(layer, dtype, dev)
            model.model.layers[i] = layer
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(std=0.02)
        model.lm_head.weight.normal_(std=0.02)
    model.is_loaded_in_4bit = True  # what from_pretrained sets; peft's kbit preparation reads it
    return model


TILED = "offload+tiled"  # activation_offloading: true + tiled_mlp: true


def adapter_config(checkpointing) -> SimpleNamespace:
    """The Config fields `adapter.attach_adapter` and `apply_activation_memory` read, as a QLoRA
    YAML would set them; `offload+tiled` is offloaded checkpointing with the tiled MLP."""
    tiled = checkpointing == TILED
    return SimpleNamespace(
        tiled_mlp=tiled, tiled_mlp_num_shards=None,
        load_in_4bit=True, load_in_8bit=False, gradient_checkpointing="offload" if tiled else checkpointing,
        gradient_checkpointing_kwargs=None, lora_model_dir=None, lora_target_modules=None,
        lora_target_linear=True, lora_r=LORA_R, lora_alpha=16, lora_dropout=0.0, lora_modules_to_save=None,
    )


def prepare(shape: dict, device: str, dtype: torch.dtype, checkpointing):
    model = build_model(shape, device, dtype)
    cfg = adapter_config(checkpointing)
    model = adapter.attach_adapter(model, cfg)
    apply_activation_memory(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    if device == "cuda":
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    return model.train(), optimizer


# ----------------------------------------------------------------------------- one step


def naive_dft(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return -(logp.exp().detach() * logp).mean()


def set_loss(model, loss: str) -> None:
    from dft_peft.losses.patch import patch_state, unpatch_model

    import dft_peft

    if loss == "fused" and patch_state(model) is None:
        dft_peft.patch_model(model, loss="dft")
    elif loss == "naive" and patch_state(model) is not None:
        unpatch_model(model)


def train_step(model, optimizer, tokens: int, loss: str, device: str, dtype: torch.dtype) -> dict:
    """One forward + backward + optimizer step on one sequence of `tokens` tokens."""
    set_loss(model, loss)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        if loss == "fused":
            value = model(input_ids=ids, labels=ids).loss
        else:
            value = naive_dft(model(input_ids=ids).logits, ids)
    value.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "tokens": tokens,
        "loss": loss,
        "value": float(value.detach()),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "max_memory_reserved": torch.cuda.max_memory_reserved() if cuda else None,
        "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None,
    }


def try_step(model, optimizer, tokens, loss, device, dtype) -> dict | None:
    try:
        return train_step(model, optimizer, tokens, loss, device, dtype)
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        return None
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def planned(shape: dict, tokens: int, *, loss: str, checkpointing) -> planner.Estimate:
    """The planner's estimate for exactly this run (its shape, dft-peft's QLoRA choices)."""
    setup = planner.Setup(
        quant="nf4", double_quant=True, act_bytes=2, lora_r=LORA_R, optimizer="paged_adamw_8bit",
        checkpointing="offload" if checkpointing == TILED else checkpointing, tiled_mlp=checkpointing == TILED,
        sequence_len=tokens, micro_batch_size=1, loss=loss, attention="sdpa",
    )
    return planner.estimate(planner.shape_from_config({**shape, "model_type": "llama"}), setup)


def measure(shape: dict, tokens: int, *, loss: str = "fused", checkpointing=True) -> dict:
    """Build, warm up (optimizer states allocated), then one measured step."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, optimizer = prepare(shape, device, dtype, checkpointing)
    train_step(model, optimizer, 256, loss, device, dtype)
    result = train_step(model, optimizer, tokens, loss, device, dtype)
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------- longest N


def longest_under_cap(model, optimizer, cap_bytes: int, loss: str, device, dtype, *, start: int = 4096, step: int = 1024, limit: int = 262144) -> int | None:
    """Largest N (a multiple of `step`) whose training step runs with the allocator capped."""
    total = torch.cuda.get_device_properties(0).total_memory
    usable = cap_bytes - planner.CUDA_CONTEXT_BYTES
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, usable / total))
    try:
        ok, bad = 0, None
        n = start
        while n <= limit:  # doubling
            if try_step(model, optimizer, n, loss, device, dtype) is None:
                bad = n
                break
            ok, n = n, n * 2
        if bad is None:
            return ok
        while bad - ok > step:  # bisection
            mid = (ok + bad) // 2 // step * step
            if mid in (ok, bad):
                break
            if try_step(model, optimizer, mid, loss, device, dtype) is None:
                bad = mid
            else:
                ok = mid
        return ok or None
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- main


def run(args) -> dict:
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    shape = SMOKE if args.smoke else LLAMA_31_8B
    tokens_list = args.tokens or ([32, 64] if args.smoke else [2048, 4096, 8192, 16384, 32768])
    report = {"shape": shape, "device": device, "lora_r": LORA_R, "steps": [], "longest": []}
    for checkpointing in args.checkpointing:
        start = time.perf_counter()
        model, optimizer = prepare(shape, device, dtype, checkpointing)
        report.setdefault("build_seconds", time.perf_counter() - start)
        train_step(model, optimizer, 128, "fused", device, dtype)  # warm-up: optimizer states exist
        for tokens in tokens_list:
            for loss in args.losses:
                result = try_step(model, optimizer, tokens, loss, device, dtype)
                est = planned(shape, tokens, loss=loss, checkpointing=checkpointing)
                row = result or {"tokens": tokens, "loss": loss, "oom": True}
                row.update(checkpointing=checkpointing, planned_reserved=est.torch_reserved, planned_total=est.total)
                if result and result["max_memory_reserved"]:
                    row["planner_error"] = est.torch_reserved / result["max_memory_reserved"] - 1
                report["steps"].append(row)
                print(format_step(row), flush=True)
                save(report, args.json)
        if device == "cuda" and not args.no_search:
            for cap_gib in args.caps:
                for loss in args.search_losses:
                    n = longest_under_cap(model, optimizer, int(cap_gib * planner.GiB), loss, device, dtype)
                    setup_est = planner.longest_sequence_len(
                        planner.shape_from_config({**shape, "model_type": "llama"}),
                        planner.Setup(lora_r=LORA_R, checkpointing="offload" if checkpointing == TILED else checkpointing,
                                      tiled_mlp=checkpointing == TILED, loss=loss),
                        int(cap_gib * planner.GiB),
                        multiple=1024,
                    )
                    row = {"cap_gib": cap_gib, "loss": loss, "checkpointing": checkpointing, "longest_tokens": n, "planner_longest": setup_est}
                    report["longest"].append(row)
                    print(f"longest N under {cap_gib} GiB, {loss}, checkpointing {checkpointing}: {n} (planner: {setup_est})", flush=True)
                    save(report, args.json)
        del model, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()
    return report


def save(report: dict, path: str | None) -> None:
    """Written after every row, so a run stopped by its time limit keeps what it measured."""
    if path:
        Path(path).write_text(json.dumps(report, indent=2, default=str))


def format_step(r: dict) -> str:
    head = f"N={r['tokens']:>6} {r['loss']:<6} ckpt={str(r['checkpointing']):<7}"
    if r.get("oom"):
        return f"{head} OOM   planner {r['planned_reserved'] / planner.GiB:.2f} GiB"
    mem = "" if r["max_memory_reserved"] is None else (
        f" reserved {r['max_memory_reserved'] / planner.GiB:.2f} GiB allocated {r['max_memory_allocated'] / planner.GiB:.2f} GiB"
        f" planner {r['planned_reserved'] / planner.GiB:.2f} GiB ({100 * r['planner_error']:+.1f}%)"
    )
    return f"{head} {r['tokens_per_s']:>9.0f} tok/s loss {r['value']:.4f}{mem}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--losses", nargs="+", default=["naive", "fused"], choices=["naive", "fused"])
    parser.add_argument("--checkpointing", nargs="+", default=["true", "offload", TILED], help=f"true, offload and/or {TILED}")
    parser.add_argument("--search-losses", nargs="+", default=["fused"], choices=["naive", "fused"], help="losses for the longest-N search")
    parser.add_argument("--caps", type=float, nargs="+", default=[16, 24], help="GiB caps for the longest-N search")
    parser.add_argument("--no-search", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI proves the script runs)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    args.checkpointing = [True if c in ("true", "True", True) else c for c in args.checkpointing]
    report = run(args)
    save(report, args.json)
    return report


if __name__ == "__main__":
    main()
