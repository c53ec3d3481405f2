"""`dft_peft.train.train` end to end on a tiny local Llama (CPU, fp32, a few seconds per run).

Every expectation is independent of the code under test: losses recomputed in float64 from a
model loaded straight from disk, the same rows trained packed and unpacked, an interrupted and
resumed run against an uninterrupted one, the saved adapter reloaded with plain peft.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_run import Interrupt, alpaca_rows, capture_trainer, losses, make_config, tiny_model_dir, stop_at_step, write_jsonl

from dft_peft.training.checkpoint_folders import last_checkpoint
from dft_peft.training.checkpoints import STAGING
from dft_peft.config import load_config
from dft_peft.train import RESOLVED_CONFIG, train


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture
def data4(tmp_path):
    return write_jsonl(tmp_path / "data" / "train.jsonl", alpaca_rows(4))


def _mean(values):
    return sum(values) / len(values)


def _first(history, key):
    return next(h[key] for h in history if "loss" in h and key in h)


def reference_losses(model_dir, rows) -> tuple[float, float]:
    """(CE, DFT) over every trained token of `rows`, in float64, from the base model on disk.

    Each row runs alone (no padding, no packing); the sums over all rows are divided by the
    token count of the whole batch, which is what one optimizer step on one micro-batch means.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager").eval()
    ce_sum = dft_sum = count = 0.0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor(row["input_ids"])[None]
            labels = torch.tensor(row["labels"])
            logits = model(input_ids=ids).logits[0, :-1]
            targets = labels[1:]
            valid = targets != -100
            logp = torch.log_softmax(logits[valid], dim=-1).gather(1, targets[valid, None]).squeeze(1)
            ce_sum += float(-logp.sum())
            dft_sum += float(-(logp.exp() * logp).sum())
            count += int(valid.sum())
    return ce_sum / count, dft_sum / count


# ----------------------------------------------------------------------------- it trains


def test_lora_training_lowers_the_logged_loss(model_dir, data4, tmp_path, monkeypatch):
    seen = capture_trainer(monkeypatch)
    cfg = make_config(model_dir, data4, tmp_path / "out", loss="sft", max_steps=8)
    result = train(cfg)

    assert result.global_step == 8
    loss = losses(result.log_history)
    assert len(loss) == 8  # logging_steps 1: one line per step
    assert _mean(loss[-2:]) < 0.8 * _mean(loss[:2]), loss
    # SFT's objective is CE, and the diagnostics say so.
    assert losses(result.log_history, "ce")[0] == pytest.approx(loss[0], abs=1e-5)
    lora = [n for n, p in seen[0].model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)


def test_qlora_trains_on_real_bitsandbytes_nf4(model_dir, data4, tmp_path, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    seen = capture_trainer(monkeypatch)
    cfg = make_config(model_dir, data4, tmp_path / "out", adapter="qlora", load_in_4bit=True, loss="dft", max_steps=8)
    result = train(cfg)

    model = seen[0].model
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # q k v o gate up down in each of the 2 layers
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.dtype == torch.uint8 for m in four_bit)
    assert all(m.weight.device.type == "cpu" for m in four_bit)

    # DFT's objective -p*log(p) rises while p climbs from ~1/V towards 1/e, so what must fall is
    # the cross-entropy beside it, and the target probability must rise.
    ce = losses(result.log_history, "ce")
    p_mean = losses(result.log_history, "p_mean")
    assert len(ce) == 8
    assert _mean(ce[-2:]) < _mean(ce[:2]) - 0.5, ce
    assert _mean(p_mean[-2:]) > 2 * _mean(p_mean[:2]), p_mean


# ----------------------------------------------------------------------------- the objective


def test_dft_and_sft_log_different_losses_with_the_same_first_ce(model_dir, data4, tmp_path, monkeypatch):
    seen = capture_trainer(monkeypatch)
    runs = {}
    for loss in ("sft", "dft"):
        cfg = make_config(model_dir, data4, tmp_path / loss, loss=loss, max_steps=2)
        runs[loss] = train(cfg).log_history
        for key in ("loss", "ce", "p_mean", "token_acc", "entropy"):
            assert all(key in h for h in runs[loss] if "loss" in h and "train_runtime" not in h), (loss, key)

    sft, dft = runs["sft"], runs["dft"]
    # Same weights before the first update: identical diagnostics on step 1.
    for key in ("ce", "p_mean", "entropy"):
        assert _first(sft, key) == _first(dft, key), key
    assert _first(dft, "loss") < _first(dft, "ce")
    assert losses(sft) != losses(dft)
    # After one update the two objectives have moved the weights differently.
    assert losses(sft, "ce")[1] != losses(dft, "ce")[1]

    # Both against float64 values computed from the base model on disk: micro_batch_size 4
    # holds the 4 rows, and LoRA starts as the identity (B = 0), so step 1 sees the base model.
    rows = list(seen[0].train_dataset)
    assert len(rows) == 4
    ce_ref, dft_ref = reference_losses(model_dir, rows)
    assert _first(sft, "loss") == pytest.approx(ce_ref, rel=1e-5)
    assert _first(dft, "loss") == pytest.approx(dft_ref, rel=1e-5)
    assert _first(dft, "ce") == pytest.approx(ce_ref, abs=1e-5)
    assert dft_ref < ce_ref / 10  # the numbers a user sees really are that far apart


def test_packed_and_unpacked_give_the_same_first_step_loss(model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(6, seed=3))
    seen = capture_trainer(monkeypatch)
    first = {}
    for packing in (False, True):
        cfg = make_config(
            model_dir, data, tmp_path / f"out-{packing}", sample_packing=packing, sequence_len=256,
            micro_batch_size=8, max_steps=1, loss="dft",
        )
        first[packing] = train(cfg).log_history[0]

    unpacked, packed = (t.train_dataset for t in seen)
    # One micro-batch holds every row both ways, and packing really put several rows per bin.
    assert len(unpacked) == 6
    assert len(packed) < 6 and len(packed) <= 8
    assert "position_ids" in packed.column_names
    assert sum(len(r["input_ids"]) for r in packed) == sum(len(r["input_ids"]) for r in unpacked)
    # A row that attended to the row before it in its bin would change its loss.
    assert first[True]["loss"] == pytest.approx(first[False]["loss"], rel=1e-5, abs=1e-7)
    assert first[True]["ce"] == pytest.approx(first[False]["ce"], abs=1e-5)
    assert first[True]["p_mean"] == pytest.approx(first[False]["p_mean"], abs=1e-6)


# ----------------------------------------------------------------------------- checkpoints


def test_interrupted_run_resumes_from_the_last_complete_checkpoint(model_dir, data4, tmp_path, monkeypatch):
    settings = dict(loss="dft", micro_batch_size=2, max_steps=6, save_steps=3)

    # A: uninterrupted.
    result_a = train(make_config(model_dir, data4, tmp_path / "a", **settings))
    assert result_a.global_step == 6

    # B1: the same run, killed after step 4 (checkpoint-3 written, step-6 save never reached).
    out_b = tmp_path / "b"
    with monkeypatch.context() as m:
        capture_trainer(m, stop_at_step(4))
        with pytest.raises(Interrupt):
            train(make_config(model_dir, data4, out_b, **settings))
    assert (out_b / "checkpoint-3" / "optimizer.pt").is_file()
    assert not (out_b / "checkpoint-6").exists()
    assert not (out_b / "adapter_model.safetensors").exists()

    # Debris a kill mid-save leaves: a half-written staging folder and a later checkpoint
    # without optimizer state. Neither may be resumed from.
    (out_b / STAGING / "checkpoint-6").mkdir(parents=True)
    (out_b / STAGING / "checkpoint-6" / "trainer_state.json").write_text("{}")
    broken = out_b / "checkpoint-9"
    broken.mkdir()
    for name in ("trainer_state.json", "scheduler.pt", "adapter_model.safetensors"):
        (broken / name).write_text("half")
    assert last_checkpoint(out_b) == out_b / "checkpoint-3"

    # B2: same config with auto_resume.
    result_b = train(make_config(model_dir, data4, out_b, auto_resume_from_checkpoints=True, **settings))
    assert result_b.resumed_from is not None and result_b.resumed_from.endswith("checkpoint-3")
    assert result_b.global_step == 6
    steps_b = [h["step"] for h in result_b.log_history if "loss" in h and "train_runtime" not in h]
    assert steps_b == [1, 2, 3, 4, 5, 6]  # 1-3 restored from the checkpoint, then 4, 5, 6
    assert losses(result_b.log_history)[3:] == pytest.approx(losses(result_a.log_history)[3:], rel=1e-5)

    # Same data order and optimizer state: the same adapter.
    weights_a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    weights_b = load_file(out_b / "adapter_model.safetensors")
    assert weights_a.keys() == weights_b.keys() and weights_a
    for name, tensor in weights_a.items():
        torch.testing.assert_close(weights_b[name], tensor, rtol=0, atol=1e-6, msg=name)
    # The adapter really trained (B starts at zero, so equality is not trivially true).
    assert max(t.abs().max().item() for n, t in weights_a.items() if "lora_B" in n) > 1e-3


def test_last_checkpoint_skips_incomplete_folders(tmp_path):
    def checkpoint(name, files=("trainer_state.json", "optimizer.pt", "scheduler.pt")):
        folder = tmp_path / name
        folder.mkdir(parents=True)
        for f in files:
            (folder / f).write_text("x")
        return folder

    assert last_checkpoint(tmp_path / "missing") is None
    assert last_checkpoint(tmp_path) is None
    good = checkpoint("checkpoint-3")
    checkpoint("checkpoint-10", files=("trainer_state.json", "scheduler.pt"))  # no optimizer.pt
    checkpoint(f"{STAGING}/checkpoint-12")  # complete, but still staged
    checkpoint("checkpoint-20-old")  # not a checkpoint name
    (tmp_path / "checkpoint-30").write_text("a file, not a folder")
    assert last_checkpoint(tmp_path) == good
    newer = checkpoint("checkpoint-11")
    assert last_checkpoint(tmp_path) == newer  # by step number, not by name order (11 > 3)


def test_resume_from_checkpoint_must_be_complete(model_dir, data4, tmp_path):
    from dft_peft.errors import UserError

    half = tmp_path / "out" / "checkpoint-2"
    half.mkdir(parents=True)
    cfg = make_config(model_dir, data4, tmp_path / "out", resume_from_checkpoint=str(half))
    with pytest.raises(UserError, match="checkpoint-2.*not a complete checkpoint"):
        train(cfg)


# ----------------------------------------------------------------------------- outputs


def test_saved_adapter_reloads_with_plain_peft(model_dir, data4, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dft_peft.model.loading import load_for_inference

    seen = capture_trainer(monkeypatch)
    out = tmp_path / "out"
    cfg = make_config(model_dir, data4, out, loss="dft", max_steps=3)
    result = train(cfg)
    assert result.output_dir == out

    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 RESOLVED_CONFIG, "train_metrics.json", "log_history.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".tmp-*"))  # the atomic writer cleaned up

    ids = torch.tensor([list(seen[0].train_dataset[0]["input_ids"])])
    trained = seen[0].model.eval()
    with torch.no_grad():
        in_memory = trained(input_ids=ids).logits  # no labels: the unpatched forward, full logits
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        base_logits = base(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(base, out).eval()(input_ids=ids).logits
        inference, tokenizer = load_for_inference(cfg, out)
        via_helper = inference(input_ids=ids).logits

    assert (in_memory - base_logits).abs().max() > 1e-3  # the adapter changed the model
    torch.testing.assert_close(reloaded, in_memory, rtol=0, atol=1e-5)
    torch.testing.assert_close(via_helper, in_memory, rtol=0, atol=1e-5)
    assert len(tokenizer) == len(seen[0].processing_class)

    # The resolved config reloads into the same run.
    reread = load_config(out / RESOLVED_CONFIG)
    assert reread.to_yaml_dict() == cfg.to_yaml_dict()
    assert yaml.safe_load((out / RESOLVED_CONFIG).read_text())["dft_alpha"] == 1.0

    # The metrics files hold what the run logged.
    saved = json.loads((out / "log_history.json").read_text())
    assert losses(saved) == losses(result.log_history) and len(losses(saved)) == 3
    assert all(math.isfinite(x) for x in losses(saved, "ce"))
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["loss"] == "dft" and metrics["loss_params"] == {"dft_alpha": 1.0} and metrics["global_step"] == 3
    assert metrics["first_log"]["step"] == 1 and "ce" in metrics["first_log"] and "p_mean" in metrics["first_log"]


def test_gradient_accumulation_is_exact_through_the_trainer(model_dir, data4, tmp_path):
    """4 rows as one micro-batch, or as 2 x 2 with gradient accumulation: the Trainer passes
    `num_items_in_batch` to the patched model, so the first step's loss and gradient norm agree
    (rows of different lengths: a per-micro-batch mean would weight their tokens differently)."""
    one = train(make_config(model_dir, data4, tmp_path / "one", micro_batch_size=4, max_steps=1)).log_history
    two = train(
        make_config(model_dir, data4, tmp_path / "two", micro_batch_size=2, gradient_accumulation_steps=2, max_steps=1)
    ).log_history
    assert _first(two, "loss") == pytest.approx(_first(one, "loss"), rel=1e-5)
    assert _first(two, "grad_norm") == pytest.approx(_first(one, "grad_norm"), rel=1e-4)
    assert _first(two, "ce") == pytest.approx(_first(one, "ce"), rel=1e-5)
