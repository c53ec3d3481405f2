"""`relora: true` and `jagged_restart_*`: Axolotl 0.19's ReLoRA, on real peft and bitsandbytes.

References are independent of dft_peft/training/relora.py and jagged_schedule.py: the merged
weight W + scale * B @ A computed here in float64 from the layer's own tensors, NF4's code book
from the QLoRA paper (its largest gap bounds the requantization error), Axolotl's magnitude
pruning restated with torch.quantile, Axolotl's jagged factor restated from utils/schedulers.py,
and learning rates recorded from Axolotl 0.19's own JaggedLRRestartScheduler.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
import tiny_run
from safetensors.torch import load_file
from tiny_models import tiny_causal_lm

from dft_peft.errors import UserError
from dft_peft.train import train
from dft_peft.training.relora import BASE_WEIGHTS, ReLoRACallback, lora_layers

TARGETS = ["q_proj", "v_proj", "down_proj"]
# NF4 (QLoRA paper, appendix E): the 16 values a 4-bit weight takes, times its block's absmax.
NF4 = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1848449, -0.0910500, 0.0,
       0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
BLOCK = 64  # bitsandbytes' 4-bit block size


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("relora-model")
    tiny_causal_lm("llama", seed=0, hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def lora_model(folder, *, four_bit: bool):
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    torch.manual_seed(0)  # init_lora_weights=False: B is random too, so the merge has something to add
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    return peft.get_peft_model(model, config).eval()


def callback(**cfg):
    defaults = dict(jagged_restart_steps=3, relora_cpu_offload=False, relora_prune_method=None, relora_prune_ratio=None, seed=0)
    return ReLoRACallback(types.SimpleNamespace(**{**defaults, **cfg}))


def restart(cb, model, optimizer=None, step=3):
    cb.on_step_begin(None, types.SimpleNamespace(global_step=step), None, model=model, optimizer=optimizer)


def reference_merge(layer) -> torch.Tensor:
    """W + (alpha / r) * B @ A in float64 from the layer's own tensors."""
    import bitsandbytes as bnb

    weight = layer.get_base_layer().weight
    if type(weight).__name__ == "Params4bit":
        base = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    else:
        base = weight.data
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = layer.lora_alpha["default"] / layer.r["default"]
    return base.double() + scale * (b.double() @ a.double())


IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_full_precision_restart_keeps_the_function_and_adds_exactly_scale_b_a(folder):
    model = lora_model(folder, four_bit=False)
    before = model(input_ids=IDS).logits
    expected = {name: reference_merge(layer) for name, layer in lora_layers(model).items()}
    old_a = {name: layer.lora_A["default"].weight.clone() for name, layer in lora_layers(model).items()}
    restart(callback(), model)
    after = model(input_ids=IDS).logits
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-5), (after - before).abs().max()
    assert len(expected) == 2 * len(TARGETS)
    for name, layer in lora_layers(model).items():
        merged = layer.get_base_layer().weight
        assert torch.allclose(merged.double(), expected[name], atol=1e-6), name
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.count_nonzero(b) == 0, name
        assert not torch.equal(a, old_a[name]) and a.abs().max() <= 1 / math.sqrt(a.shape[1]) + 1e-7  # kaiming bound
        assert a.std() > 0.2 / math.sqrt(a.shape[1])


@torch.no_grad()
def test_4bit_restart_requantizes_within_nf4s_error(folder):
    pytest.importorskip("bitsandbytes")
    model = lora_model(folder, four_bit=True)
    before = model(input_ids=IDS).logits
    expected = {name: reference_merge(layer) for name, layer in lora_layers(model).items()}
    unmerged = model.get_base_model()  # the same model without its LoRA: how far the delta moves the logits
    with model.disable_adapter():
        without_delta = unmerged(input_ids=IDS).logits
    restart(callback(), model)
    after = model(input_ids=IDS).logits

    import bitsandbytes as bnb

    half_gap = max(b - a for a, b in zip(NF4, NF4[1:])) / 2
    for name, layer in lora_layers(model).items():
        weight = layer.get_base_layer().weight
        assert type(weight).__name__ == "Params4bit", name
        got = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).double().flatten()
        ref = expected[name].flatten()
        absmax = ref.view(-1, BLOCK).abs().amax(dim=1).repeat_interleave(BLOCK)
        assert ((got - ref).abs() <= absmax * half_gap * 1.02 + 1e-6).all(), name  # 2%: double-quantized absmax
        assert (got - ref).abs().mean() < (ref - ref.mean()).abs().mean() / 5, name
    change, delta_effect = (after - before).norm(), (without_delta - before).norm()
    assert change < delta_effect / 2, (change, delta_effect)  # the delta is kept, up to requantization


def test_optimizer_moments_are_pruned_as_axolotl_prunes_them(folder):
    model = lora_model(folder, four_bit=False).train()
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for seed in range(2):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    ratio = 0.7
    # Axolotl: keep |m| > torch.quantile(|m|, ratio), per tensor.
    kept = {(id(p), key): int((s[key].abs() > torch.quantile(s[key].abs().flatten(), ratio)).sum()) for p in params for s in [optimizer.state[p]] for key in ("exp_avg", "exp_avg_sq")}
    survivors = {(id(p), key): optimizer.state[p][key][optimizer.state[p][key] != 0].clone() for p in params for key in ("exp_avg",)}
    cb = callback(relora_prune_ratio=ratio)
    restart(cb, model, types.SimpleNamespace(optimizer=optimizer))  # as accelerate wraps it
    zeros = total = 0
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            value = optimizer.state[p][key]
            assert int((value != 0).sum()) == kept[(id(p), key)]
            zeros, total = zeros + int((value == 0).sum()), total + value.numel()
        remaining = optimizer.state[p]["exp_avg"][optimizer.state[p]["exp_avg"] != 0]
        assert remaining.abs().min() >= survivors[(id(p), "exp_avg")].abs().kthvalue(1).values  # the largest are kept
    assert zeros / total == pytest.approx(ratio, abs=0.01)
    assert cb.restarts == 1

    restart(callback(relora_prune_method="reset"), model, optimizer, step=6)
    share = sum(int((optimizer.state[p]["exp_avg_sq"] == 0).sum()) for p in params) / total * 2
    assert share > 0.99  # `reset`: Axolotl's near-full reset, 0.999 of the moments


def test_no_restart_between_restart_steps(folder):
    model = lora_model(folder, four_bit=False)
    b = next(iter(lora_layers(model).values())).lora_B["default"].weight.clone()
    restart(callback(), model, step=4)
    assert torch.equal(next(iter(lora_layers(model).values())).lora_B["default"].weight, b)


# ----------------------------------------------------------------------------- jagged schedule


def axolotl_jagged(step: int, restarts: int, warmup: int, anneal: int, floor: float = 0.001) -> float:
    """Axolotl's JaggedLRRestartScheduler.get_lr factor (utils/schedulers.py), restated."""
    if step < restarts - anneal:
        return 1.0
    t = step % restarts
    if t < warmup:
        cycle = min(1.0, t / warmup)
    elif t > restarts - anneal:
        cycle = min(1.0, (restarts - t) / anneal)
    else:
        cycle = 1.0
    return cycle * (1 - floor) + floor


def scheduled_rates(scheduler_of, steps: int, **cfg) -> list[float]:
    from dft_peft.training.jagged_schedule import with_jagged_restarts

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    jagged = with_jagged_restarts(scheduler_of(optimizer), optimizer, types.SimpleNamespace(lr_scheduler="x", **cfg))
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        jagged.step()
    return rates


def test_jagged_rates_match_axolotls_own_scheduler():
    from torch.optim.lr_scheduler import LambdaLR

    # Recorded from axolotl 0.19's JaggedLRRestartScheduler(opt, LambdaLR(opt, 1), 10, 3, 2), lr 1.
    axolotl = [1.0] * 8 + [0.5005, 0.001, 0.334, 0.667] + [1.0] * 6 + [0.5005, 0.001, 0.334, 0.667, 1.0, 1.0, 1.0]
    rates = scheduled_rates(lambda o: LambdaLR(o, lambda s: 1.0), 25, jagged_restart_steps=10, jagged_restart_warmup_steps=3, jagged_restart_anneal_steps=2)
    assert rates == pytest.approx(axolotl, abs=1e-4)


def test_jagged_rates_over_cosine_match_axolotls_formula():
    from transformers import get_cosine_schedule_with_warmup

    def cosine(step, warmup=4, total=40):  # transformers' cosine with warmup, restated
        if step < warmup:
            return step / warmup
        return max(0.0, 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))

    rates = scheduled_rates(lambda o: get_cosine_schedule_with_warmup(o, 4, 40), 40, jagged_restart_steps=7, jagged_restart_warmup_steps=None, jagged_restart_anneal_steps=None)
    expected = [cosine(s + 1) * axolotl_jagged(s + 1, 7, 10, 1) for s in range(40)]  # unset: 10 and 1, Axolotl's defaults
    assert rates == pytest.approx(expected, abs=1e-9)
    assert min(rates[6:8]) == pytest.approx(0.001 * cosine(7))  # the dip just before the first restart


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run.tiny_run_files(tmp_path_factory, rows=24)


@pytest.mark.parametrize("adapter", ["qlora", "lora"])
def test_tiny_relora_run_restarts_and_finishes(tiny, tmp_path, adapter, monkeypatch):
    if adapter == "qlora":
        pytest.importorskip("bitsandbytes")
    model_dir, data, _ = tiny
    quant = dict(adapter="qlora", load_in_4bit=True) if adapter == "qlora" else {}
    cfg = tiny_run.make_config(
        model_dir, data, tmp_path / "out", max_steps=5, save_steps=4, relora=True, jagged_restart_steps=2,
        jagged_restart_warmup_steps=1, relora_prune_ratio=0.9, lr_scheduler="cosine", **quant,
    )
    from transformers import TrainerCallback

    zero_b_at: list[int] = []

    class ZeroB(TrainerCallback):  # runs after ReLoRA's on_step_begin: B is zero at the start and after each restart
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            b = [p for n, p in model.named_parameters() if "lora_B" in n]
            if all(torch.count_nonzero(p) == 0 for p in b):
                zero_b_at.append(state.global_step)

    seen = tiny_run.capture_trainer(monkeypatch)
    import dft_peft.train as train_module

    original = train_module.install_relora
    monkeypatch.setattr(train_module, "install_relora", lambda t, c, r: (original(t, c, r), t.add_callback(ZeroB()))[0])
    result = train(cfg)
    logged = [h for h in result.log_history if "loss" in h and "train_runtime" not in h]
    assert result.global_step == 5 and all(math.isfinite(h["loss"]) for h in logged)
    relora = next(c for c in seen[0].callback_handler.callbacks if isinstance(c, ReLoRACallback))
    assert relora.restarts == 2 and zero_b_at == [0, 2, 4]  # restarts before the 3rd and 5th steps
    assert any(h["learning_rate"] < 1e-4 for h in logged)  # the jagged dip
    saved = load_file(str(result.output_dir / BASE_WEIGHTS))
    assert (result.output_dir / "checkpoint-4" / BASE_WEIGHTS).is_file()
    original = load_file(str(model_dir / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert len(saved) == 14 and saved[name].shape == original[name].shape
    assert not torch.allclose(saved[name].float(), original[name].float(), atol=1e-3)  # the merges moved it


def test_generate_eval_and_merge_load_the_merged_base_with_the_last_adapter(tiny, tmp_path, monkeypatch):
    """What `load_for_inference` (generate, eval, merge, GGUF export) builds from a ReLoRA run's
    output_dir computes what the trained model computed at the end; the adapter alone does not."""
    import shutil

    from dft_peft.model.loading import load_for_inference

    model_dir, data, _ = tiny
    cfg = tiny_run.make_config(
        model_dir, data, tmp_path / "out", max_steps=5, relora=True, jagged_restart_steps=2,
        jagged_restart_warmup_steps=1, lr_scheduler="cosine",
    )
    seen = tiny_run.capture_trainer(monkeypatch)
    result = train(cfg)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    trained = seen[0].model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits.double()
        loaded, _ = load_for_inference(cfg, result.output_dir)
        got = loaded(input_ids=ids).logits.double()
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
        alone = tmp_path / "adapter-only"
        shutil.copytree(result.output_dir, alone, ignore=shutil.ignore_patterns(BASE_WEIGHTS, "checkpoint-*"))
        without, _ = load_for_inference(cfg, alone)
        assert not torch.allclose(without(input_ids=ids).logits.double(), expected, atol=1e-3)


# ----------------------------------------------------------------------------- refusals


def error_of(tiny, **overrides) -> str:
    with pytest.raises(UserError) as info:
        tiny_run.config_of(tiny, **overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(relora=True), "needs `jagged_restart_steps`"),
        (dict(relora=True, jagged_restart_steps=5, deepspeed={"zero_optimization": {"stage": 2}}), "not supported with DeepSpeed"),
        (dict(relora=True, jagged_restart_steps=5, fsdp_version=2, fsdp_config={"reshard_after_forward": True}), "not supported with FSDP"),
        (dict(relora=True, jagged_restart_steps=5, optimizer="adamw_torch_4bit"), "adamw_torch_4bit"),
        (dict(relora=True, jagged_restart_steps=5, lora_target_parameters=["mlp.experts.gate_up_proj"]), "lora_target_parameters"),
        (dict(jagged_restart_steps=0), "jagged_restart_steps"),
        (dict(jagged_restart_steps=5, jagged_restart_warmup_steps=0), "jagged_restart_warmup_steps"),
        (dict(relora=True, jagged_restart_steps=5, relora_prune_ratio=1.5), "relora_prune_ratio"),
        (dict(relora=True, jagged_restart_steps=5, relora_prune_method="largest"), "relora_prune_method"),
    ],
)
def test_invalid_relora_settings_are_refused_in_one_line(tiny, overrides, needle):
    assert needle in error_of(tiny, **overrides)


def test_axolotls_example_spelling_and_ignored_keys(tiny):
    cfg = tiny_run.config_of(tiny, relora=True, jagged_restart_steps=150, jagged_restart_anneal_steps=False, relora_cpu_offload=False)
    assert cfg.jagged_restart_anneal_steps is None  # Axolotl's example writes `false`: its default, 1
    with pytest.warns(UserWarning, match="relora_prune_ratio only apply with `relora: true`"):
        tiny_run.config_of(tiny, relora_prune_ratio=0.5)
    with pytest.warns(UserWarning, match="jagged_restart_warmup_steps only apply"):
        tiny_run.config_of(tiny, jagged_restart_warmup_steps=5)
