"""`loss: eaft` through dft-peft's plugin in real Axolotl 0.19 against Axolotl's own `use_eaft`
on the same batch: the same tiny model, data and seed, one optimizer step each. Axolotl's EAFT
computes full logits (`compute_loss_func`); ours goes through the fused path without them. Both
first-step losses must equal a float64 full-logits reference of Axolotl's formula computed here
from the batch the trainer fed the model (recorded by `axolotl_recorder.FirstStepRecorder`).

    scripts/axolotl-venv.sh && .venv/bin/python -m pytest tests/integration/test_axolotl_eaft.py -m axolotl
"""

from __future__ import annotations

import math

import pytest
import torch
from test_axolotl import _apply, needs_axolotl, run_axolotl

import tiny_assets


def reference_eaft(model_dir, micro_batches, alpha: float, k: int) -> tuple[float, int]:
    """Float64 Axolotl-0.19 EAFT of the recorded micro-batches (right padding, no packing)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager").eval()
    total, count = 0.0, 0
    for micro in micro_batches:
        ids, labels = micro["inputs"]["input_ids"], micro["inputs"]["labels"]
        mask = micro["inputs"].get("attention_mask")
        for row in range(ids.shape[0]):
            keep = mask[row].bool() if mask is not None else torch.ones_like(ids[row], dtype=torch.bool)
            r_ids, r_labels = ids[row][keep], labels[row][keep]
            with torch.no_grad():
                logits = model(input_ids=r_ids[None]).logits[0, :-1]
            target = r_labels[1:]
            valid = target != -100
            lg, tg = logits[valid], target[valid]
            top = torch.topk(lg, k=min(k, lg.shape[-1]), dim=-1).values
            probs = torch.softmax(top, -1)
            weight = (-(probs * torch.log(probs + 1e-10)).sum(-1)) ** alpha
            ce = torch.nn.functional.cross_entropy(lg, tg, reduction="none")
            total += float((weight * ce).sum())
            count += int(valid.sum())
    return total / count, count


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("axolotl-eaft")
    return {"root": root, "model": tiny_assets.build_model(root / "tiny-llama"), "data": tiny_assets.write_alpaca(root / "alpaca.jsonl")}


@_apply(needs_axolotl)
def test_eaft_plugin_matches_axolotl_use_eaft(assets):
    alpha, k = 0.7, 10
    common = dict(max_steps=1, eaft_alpha=alpha, eaft_k=k)
    theirs_cfg = tiny_assets.axolotl_config(
        assets["model"], assets["data"], assets["root"] / "theirs", plugins=[tiny_assets.RECORDER], use_eaft=True, **common
    )
    theirs_cfg.pop("loss")  # not Axolotl's key: without the plugin it is plain Axolotl
    ours_cfg = tiny_assets.axolotl_config(
        assets["model"], assets["data"], assets["root"] / "ours", plugins=[tiny_assets.PLUGIN, tiny_assets.RECORDER], loss="eaft", **common
    )
    theirs = run_axolotl(assets["root"] / "theirs", "theirs", theirs_cfg).check()
    ours = run_axolotl(assets["root"] / "ours", "ours", ours_cfg).check()
    assert "dft-peft: training objective `eaft`" in ours.output

    t_micro, o_micro = theirs.first_step(), ours.first_step()
    assert all(torch.equal(a["inputs"]["input_ids"], b["inputs"]["input_ids"]) for a, b in zip(t_micro, o_micro)), "not the same batch"
    ref, count = reference_eaft(assets["model"], o_micro, alpha, k)
    t_loss, o_loss = theirs.first_step_log()["loss"], ours.first_step_log()["loss"]
    print(f"\neaft first step: axolotl use_eaft {t_loss:.9g}  dft-peft loss: eaft {o_loss:.9g}  float64 {ref:.9g}")
    assert o_micro[0]["num_items_in_batch"] == count
    assert not any(m["has_logits"] for m in o_micro), "the fused path should build no full logits"
    assert any(m["has_logits"] for m in t_micro), "Axolotl's own EAFT works on full logits"
    assert t_loss == pytest.approx(ref, rel=1e-5)
    assert o_loss == pytest.approx(ref, rel=1e-5)
    assert o_loss == pytest.approx(t_loss, rel=1e-5)
    assert math.isfinite(ref) and ref > 0
