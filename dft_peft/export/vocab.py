"""The tokenizer inside a GGUF file: tokens, their types, merges, special ids, chat template.

llama.cpp carries no tokenizer.json: it rebuilds the tokenizer from these keys, and picks the
regex that splits text before BPE from `tokenizer.ggml.pre`, a name. llama.cpp's own converter
finds that name by hashing the tokenization of a test string; here it is read from the shape of
the tokenizer's pre-tokenizer instead, for the few shapes the supported families use, so a
tokenizer nobody has checked is refused rather than written with the wrong split.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf

from dft_peft.errors import UserError

# The split regexes of the Llama-3 and Qwen2 tokenizer.json files, and the llama.cpp names for them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_REGEX_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}

# Added tokens llama.cpp treats as control tokens even when the tokenizer does not mark them special.
_LOOKS_SPECIAL = re.compile(r"^(<\|.*\|>|<｜.*｜>|<pad>|<mask>|<unk>|<s>|</s>)$")


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for how this byte-level BPE tokenizer splits text, or a UserError."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split" and kinds[1:] == ["ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in SPLIT_REGEX_PRE:
            return SPLIT_REGEX_PRE[regex]
    raise UserError(
        f"export: the tokenizer's pre-tokenizer ({'+'.join(str(k) for k in kinds) or 'none'}) is not one dft-peft "
        "can name for llama.cpp (GPT-2, SmolLM, Llama-3 and Qwen2 styles are); convert the merged model "
        "(`dft-peft merge-lora`) with llama.cpp's convert_hf_to_gguf.py instead."
    )


def _adds_special(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    """Whether the tokenizer itself puts this token at the start (or end) of an encoded text."""
    if token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and (ids[0] if first else ids[-1]) == token_id


def _bpe_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id up to the model's vocabulary size: byte-level spellings for learned tokens, added
    tokens as they are written in text, and `[PAD<i>]` for rows the tokenizer never produces
    (llama.cpp wants exactly one token per embedding row)."""
    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            special = added[index].special or bool(_LOOKS_SPECIAL.match(token))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _special_vocab(folder: Path, tokenizer: Any, vocab_size: int, load_merges: bool) -> gguf.SpecialVocab:
    special = gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=vocab_size)
    # Say explicitly whether BOS/EOS are added: llama.cpp's defaults differ by tokenizer type.
    special.add_special_token["bos"] = _adds_special(tokenizer, tokenizer.bos_token_id, first=True)
    special.add_special_token["eos"] = _adds_special(tokenizer, tokenizer.eos_token_id, first=False)
    return special


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, folder: Path, vocab_size: int, pre: str | None = None) -> None:
    """Write the tokenizer saved in `folder` (tokenizer.json, tokenizer_config.json, chat template).

    Byte-level BPE (SmolLM2, Llama-3, Qwen2, GPT-2 style) becomes llama.cpp's `gpt2` model;
    a BPE with byte fallback (Llama-2 and Mistral's sentencepiece vocabularies) its `llama` model.
    `pre` overrides the pre-tokenizer name (a model that came from a GGUF keeps the original's).
    """
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UserError("export: the tokenizer has no fast (tokenizer.json) form, which the GGUF vocabulary is built from.")
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"export: a {model.get('type')} tokenizer cannot be written to GGUF by dft-peft (BPE tokenizers can).")
    if model.get("byte_fallback"):
        _add_sentencepiece_bpe(writer, tokenizer, folder, vocab_size, _merge_scores(model))
        return
    tokens, types = _bpe_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    _special_vocab(folder, tokenizer, vocab_size, load_merges=True).add_to_gguf(writer, quiet=True)


def _merge_scores(model: dict[str, Any]) -> dict[str, float]:
    """Sentencepiece scores recovered from the BPE merges: the token made by merge number r scores
    -r, so llama.cpp's highest-score-first merging follows the merges' order.

    gguf's LlamaHfVocab (llama.cpp's fallback without tokenizer.model) gives every token -1000,
    and merging then goes left to right instead of by rank.
    """
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _add_sentencepiece_bpe(writer: gguf.GGUFWriter, tokenizer: Any, folder: Path, vocab_size: int, merge_scores: dict[str, float]) -> None:
    """Llama-2 / Mistral vocabularies, read through gguf's own LlamaHfVocab as llama.cpp does."""
    vocab = gguf.LlamaHfVocab(folder)
    tokens: list[bytes | str] = []
    scores: list[float] = []
    types: list[int] = []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text)
        name = text.decode("utf-8") if isinstance(text, bytes) else text
        scores.append(merge_scores.get(name, 0.0) if token_type == gguf.TokenType.NORMAL else score)
        types.append(token_type)
    for index in range(len(tokens), vocab_size):  # embedding rows past the vocabulary
        tokens.append(f"[PAD{index}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens[:vocab_size])
    writer.add_token_scores(scores[:vocab_size])
    writer.add_token_types(types[:vocab_size])
    _special_vocab(folder, tokenizer, vocab_size, load_merges=False).add_to_gguf(writer, quiet=True)


def source_gguf_pre(path: Path | None) -> str | None:
    """`tokenizer.ggml.pre` of the GGUF a base model was converted from, if it was.

    transformers rebuilds such a tokenizer with a generic pre-tokenizer (SmolLM2's digit split is
    dropped, say), so the original file's name is the better statement of what the model expects.
    """
    if path is None or not path.is_file():
        return None
    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else None
