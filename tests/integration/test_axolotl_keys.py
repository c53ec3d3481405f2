"""The generated Axolotl tables against the installed Axolotl 0.19, and the chat-data keys
(`eot_tokens`, `train_on_eot`, `drop_system_message`) and alpaca styles against Axolotl's own
tokenization of the same rows with the same tokenizer.

Runs in the virtual environment made by scripts/axolotl-venv.sh (`$DFT_PEFT_AXOLOTL_VENV`,
default `<repo>/.venv-axolotl`); skipped, saying why, when it does not exist.

    scripts/axolotl-venv.sh && .venv/bin/python -m pytest tests/integration/test_axolotl_keys.py -m axolotl
"""

from __future__ import annotations

import json
import sys

import pytest
from axolotl_venv import NEEDS_AXOLOTL_PYTHON, REPO, run_in_axolotl

sys.path.insert(0, str(REPO / "tests"))

pytestmark = NEEDS_AXOLOTL_PYTHON


def test_checked_in_tables_match_the_installed_axolotl():
    proc = run_in_axolotl(["scripts/gen_axolotl_keys.py", "--check"])
    assert proc.returncode == 0, proc.stderr[-3000:]


AXOLOTL_SIDE = r"""
import json, sys, logging, warnings
warnings.filterwarnings("ignore"); logging.disable(logging.WARNING)
from transformers import AutoTokenizer
from axolotl.utils.dict import DictDefault
from axolotl.prompt_strategies.chat_template import load as chat_load
from axolotl.prompters import AlpacaPrompter
spec = json.load(open(sys.argv[1]))
tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
out = {"chat": [], "alpaca": []}
for case in spec["chat"]:
    cfg = DictDefault({"train_on_inputs": False, "sequence_len": 2048, "eot_tokens": case.get("eot_tokens")})
    ds = {"type": "chat_template", "chat_template": case["chat_template"], **case["entry"]}
    strategy = chat_load(tok, cfg, ds)
    res = strategy.tokenize_prompt({"messages": case["messages"]})
    out["chat"].append({"input_ids": res["input_ids"], "labels": res["labels"]})
for case in spec["alpaca"]:
    p = AlpacaPrompter(case["style"])
    out["alpaca"].append(next(p.build_prompt(case["instruction"], case["input"])))
print(json.dumps(out))
"""

MESSAGES = [
    {"role": "system", "content": "You are a lazy dog."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "The answer is four."},
    {"role": "user", "content": "And three plus two?"},
    {"role": "assistant", "content": "Five, the quick brown fox says."},
]
# Without eot_tokens / train_on_eot, dft-peft trains the template's end-of-turn marker even when
# it is not the tokenizer's EOS (Axolotl then trains none): a deliberate difference, so those
# cases are not compared here; with either key set the masks must be Axolotl's.
CHAT_CASES = [
    {"chat_template": "chatml", "entry": {}, "eot_tokens": ["<|im_end|>"]},
    {"chat_template": "chatml", "entry": {"train_on_eot": "last"}, "eot_tokens": ["<|im_end|>"]},
    {"chat_template": "chatml", "entry": {"train_on_eot": "all"}, "eot_tokens": ["<|im_end|>"]},
    {"chat_template": "chatml", "entry": {"train_on_eot": "none", "train_on_eos": "none"}, "eot_tokens": ["<|im_end|>"]},
    {"chat_template": "chatml", "entry": {"drop_system_message": True}, "eot_tokens": ["<|im_end|>"]},
    {"chat_template": "llama3", "entry": {"train_on_eot": "turn"}},
    {"chat_template": "qwen3", "entry": {}, "eot_tokens": ["<|im_end|>"]},
]
ALPACA_CASES = [
    {"style": style, "instruction": "Add 2 and 3.", "input": value}
    for style in ("instruct", "chat", "chatml", "phi")
    for value in ("", "2 + 3")
]


def ours_chat(tok, tmp_path, case):
    from test_data_helpers import write_jsonl

    from dft_peft.data import DatasetConfig, prepare_datasets

    entry = dict(case["entry"])
    if case.get("eot_tokens"):
        entry["eot_tokens"] = case["eot_tokens"]
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": MESSAGES}])
    cfg = DatasetConfig(path=str(path), type="chat_template", chat_template=case["chat_template"], **entry)
    row = prepare_datasets([cfg], tok, sequence_len=2048).train[0]
    return {"input_ids": list(row["input_ids"]), "labels": list(row["labels"])}


def test_chat_masks_and_alpaca_styles_match_axolotl(tmp_path):
    from test_data_helpers import SPECIALS, make_tokenizer

    from dft_peft.data.alpaca_styles import SYSTEM, SYSTEM_NO_INPUT, styled_prompt

    tok = make_tokenizer()
    # the end-of-turn tokens of the templates under test must be single tokens (Axolotl requires it)
    tok.add_special_tokens({"additional_special_tokens": [t for t in ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>") if t not in SPECIALS]})
    tok.save_pretrained(tmp_path / "tok")
    spec = {
        "tokenizer": str(tmp_path / "tok"),
        "chat": [{**c, "messages": MESSAGES} for c in CHAT_CASES],
        "alpaca": ALPACA_CASES,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "axolotl_side.py").write_text(AXOLOTL_SIDE)
    proc = run_in_axolotl([str(tmp_path / "axolotl_side.py"), str(tmp_path / "spec.json")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, expected in zip(CHAT_CASES, theirs["chat"]):
        got = ours_chat(tok, tmp_path, case)
        assert got["input_ids"] == expected["input_ids"], case
        assert got["labels"] == expected["labels"], (case, tok.decode([t for t, l in zip(got["input_ids"], got["labels"]) if l != -100]), tok.decode([t for t, l in zip(expected["input_ids"], expected["labels"]) if l != -100]))
    for case, expected in zip(ALPACA_CASES, theirs["alpaca"]):
        assert styled_prompt(case["style"], case["instruction"], case["input"], SYSTEM, SYSTEM_NO_INPUT) == expected, case


LIGER_SIDE = r"""
import json, logging, warnings
warnings.filterwarnings("ignore"); logging.disable(logging.WARNING)
from types import SimpleNamespace
import transformers
import dft_peft.model.liger as liger
liger.unavailable_reason = lambda: None  # no CUDA here: the modules are swapped, never run
cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2)
model = transformers.LlamaForCausalLM(cfg)
keys = SimpleNamespace(liger_rms_norm=True, liger_glu_activation=True, liger_rope=False, liger_layer_norm=False,
                       liger_swiglu=None)
applied = liger.apply_liger_kernels(model, keys)
print(json.dumps({"applied": applied, "norm": model.model.norm.forward.__qualname__,
                  "mlp": model.model.layers[0].mlp.forward.__qualname__}))
"""


def test_liger_keys_swap_in_liger_modules(tmp_path):
    """Axolotl's venv has liger-kernel: the config keys reach Liger's own patching function."""
    (tmp_path / "liger_side.py").write_text(LIGER_SIDE)
    proc = run_in_axolotl([str(tmp_path / "liger_side.py")])
    if proc.returncode != 0 and "No module named 'liger_kernel'" in proc.stderr:
        pytest.skip("liger-kernel is not installed in the Axolotl venv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["applied"] == ["rms_norm", "swiglu"]
    assert out["norm"].startswith("LigerRMSNorm") and out["mlp"].startswith("LigerSwiGLUMLP")
