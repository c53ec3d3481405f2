"""Prompt formats: exact prompt text and which parts are trained, checked against hand-written text."""

from __future__ import annotations

import pytest
from test_data_helpers import TEST_CHATML, make_tokenizer, trained_text, write_jsonl

from dft_peft.data import DatasetConfig, prepare_datasets
from dft_peft.config.dataset_types import forget_format
from dft_peft.data.formats import FORMATS, FormatContext, RowError, register
from dft_peft.errors import UserError

# Axolotl's AlpacaPrompter text, typed out here as the reference.
AXOLOTL_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
)
AXOLOTL_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Response:\n"
)


def _segments(row, **cfg):
    cfg.setdefault("path", "x.jsonl")
    config = DatasetConfig(**cfg)
    tok = make_tokenizer()
    return FORMATS[config.type](row, config, FormatContext(tokenizer=tok, chat_template=TEST_CHATML))


def test_alpaca_with_input_is_axolotl_text():
    segs = _segments({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
    assert segs == [(AXOLOTL_WITH_INPUT, False), ("5", True), ("</s>", True)]


@pytest.mark.parametrize("input_value", [None, ""])
def test_alpaca_without_input_uses_no_input_prompt(input_value):
    row = {"instruction": "Add the numbers.", "output": "5"}
    if input_value is not None:
        row["input"] = input_value
    assert _segments(row)[0] == (AXOLOTL_NO_INPUT, False)


def test_alpaca_train_on_eos_none_keeps_eos_untrained():
    segs = _segments({"instruction": "i", "output": "o"}, train_on_eos="none")
    assert segs[-1] == ("</s>", False)


def test_alpaca_missing_output_names_field():
    with pytest.raises(RowError, match="missing field 'output' required by type: alpaca"):
        _segments({"instruction": "i"})


def test_completion_uses_field_and_is_all_trainable():
    assert _segments({"body": "hello"}, type="completion", field="body") == [("hello", True), ("</s>", True)]


def test_input_output_segments_follow_labels():
    row = {"segments": [{"text": "Q: 1+1?\n", "label": False}, {"text": "A: 2", "label": True}]}
    assert _segments(row, type="input_output") == [("Q: 1+1?\n", False), ("A: 2", True), ("</s>", True)]


def test_input_output_rejects_non_bool_label():
    with pytest.raises(RowError, match="label must be true or false"):
        _segments({"segments": [{"text": "x", "label": "yes"}]}, type="input_output")


def test_registry_makes_a_new_format_one_function():
    @register("shout_test")
    def shout(row, cfg, ctx):
        return [(row["q"].upper(), False), (row["a"], True)]

    try:
        cfg = DatasetConfig(path="x.jsonl", type="shout_test")
        assert FORMATS[cfg.type]({"q": "hi", "a": "yo"}, cfg, None) == [("HI", False), ("yo", True)]
    finally:
        del FORMATS["shout_test"]
        forget_format("shout_test")


# --- chat_template -------------------------------------------------------------------------------

CONVO = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "six"},
]
RENDERED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
    "<|im_start|>assistant\nfour<|im_end|>\n"
    "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
    "<|im_start|>assistant\nsix<|im_end|>\n"
)


def _prepare_chat(tmp_path, rows, tokenizer=None, **cfg):
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    tok = tokenizer or make_tokenizer()
    out = prepare_datasets([DatasetConfig(path=str(path), type="chat_template", **cfg)], tok, sequence_len=512)
    return tok, out


def test_chat_template_trains_assistant_content_and_end_of_turn_only(tmp_path):
    tok, out = _prepare_chat(tmp_path, [{"messages": CONVO}])
    row = out.train[0]
    assert tok.decode(row["input_ids"], skip_special_tokens=False) == RENDERED  # no BOS added: template owns it
    assert trained_text(tok, row["input_ids"], row["labels"]) == "four<|im_end|>six<|im_end|>"


def test_chat_template_roles_to_train_and_train_on_eos_last(tmp_path):
    tok, out = _prepare_chat(tmp_path, [{"messages": CONVO}], roles_to_train=["assistant", "user"], train_on_eos="last")
    row = out.train[0]
    assert trained_text(tok, row["input_ids"], row["labels"]) == "What is two plus two?fourAnd 3+3?six<|im_end|>"


def test_chat_template_train_on_eos_none(tmp_path):
    tok, out = _prepare_chat(tmp_path, [{"messages": CONVO}], train_on_eos="none")
    assert trained_text(tok, out.train[0]["input_ids"], out.train[0]["labels"]) == "foursix"


def test_chat_template_sharegpt_keys_and_roles(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    tok, out = _prepare_chat(
        tmp_path, rows, field_messages="conversations", message_field_role="from", message_field_content="value"
    )
    row = out.train[0]
    assert tok.decode(row["input_ids"]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    assert trained_text(tok, row["input_ids"], row["labels"]) == "hello<|im_end|>"


def test_chat_template_named_chatml_when_tokenizer_has_none(tmp_path):
    tok = make_tokenizer(chat_template=None)
    with pytest.raises(UserError, match="tokenizer has no chat template"):
        _prepare_chat(tmp_path, [{"messages": CONVO}], tokenizer=tok)
    tok, out = _prepare_chat(tmp_path, [{"messages": CONVO}], tokenizer=tok, chat_template="chatml")
    assert tok.decode(out.train[0]["input_ids"]) == RENDERED


def test_chat_template_inline_override_and_content_equal_to_role(tmp_path):
    # A template with a different layout; content "assistant" also appears in the role header.
    template = "{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}</s>{% endfor %}"
    rows = [{"messages": [{"role": "user", "content": "who?"}, {"role": "assistant", "content": "assistant"}]}]
    tok, out = _prepare_chat(tmp_path, rows, chat_template=template)
    row = out.train[0]
    assert tok.decode(row["input_ids"]) == "[user]: who?</s>[assistant]: assistant</s>"
    # The byte-level tokenizer merges the space into " assistant": a token that reaches into the
    # trained text is trained (the model has to emit it), so the space comes along.
    assert trained_text(tok, row["input_ids"], row["labels"]) == " assistant</s>"


def test_chat_template_unknown_name(tmp_path):
    with pytest.raises(UserError, match=r"chat_template `chatm1` is not built into dft-peft.*Did you mean `chatml`"):
        _prepare_chat(tmp_path, [{"messages": CONVO}], chat_template="chatm1")


def test_chat_template_missing_messages_names_row(tmp_path):
    with pytest.raises(UserError, match=r"chat\.jsonl row 2: missing field 'messages'"):
        _prepare_chat(tmp_path, [{"messages": CONVO}, {"msgs": CONVO}])


def test_chat_template_non_prefix_template_is_located_in_order(tmp_path):
    # Renders the message count first, so a prefix conversation is not a prefix of the whole
    # (Qwen3-style templates do this for earlier turns): the turns are found in order instead.
    template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    tok, out = _prepare_chat(tmp_path, [{"messages": CONVO}], chat_template=template)
    row = out.train[0]
    replies = [m["content"] for m in CONVO if m["role"] == "assistant"]
    assert trained_text(tok, row["input_ids"], row["labels"]) == "|".join(replies) + "|"


def test_named_llama3_and_qwen25_templates(tmp_path):
    convo = [{"role": "user", "content": "hi "}, {"role": "assistant", "content": "hello"}]
    tok, out = _prepare_chat(tmp_path, [{"messages": convo}], chat_template="llama3")
    row = out.train[0]
    assert tok.decode(row["input_ids"]) == (
        "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
    )
    assert trained_text(tok, row["input_ids"], row["labels"]) == "hello<|eot_id|>"
    tok, out = _prepare_chat(tmp_path, [{"messages": convo}], chat_template="qwen_25")
    row = out.train[0]
    assert tok.decode(row["input_ids"]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi <|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    )
    assert trained_text(tok, row["input_ids"], row["labels"]) == "hello<|im_end|>"


def test_tokenizer_default_fallback(tmp_path):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    tok, out = _prepare_chat(
        tmp_path,
        [{"messages": CONVO[1:3]}],
        tokenizer=make_tokenizer(chat_template=template),
        chat_template="tokenizer_default_fallback_chatml",
    )
    assert tok.decode(out.train[0]["input_ids"]).startswith("<user>What is two")
    tok, out = _prepare_chat(
        tmp_path,
        [{"messages": CONVO[1:3]}],
        tokenizer=make_tokenizer(chat_template=None),
        chat_template="tokenizer_default_fallback_chatml",
    )
    assert tok.decode(out.train[0]["input_ids"]).startswith("<|im_start|>user\nWhat is two")


def test_chat_template_raising_is_reported_with_row(tmp_path):
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(UserError, match="row 1: the chat template failed on the first 5 messages: no system role"):
        _prepare_chat(tmp_path, [{"messages": CONVO}], chat_template=template)
