"""`dft-peft eval`: answer accuracy on maths problems, for the base model and each adapter.

The prompt is built the way training built it (the config's first dataset entry: Alpaca prompt,
or the chat template with the user turn), the model generates (greedy by default, batched with
left padding), and the final answer is extracted and compared numerically with the reference:

* extraction and comparison: `answers.py`; prompts: `prompts.py`; generation: `generation.py`;
* `--samples K --temperature T`: K sampled answers per problem (seeded) give Avg@K, the mean
  accuracy over the samples (the DFT paper's metric), and Pass@K.

Generation stops at EOS, at the end of the first `#### N` line, or where the model starts a new
`### Instruction:` block (an Alpaca-prompted model that keeps going); the text is cut there.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dft_peft.errors import UserError
from dft_peft.evaluate.answers import extract_answer, is_correct, reference_answer
from dft_peft.evaluate.generation import Generation, generate, merged
from dft_peft.evaluate.labels import adapter_label, display_path
from dft_peft.evaluate.prompts import build_prompt, training_chat_template

log = logging.getLogger(__name__)


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
    from dft_peft.model.loading import load_for_inference

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

