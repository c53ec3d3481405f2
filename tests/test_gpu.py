"""CUDA-only checks (skipped cleanly on CPU machines and in CI, which has no GPU).

`bash benchmarks/gpu/run.sh` runs these on a bare CUDA machine (`pytest -m gpu`) before the
benchmarks. Each compares against an independent reference: a float64 computation, the unpatched
model with `compute_loss_func`, the same samples run unpacked, or the memory CUDA reports.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from test_losses import grads_of, naive_loss, random_case

import dft_peft

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"


def needs_bitsandbytes():
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")


# ----------------------------------------------------------------------------- the fused loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_fused_matches_float64(dtype):
    """On CUDA a bf16/fp16 head is projected with fp32 accumulation and output (no fp32 copy of
    the weight); the loss equals the float64 loss of the same low-precision numbers."""
    h, w, labels = random_case(31, 2, 257, 256, 32000, dtype=dtype)
    h = h.detach().cuda().requires_grad_()
    w = w.detach().cuda().requires_grad_()
    labels = labels.cuda()
    got, (gh, gw) = grads_of(lambda: dft_peft.fused_linear_loss(h, w, labels, "dft"), h, w)
    ref, (rh, rw) = grads_of(lambda: naive_loss(h, w, labels, "dft"), h, w)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(gh.double(), rh.double(), atol=1e-4, rtol=tol)
    torch.testing.assert_close(gw.double(), rw.double(), atol=1e-4, rtol=tol)


def asft_reference(h, w, ref_h, labels, lam):
    """ASFT in float64 from its definition: DFT + lambda * KL(p_base || p_theta) per target token."""
    logits = (h.double() @ w.double().t())[..., :-1, :]
    base = (ref_h.double() @ w.double().t())[..., :-1, :]
    targets = labels[..., 1:]
    mask = targets != -100
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    base_logp = torch.log_softmax(base, -1)
    kl = (base_logp.exp() * (base_logp - logp_all)).sum(-1)
    per_token = -logp.exp().detach() * logp + lam * kl
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("loss", ["sft", "dft", "asft"])
def test_cuda_bf16_head_objectives_match_float64(loss):
    """bf16 hidden states and a bf16 head on CUDA, as in QLoRA training. Tolerance: the loss to
    1e-4 relative (fp32 accumulation over a 4096-wide dot product of bf16 numbers), gradients to
    2e-2 relative + 1e-4 absolute (they are returned in bf16, 8 bits of mantissa)."""
    h, w, labels = random_case(7, 2, 300, 4096, 32000, dtype=torch.bfloat16)
    h, w, labels = h.detach().cuda().requires_grad_(), w.detach().cuda().requires_grad_(), labels.cuda()
    ref_h = (h.detach() + 0.05 * torch.randn_like(h)).to(torch.bfloat16)
    from dft_peft.losses.fused import HeadProjector

    assert HeadProjector(w, None, torch.float32).weight_c is w  # no fp32 copy of the head
    kwargs = {"ref_hidden_states": ref_h, "asft_lambda": 0.1} if loss == "asft" else {}
    got, (gh, gw) = grads_of(lambda: dft_peft.fused_linear_loss(h, w, labels, loss, **kwargs), h, w)
    if loss == "asft":
        ref, (rh, rw) = grads_of(lambda: asft_reference(h, w, ref_h, labels, 0.1), h, w)
    else:
        ref, (rh, rw) = grads_of(lambda: naive_loss(h, w, labels, loss), h, w)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    torch.testing.assert_close(gh.double(), rh.double(), rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(gw.double(), rw.double(), rtol=2e-2, atol=1e-4)


# ----------------------------------------------------------------------------- models on CUDA


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import tiny_run

    return tiny_run.tiny_model_dir(tmp_path_factory)


def lora_4bit_model(model_dir, seed=0):
    """A real bitsandbytes NF4 (double quant) model on the GPU with LoRA on every linear layer,
    B initialised randomly so every LoRA weight gets a gradient."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0})
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model.train()


def lora_grads(model):
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_patch_model_on_real_4bit_matches_unpatched_with_compute_loss_func(tiny_model_dir):
    needs_bitsandbytes()
    from tiny_models import batch

    model = lora_4bit_model(tiny_model_dir)
    inputs = {k: v.cuda() for k, v in batch(seed=3, rows=2, length=48).items()}
    n_items = int((inputs["labels"][:, 1:] != -100).sum())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        ref = dft_peft.compute_loss_func("dft")(out, inputs["labels"], num_items_in_batch=n_items)
    ref.backward()
    ref_grads = lora_grads(model)
    model.zero_grad(set_to_none=True)
    dft_peft.patch_model(model, loss="dft")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = model(**inputs, num_items_in_batch=n_items).loss
    got.backward()
    got_grads = lora_grads(model)
    assert ref_grads.keys() == got_grads.keys() and len(got_grads) == 2 * 7 * 2
    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-3, atol=1e-5)
    for name, r in ref_grads.items():
        torch.testing.assert_close(got_grads[name], r, rtol=2e-2, atol=1e-5, msg=name)


def varlen_attentions() -> list[str]:
    """flash-attn's varlen kernels where the package is installed; PyTorch's sdpa always (with
    packed position_ids transformers builds a block-diagonal causal mask for it)."""
    found = ["sdpa"]
    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.get_device_capability()[0] >= 8:
        found.append("flash_attention_2")
    return found


@pytest.mark.parametrize("attention", varlen_attentions())
def test_packed_per_sample_losses_equal_unpacked(tiny_model_dir, attention):
    """Three samples packed into one row (position_ids restart at each sample, no attention mask,
    the first token of each sample has no target) give each sample the loss it has alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, attn_implementation=attention).cuda().eval()
    dft_peft.patch_model(model, loss="sft")
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(5, 500, (n,), generator=g) for n in (37, 64, 23)]
    packed_ids = torch.cat(samples)[None].cuda()
    position_ids = torch.cat([torch.arange(len(s)) for s in samples])[None].cuda()
    starts = [0, *torch.cumsum(torch.tensor([len(s) for s in samples]), 0).tolist()]
    with torch.no_grad():
        for i, sample in enumerate(samples):
            alone = model(input_ids=sample[None].cuda(), labels=sample[None].cuda()).loss
            labels = torch.full_like(packed_ids, -100)
            labels[0, starts[i] + 1 : starts[i + 1]] = packed_ids[0, starts[i] + 1 : starts[i + 1]]
            # the label at a sample's first token would be predicted from the previous sample
            packed = model(input_ids=packed_ids, position_ids=position_ids, labels=labels).loss
            torch.testing.assert_close(packed.float(), alone.float(), rtol=1e-2, atol=1e-3, msg=f"sample {i} ({attention})")


@pytest.mark.parametrize("checkpointing", [True, "offload"])
def test_qlora_train_steps_on_cuda_loss_finite_and_falling(tiny_model_dir, tmp_path, checkpointing):
    """`dft-peft train` on a small Llama-shaped model: NF4 QLoRA, bf16, gradient checkpointing
    (plain and offloaded), paged_adamw_8bit."""
    needs_bitsandbytes()
    import tiny_run

    from dft_peft.config import Config
    from dft_peft.train import train

    data = tiny_run.write_jsonl(tmp_path / "train.jsonl", tiny_run.alpaca_rows(64))
    cfg = Config.from_dict(
        tiny_run.config_dict(
            tiny_model_dir, data, tmp_path / "out", adapter="qlora", load_in_4bit=True, bf16=True,
            gradient_checkpointing=checkpointing, optimizer="paged_adamw_8bit", attn_implementation="sdpa",
            max_steps=12, learning_rate=2e-3, micro_batch_size=4,
        )
    )
    result = train(cfg)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) >= 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


# ----------------------------------------------------------------------------- the planner


def load_benchmark(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("tokens", [2048, 8192])
def test_planner_within_10_percent_of_measured_peak(tokens):
    """A 1B-class Llama-shaped NF4 model (built layer by layer by benchmarks/gpu/e2e.py), LoRA r32
    on every linear layer, bf16, gradient checkpointing, one full training step with fused dft:
    the planner's estimate of max_memory_reserved is within 10% of what CUDA reports."""
    needs_bitsandbytes()
    e2e = load_benchmark("e2e")
    shape = e2e.MEDIUM
    measured = e2e.measure(shape, tokens, loss="fused", checkpointing=True)
    planned = e2e.planned(shape, tokens, loss="fused", checkpointing=True)
    assert planned.torch_reserved == pytest.approx(measured["max_memory_reserved"], rel=0.10), (planned.parts, measured)
