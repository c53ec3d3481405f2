"""`dft-peft eval`: answer accuracy on maths problems, for the base model and each adapter.

The prompt is built the way training built it (the config's first dataset entry: Alpaca prompt,
or the chat template with the user turn), the model generates (greedy by default, batched with
left padding), and the final answer is extracted and compared numerically with the reference:

* extraction: the last `#### N` line (GSM8K) or `\\boxed{...}`, whichever comes last; failing
  both, the last number in the text;
* comparison: `,` `$` `%` and trailing zeros stripped, `\\frac{a}{b}` and `a/b` read as fractions,
  equal when the floats differ by at most 1e-6 (relative for numbers above 1);
* `--samples K --temperature T`: K sampled answers per problem (seeded) give Avg@K, the mean
  accuracy over the samples (the DFT paper's metric), and Pass@K.

Generation stops at EOS, at the end of the first `#### N` line, or where the model starts a new
`### Instruction:` block (an Alpaca-prompted model that keeps going); the text is cut there.
"""

from __future__ import annotations

import gc
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dft_peft.errors import UserError

log = logging.getLogger(__name__)

TOLERANCE = 1e-6
STOP_MARKERS = ("\n### Instruction", "\n### Input", "\n### Response", "\n\n\n\n")

# ----------------------------------------------------------------------------- answers

_HASH_LINE = re.compile(r"####[ \t]*([^\n]*)")
_HASH_DONE = re.compile(r"####[^\n]*\d[^\n]*\n")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*[-+]?(?:\d+(?:\.\d+)?|\.\d+))?")


def _boxed_contents(text: str) -> list[tuple[int, str]]:
    """(position, content) of each `\\boxed{...}`, with nested braces balanced."""
    found = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append((m.start(), text[m.end() : i - 1]))
    return found


def _plain_number(num: str) -> str:
    """`+5.00` -> `5`, `-0.750` -> `-0.75`, `.5` -> `0.5`, `-0` -> `0`."""
    num = num.strip().lstrip("+")
    sign = "-" if num.startswith("-") else ""
    num = num.lstrip("-")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    num = num.lstrip("0") or "0"
    if num.startswith("."):
        num = "0" + num
    return num if num == "0" else sign + num


def normalize_answer(text: str | None) -> str | None:
    """The answer in a canonical form: a plain number (`1234`, `-0.75`), a fraction (`3/4`), or,
    for a non-numeric answer, the cleaned text; None when nothing is left."""
    if text is None:
        return None
    s = str(text).strip()
    s = _TEXT.sub(r"\1", s)
    s = _FRAC.sub(r"\1/\2", s)
    s = s.replace("{,}", "").replace("\\!", "").replace("\\,", "").replace("−", "-")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = _THOUSANDS.sub("", s)
    m = _NUMBER.search(s)
    if m:
        value = m.group(0)
        if "/" in value:
            top, bottom = (part.strip() for part in value.split("/", 1))
            return f"{_plain_number(top)}/{_plain_number(bottom)}"
        return _plain_number(value)
    s = s.strip().strip(".").strip()
    return s or None


def to_number(answer: str | None) -> float | None:
    """The value of a normalized answer (fractions divided out), or None when not numeric."""
    if answer is None:
        return None
    try:
        if "/" in answer:
            top, bottom = answer.split("/", 1)
            return float(top) / float(bottom) if float(bottom) != 0 else None
        return float(answer)
    except ValueError:
        return None


def extract_answer(text: str | None) -> str | None:
    """The model's final answer, normalized: the last `#### ...` or `\\boxed{...}`, else the last
    number in the text; None when there is none."""
    if not text:
        return None
    candidates = [(m.start(), m.group(1)) for m in _HASH_LINE.finditer(text)] + _boxed_contents(text)
    for _, content in sorted(candidates, key=lambda c: c[0], reverse=True):
        answer = normalize_answer(content)
        if answer is not None:
            return answer
    numbers = _NUMBER.findall(_THOUSANDS.sub("", _FRAC.sub(r"\1/\2", text)))
    return normalize_answer(numbers[-1]) if numbers else None


def is_correct(predicted: str | None, reference: str | None) -> bool:
    """Numbers equal within 1e-6 (relative above 1); non-numeric answers compared as text."""
    if predicted is None or reference is None:
        return False
    a, b = to_number(predicted), to_number(reference)
    if a is not None and b is not None:
        return abs(a - b) <= TOLERANCE * max(1.0, abs(b))
    return predicted.strip().lower() == reference.strip().lower()


def reference_answer(row: Mapping[str, Any], messages_field: str = "messages") -> str | None:
    """The row's reference: its `answer` field (GSM8K's full solution is read at `####`), else
    the `#### N` that ends `output`, else the last assistant message's."""
    answer = row.get("answer")
    if answer is not None and str(answer).strip():
        text = str(answer)
        m = list(_HASH_LINE.finditer(text))
        return normalize_answer(m[-1].group(1) if m else text)
    texts = []
    if row.get("output"):
        texts.append(str(row["output"]))
    messages = row.get(messages_field)
    if isinstance(messages, list):
        texts += [str(m.get("content", "")) for m in messages if isinstance(m, Mapping) and m.get("role") in ("assistant", "gpt")]
    for text in reversed(texts):
        m = list(_HASH_LINE.finditer(text))
        if m:
            return normalize_answer(m[-1].group(1))
        boxed = _boxed_contents(text)
        if boxed:
            return normalize_answer(boxed[-1][1])
    return None


def truncate_generation(text: str) -> str:
    """Cut the text after the first complete `#### N` line or before a stop marker."""
    cut = len(text)
    m = _HASH_DONE.search(text)
    if m:
        cut = m.end() - 1
    for marker in STOP_MARKERS:
        i = text.find(marker)
        if 0 <= i < cut:
            cut = i
    return text[:cut].rstrip()


# ----------------------------------------------------------------------------- prompts


def _user_text(row: Mapping[str, Any], where: str) -> str:
    for key in ("instruction", "question", "problem", "prompt"):
        if row.get(key):
            text = str(row[key])
            if key == "instruction" and row.get("input"):
                text += "\n\n" + str(row["input"])
            return text
    raise UserError(f"{where}: no problem text (an `instruction`, `question` or `problem` field)")


def build_prompt(row: Mapping[str, Any], entry: Any, tokenizer: Any, chat_template: str | None, where: str) -> str:
    """The prompt text the model saw in training, up to where its answer starts."""
    from dft_peft.data.formats import alpaca_prompt

    if entry.type == "alpaca":
        if row.get("instruction") is None:
            raise UserError(f"{where}: missing field 'instruction' (the dataset is formatted as type: alpaca)")
        return alpaca_prompt(str(row["instruction"]), None if row.get("input") is None else str(row["input"]))
    from dft_peft.data.alpaca_styles import ALPACA_STYLE_TYPES, prompt_for

    if entry.type in ALPACA_STYLE_TYPES:  # alpaca:phi, alpaca:chatml, ...: Axolotl's other styles
        if row.get("instruction") is None:
            raise UserError(f"{where}: missing field 'instruction' (the dataset is formatted as type: {entry.type})")
        return prompt_for(entry.type, str(row["instruction"]), None if row.get("input") is None else str(row["input"]))
    if entry.type == "chat_template":
        raw = row.get(entry.field_messages)
        if isinstance(raw, list) and raw:
            messages = [
                {"role": entry.canonical_role(str(m[entry.role_key])), "content": str(m[entry.content_key])}
                for m in raw
            ]
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()  # the reference answer: the model writes its own
            if not messages:
                raise UserError(f"{where}: no user message before the assistant's answer")
        else:
            messages = [{"role": "user", "content": _user_text(row, where)}]
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )
    raise UserError(
        f"eval builds prompts for dataset types alpaca and chat_template; the config's first dataset is "
        f"type: {entry.type}"
    )


def training_chat_template(cfg: Any, entry: Any, tokenizer: Any) -> str | None:
    """The chat template the dataset entry was trained with (None for non-chat formats)."""
    if entry.type != "chat_template":
        return None
    from dft_peft.data.chat import resolve_chat_template

    return resolve_chat_template(entry.chat_template or cfg.chat_template_jinja or cfg.chat_template, tokenizer, "eval")


def training_prompt(cfg: Any, tokenizer: Any, text: str) -> str:
    """A free-text question formatted like the config's first dataset at training time, so that
    `dft-peft generate` asks in the format the adapter learned (alpaca or the chat template)."""
    entry = cfg.datasets[0]
    from dft_peft.data.alpaca_styles import ALPACA_STYLE_TYPES

    if entry.type not in ("alpaca", "chat_template") and entry.type not in ALPACA_STYLE_TYPES:
        return text
    template = training_chat_template(cfg, entry, tokenizer)
    return build_prompt({"instruction": text}, entry, tokenizer, template, "--prompt")


# ----------------------------------------------------------------------------- generation


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

    from dft_peft.data.collator import pad_id_of

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


# ----------------------------------------------------------------------------- the evaluation


@dataclass
class ModelScore:
    label: str
    adapter: str | None
    greedy: list[Generation] = field(default_factory=list)
    sampled: list[list[Generation]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.greedy)

    @property
    def accuracy(self) -> float:
        return sum(g.correct for g in self.greedy) / max(self.n, 1)

    def avg_at_k(self) -> float | None:
        if not self.sampled:
            return None
        return sum(sum(g.correct for g in s) / len(s) for s in self.sampled) / len(self.sampled)

    def pass_at_k(self) -> float | None:
        if not self.sampled:
            return None
        return sum(any(g.correct for g in s) for s in self.sampled) / len(self.sampled)

    def mean_tokens(self) -> float:
        return sum(g.tokens for g in self.greedy) / max(self.n, 1)

    def summary(self, k: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.label,
            "adapter": self.adapter,
            "n": self.n,
            "accuracy": self.accuracy,
            "mean_tokens": self.mean_tokens(),
            "no_answer": sum(g.answer is None for g in self.greedy),
        }
        if k > 1:
            out[f"avg@{k}"] = self.avg_at_k()
            out[f"pass@{k}"] = self.pass_at_k()
        return out


@dataclass
class EvalReport:
    config: str
    dataset: str
    settings: dict[str, Any]
    prompts: list[str]
    references: list[str | None]
    models: list[ModelScore]

    @property
    def k(self) -> int:
        return int(self.settings.get("samples", 1))

    def to_dict(self) -> dict[str, Any]:
        records = []
        for i, (prompt, ref) in enumerate(zip(self.prompts, self.references)):
            per_model = {}
            for m in self.models:
                entry = m.greedy[i].to_dict()
                if m.sampled:
                    entry["samples"] = [g.to_dict() for g in m.sampled[i]]
                per_model[m.label] = entry
            records.append({"index": i, "prompt": prompt, "reference": ref, "models": per_model})
        return {
            "config": self.config,
            "dataset": self.dataset,
            "settings": self.settings,
            "summary": [m.summary(self.k) for m in self.models],
            "records": records,
        }

    def table(self) -> str:
        k = self.k
        head = f"{'model':<32} {'n':>5} {'accuracy':>9}"
        if k > 1:
            head += f" {f'avg@{k}':>8} {f'pass@{k}':>8}"
        head += f" {'mean tokens':>12} {'no answer':>10}"
        lines = [head]
        for m in self.models:
            line = f"{m.label[:32]:<32} {m.n:>5} {100 * m.accuracy:>8.1f}%"
            if k > 1:
                line += f" {100 * (m.avg_at_k() or 0):>7.1f}% {100 * (m.pass_at_k() or 0):>7.1f}%"
            no_answer = sum(g.answer is None for g in m.greedy)
            line += f" {m.mean_tokens():>12.1f} {no_answer:>10}"
            lines.append(line)
        return "\n".join(lines)


def merged(model: Any) -> Any:
    """A full-precision LoRA model with the adapter merged into the weights: the same outputs
    from a third of the matmuls (each LoRA linear is three), which is most of the decode time."""
    if hasattr(model, "merge_and_unload") and not getattr(model, "is_quantized", False):
        return model.merge_and_unload()
    return model


def load_problems(cfg: Any, dataset: str | Path, limit: int | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """(dataset entry used for the prompt format, rows) with a reference answer for every row."""
    from dft_peft.data.loading import load_raw

    if not cfg.datasets:
        raise UserError("datasets: is empty; eval formats prompts like the config's first dataset entry")
    if not Path(dataset).exists():
        raise UserError(f"--dataset {dataset}: file not found")
    entry = cfg.datasets[0].model_copy(update={"path": str(dataset), "data_files": None, "ds_type": None})
    raw = load_raw(entry)
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))
    rows = [dict(r) for r in raw]
    for i, row in enumerate(rows):
        if reference_answer(row, entry.field_messages) is None:
            raise UserError(
                f"{dataset} row {i + 1}: no reference answer; add an `answer` field or end `output` with `#### N`"
            )
    if not rows:
        raise UserError(f"--dataset {dataset}: no rows")
    return entry, rows


def evaluate(
    cfg: Any,
    dataset: str | Path,
    *,
    adapters: Sequence[str | Path] = (),
    include_base: bool = True,
    max_new_tokens: int = 256,
    samples: int = 1,
    temperature: float = 1.0,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int | None = None,
    out: str | Path | None = None,
    config_path: str | None = None,
) -> EvalReport:
    """Greedy accuracy (and Avg@k/Pass@k with `samples` > 1) of the base model and each adapter."""
    from dft_peft.data.tokenize import default_prefix_ids
    from dft_peft.modeling import load_for_inference
    from dft_peft.probe import adapter_label, display_path

    if samples < 1:
        raise UserError(f"--samples {samples}: must be at least 1")
    if samples > 1 and temperature <= 0:
        raise UserError("--samples > 1 samples answers: give --temperature above 0 (e.g. 1.0)")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    entry, rows = load_problems(cfg, dataset, limit)
    references = [reference_answer(r, entry.field_messages) for r in rows]
    specs: list[tuple[str, str | None]] = [("base", None)] if include_base else []
    specs += [adapter_label(a) for a in adapters]
    if not specs:
        raise UserError("nothing to evaluate: pass --adapter DIR or drop --no-base")
    for _, folder in specs:
        if folder is not None and not Path(folder, "adapter_config.json").is_file():
            raise UserError(f"`{folder}` holds no adapter (adapter_config.json); pass a trained adapter folder.")
    seed = cfg.seed if seed is None else seed
    settings = {
        "max_new_tokens": max_new_tokens,
        "samples": samples,
        "temperature": temperature if samples > 1 else 0.0,
        "seed": seed,
        "limit": limit,
        "batch_size": batch_size,
        "prompt_format": entry.type,
    }
    prompts_text: list[str] = []
    scores: list[ModelScore] = []
    for label, folder in specs:
        model, tokenizer = load_for_inference(cfg, folder)
        model = merged(model)
        template = training_chat_template(cfg, entry, tokenizer)
        texts = [build_prompt(r, entry, tokenizer, template, f"{dataset} row {i + 1}") for i, r in enumerate(rows)]
        if not prompts_text:
            prompts_text = texts
        prefix = [] if entry.type == "chat_template" else default_prefix_ids(tokenizer)
        prompt_ids = [prefix + list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        score = ModelScore(label, folder and display_path(folder))
        greedy = generate(
            model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=f"eval {label}"
        )
        for (text, tokens), ref in zip((g[0] for g in greedy), references):
            answer = extract_answer(text)
            score.greedy.append(Generation(text, answer, is_correct(answer, ref), tokens))
        if samples > 1:
            torch.manual_seed(seed)
            sampled = generate(
                model,
                tokenizer,
                prompt_ids,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                samples=samples,
                temperature=temperature,
                progress=f"eval {label} (samples)",
            )
            for gens, ref in zip(sampled, references):
                row_gens = []
                for text, tokens in gens:
                    answer = extract_answer(text)
                    row_gens.append(Generation(text, answer, is_correct(answer, ref), tokens))
                score.sampled.append(row_gens)
        scores.append(score)
        del model
        gc.collect()
    report = EvalReport(display_path(config_path) if config_path else "", display_path(str(dataset)), settings, prompts_text, references, scores)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return report


__all__ = [
    "EvalReport",
    "evaluate",
    "extract_answer",
    "is_correct",
    "normalize_answer",
    "reference_answer",
    "to_number",
    "truncate_generation",
]
