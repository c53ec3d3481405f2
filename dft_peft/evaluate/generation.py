"""Batched generation for eval: greedy or sampled, left padded, stopped per row at EOS, at the end
of the first `#### N` line, or where an Alpaca-prompted model starts a new `### Instruction:` block."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dft_peft.data.collator import pad_id_of
from dft_peft.evaluate.answers import truncate_generation

log = logging.getLogger(__name__)


class _StopAtAnswer:
    """Per-row stopping: a finished `#### N` line or a stop marker in the newest tokens."""

    def __init__(self, tokenizer: Any, prompt_len: int, window: int = 24):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.window = window

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        tail = input_ids[:, self.prompt_len :][:, -self.window :]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        done = [truncate_generation(t) != t.rstrip() for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _stopping_criteria(tokenizer: Any, prompt_len: int):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stop(_StopAtAnswer, StoppingCriteria):
        pass

    return StoppingCriteriaList([Stop(tokenizer, prompt_len)])


@dataclass
class Generation:
    text: str
    answer: str | None
    correct: bool
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"generation": self.text, "answer": self.answer, "correct": self.correct, "tokens": self.tokens}


def _tokens_used(tokenizer: Any, ids: list[int], full: str, text: str) -> int:
    """Generated tokens up to the end of `text` (the generation after truncation)."""
    if text == full.rstrip():
        return len(ids)
    for n in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:n], skip_special_tokens=True).rstrip()) >= len(text):
            return n
    return len(ids)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    samples: int = 1,
    temperature: float = 0.0,
    progress: str = "",
) -> list[list[tuple[str, int]]]:
    """For each prompt (token ids), `samples` continuations as (text, generated tokens).

    Greedy when temperature is 0. Prompts are batched by length with left padding; the order of
    the result follows `prompts`.
    """
    from transformers import GenerationConfig

    pad_id = pad_id_of(tokenizer)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
    sampling = temperature > 0
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=1.0 if sampling else None,
        top_k=0 if sampling else None,
        num_return_sequences=samples,
        pad_token_id=pad_id,
        eos_token_id=eos,
    )
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[tuple[str, int]]] = [[] for _ in prompts]
    device = model.device
    done = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        length = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = prompts[i]
            input_ids[row, length - len(ids) :] = torch.tensor(ids)
            mask[row, length - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            generation_config=gen_cfg,
            stopping_criteria=_stopping_criteria(tokenizer, length),
        )
        new = out[:, length:].tolist()
        for j, ids in enumerate(new):
            for k, t in enumerate(ids):
                if t in eos_ids:
                    ids = ids[:k]
                    break
            full = tokenizer.decode(ids, skip_special_tokens=True)
            text = truncate_generation(full)
            results[idx[j // samples]].append((text, _tokens_used(tokenizer, ids, full, text)))
        done += len(idx)
        if progress:
            log.info("%s: %d/%d problems", progress, done, len(prompts))
    return results


def merged(model: Any) -> Any:
    """A full-precision LoRA model with the adapter merged into the weights: the same outputs
    from a third of the matmuls (each LoRA linear is three), which is most of the decode time."""
    if hasattr(model, "merge_and_unload") and not getattr(model, "is_quantized", False):
        return model.merge_and_unload()
    return model
