"""Shared helpers for the data tests: a tiny byte-level BPE tokenizer built locally (no hub).

Named test_data_*.py so it sits with the data tests; it holds no tests itself.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

# A ChatML template written out independently of dft_peft.data.chat.CHATML_TEMPLATE.
TEST_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "the quick brown fox jumps over the lazy dog 0123456789 + - * / = ####",
    "system user assistant You are a helpful assistant. What is two plus two? The answer is four.",
]


@functools.cache
def _backend(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    if bos:
        tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok.to_str()


def make_tokenizer(*, bos: bool = True, chat_template: str | None = TEST_CHATML):
    """A fresh ~300-token tokenizer; `bos=True` makes it prepend <s> like Llama tokenizers do."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_backend(bos))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = chat_template
    return tok


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_text(tokenizer, ids, labels) -> str:
    """Decode only the tokens that carry a label (the reference view of what is trained)."""
    return tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100], skip_special_tokens=False)
