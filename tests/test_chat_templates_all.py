"""Every chat template name dft-peft accepts renders and masks a real conversation.

The reference for each name is the template text itself rendered by the tokenizer
(`apply_chat_template`, independent of dft-peft's segmenting): the ids must decode to that
rendering, every assistant reply must be trained, and no user or system text may be.
Also: Axolotl's end-of-turn options (`eot_tokens`, `train_on_eot`) and `drop_system_message`.
"""

from __future__ import annotations

import pytest
from test_data_helpers import make_tokenizer, trained_text, write_jsonl

from dft_peft.config.axolotl_keys import chat_template_names
from dft_peft.data import DatasetConfig, prepare_datasets
from dft_peft.config.chat_templates import REFUSED_TEMPLATES, accepted_template_names, check_template_name, template_text
from dft_peft.errors import UserError

CONVO = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "The answer is four."},
    {"role": "user", "content": "And three plus two?"},
    {"role": "assistant", "content": "Five, the quick brown fox says."},
]
SYSTEM = {"role": "system", "content": "You are a lazy dog."}


def _prepare(tmp_path, rows, tokenizer=None, **entry):
    tok = tokenizer or make_tokenizer()
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = prepare_datasets([DatasetConfig(path=str(path), type="chat_template", **entry)], tok, sequence_len=2048)
    return tok, out.train[0]


def test_names_come_from_axolotl():
    assert {"qwen3_5", "gemma3n", "gemma4", "falcon_h1", "exaone4", "aya"} <= accepted_template_names()
    for name in chat_template_names():
        assert name in accepted_template_names() | set(REFUSED_TEMPLATES) | {"tokenizer_default", "jinja"}


@pytest.mark.parametrize("name", sorted(accepted_template_names()))
def test_every_accepted_template_masks_the_replies(tmp_path, name):
    tok, row = _prepare(tmp_path, [{"messages": CONVO}], chat_template=name)
    reference = tok.apply_chat_template(CONVO, chat_template=template_text(name), tokenize=False)
    assert tok.decode(row["input_ids"]) == reference
    trained = trained_text(tok, row["input_ids"], row["labels"])
    for message in CONVO:
        if message["role"] == "assistant":
            assert message["content"] in trained, name
        else:
            assert message["content"] not in trained, name
    # nothing but the replies and their end-of-turn markers: at most a few marker characters more
    replies = sum(len(m["content"]) for m in CONVO if m["role"] == "assistant")
    assert len(trained) <= replies + 2 * 40, (name, trained)


@pytest.mark.parametrize("name", sorted(REFUSED_TEMPLATES))
def test_refused_templates_say_why(name):
    with pytest.raises(ValueError, match="not supported"):
        check_template_name(name)


CHATML_NO_EOS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def test_default_trains_the_templates_end_of_turn_marker(tmp_path):
    tok, row = _prepare(tmp_path, [{"messages": CONVO[:2]}], chat_template=CHATML_NO_EOS)
    assert trained_text(tok, row["input_ids"], row["labels"]) == "The answer is four.<|im_end|>"


def test_eot_tokens_train_only_those_tokens(tmp_path):
    # Axolotl: eot_tokens defaults to the EOS token (</s> here, absent from this template), so
    # with train_on_eot set only the reply is trained; naming <|im_end|> trains it again.
    tok, row = _prepare(tmp_path, [{"messages": CONVO[:2]}], chat_template=CHATML_NO_EOS, train_on_eot="turn")
    assert trained_text(tok, row["input_ids"], row["labels"]) == "The answer is four."
    tok, row = _prepare(tmp_path, [{"messages": CONVO[:2]}], chat_template=CHATML_NO_EOS, eot_tokens=["<|im_end|>"])
    assert trained_text(tok, row["input_ids"], row["labels"]) == "The answer is four.<|im_end|>"


def test_train_on_eot_last_and_all(tmp_path):
    common = dict(chat_template=CHATML_NO_EOS, eot_tokens=["<|im_end|>"])
    tok, row = _prepare(tmp_path, [{"messages": CONVO}], train_on_eot="last", **common)
    assert trained_text(tok, row["input_ids"], row["labels"]) == "The answer is four.Five, the quick brown fox says.<|im_end|>"
    tok, row = _prepare(tmp_path, [{"messages": CONVO}], train_on_eot="all", **common)
    assert trained_text(tok, row["input_ids"], row["labels"]).count("<|im_end|>") == 4


def test_eot_token_must_be_one_token(tmp_path):
    with pytest.raises(UserError, match="not one token"):
        _prepare(tmp_path, [{"messages": CONVO[:2]}], chat_template=CHATML_NO_EOS, eot_tokens=["<|eot|>"])


def test_drop_system_message(tmp_path):
    rows = [{"messages": [SYSTEM, *CONVO[:2]]}]
    tok, kept = _prepare(tmp_path, rows, chat_template="chatml")
    assert "lazy dog" in tok.decode(kept["input_ids"])
    tok, dropped = _prepare(tmp_path, rows, chat_template="chatml", drop_system_message=True)
    assert "lazy dog" not in tok.decode(dropped["input_ids"])
    assert tok.decode(dropped["input_ids"]) == tok.apply_chat_template(CONVO[:2], chat_template=template_text("chatml"), tokenize=False)


def test_top_level_eot_tokens_reach_every_dataset(tmp_path):
    from dft_peft.config import Config

    cfg = Config.from_dict(
        {
            "base_model": "x", "adapter": "lora", "lora_target_linear": True, "learning_rate": 1e-4,
            "eot_tokens": ["<|im_end|>"],
            "datasets": [{"path": "a.jsonl", "type": "chat_template"}, {"path": "b.jsonl", "type": "alpaca"}],
        }
    )
    assert [d.eot_tokens for d in cfg.datasets] == [["<|im_end|>"], ["<|im_end|>"]]


def test_alpaca_styles_train_the_output_and_prompt_like_training(tmp_path):
    from dft_peft.evaluate.prompts import build_prompt

    tok = make_tokenizer()
    rows = [{"instruction": "Add 2 and 3.", "input": "", "output": "The answer is 5."}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    phi = "<|user|>\nAdd 2 and 3.<|end|>\n<|assistant|>\n"  # Axolotl's PromptStyle.PHI, no input
    system = "<|system|>\nBelow is an instruction that describes a task. Write a response that appropriately completes the request.<|end|>\n"
    entry = DatasetConfig(path=str(path), type="alpaca:phi")
    row = prepare_datasets([entry], tok, sequence_len=512).train[0]
    assert tok.decode(row["input_ids"]) == "<s>" + system + phi + "The answer is 5.</s>"
    assert trained_text(tok, row["input_ids"], row["labels"]) == "The answer is 5.</s>"
    assert build_prompt(rows[0], entry, tok, None, "test") == system + phi


THINKING_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.thinking %}<think>{{ m.thinking }}</think>\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def test_field_thinking_reaches_the_template_and_is_trained_with_the_reply(tmp_path):
    """Axolotl's `field_thinking` / `template_thinking_key`: the row's trace is passed to the
    template under the template's name and trained from the trace through the reply."""
    rows = [{"messages": [CONVO[0], {**CONVO[1], "reasoning": "Two and two make four."}]}]
    tok, row = _prepare(
        tmp_path, rows, chat_template=THINKING_CHATML, field_thinking="reasoning", template_thinking_key="thinking"
    )
    rendered = "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n" \
        "<think>Two and two make four.</think>\nThe answer is four.<|im_end|>\n"
    assert tok.decode(row["input_ids"]) == rendered
    assert trained_text(tok, row["input_ids"], row["labels"]) == "Two and two make four.</think>\nThe answer is four.<|im_end|>"


def test_reasoning_content_is_axolotls_default_and_dropped_turns_stay_untrained(tmp_path):
    """Qwen3's template drops the traces of earlier turns: only the last one is rendered and trained."""
    convo = [
        CONVO[0], {**CONVO[1], "reasoning_content": "Adding two twos."},
        CONVO[2], {**CONVO[3], "reasoning_content": "Three and two is five."},
    ]
    tok, row = _prepare(tmp_path, [{"messages": convo}], chat_template="qwen3")
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(convo, chat_template=template_text("qwen3"), tokenize=False)
    trained = trained_text(tok, row["input_ids"], row["labels"])
    assert "Three and two is five." in trained and "Adding two twos." not in tok.decode(row["input_ids"])
    assert CONVO[1]["content"] in trained and CONVO[3]["content"] in trained
    assert not any(m["content"] in trained for m in CONVO if m["role"] == "user")
