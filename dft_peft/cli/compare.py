"""`dft-peft compare config.yml --losses sft,dft,dft_alpha=0.5 [--eval-dataset FILE]`.

Which objective suits a dataset is an empirical question (the prior check gives a first answer),
so this trains each variant from the same config, seed and rows, each into its own folder under
the config's `output_dir` (`<output_dir>/<variant>`), then evaluates them side by side with the
same `eval` as `dft-peft eval`, and writes one table: the prior check's figures first, then per
variant the final training CE and token accuracy and, with an eval set, answer accuracy.

It resumes: a variant whose folder already holds a finished adapter of the same objective is not
trained again; one interrupted mid-run continues from its last checkpoint.

A variant is a loss name (`sft`, `dft`, `eaft`), or objective parameters `key=value` (the
objective is the one that declares the key: `dft_alpha=0.5` is `loss: dft` with that mix),
several joined with `+` (`dft_alpha=0.5+dft_sft_special_tokens=true`), or `loss+key=value`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dft_peft.errors import UserError

log = logging.getLogger("dft_peft")

REPORT_NAME = "compare"


@dataclass(frozen=True)
class Variant:
    """One objective to train: its label, loss name and objective parameters."""

    label: str
    loss: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.label).strip("-") or self.loss


def parse_variants(spec: str) -> list[Variant]:
    """`"sft,dft,dft_alpha=0.5"` -> variants; an unknown loss or key is one clear line."""
    from dft_peft.losses.registry import get_loss, owner_of_param, validate_loss_params

    variants: list[Variant] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        loss: str | None = None
        params: dict[str, Any] = {}
        for part in item.split("+"):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep:
                if loss is not None:
                    raise UserError(f"--losses `{item}`: names two objectives ({loss}, {key}); separate variants with commas.")
                get_loss(key)
                loss = key
                continue
            owner = owner_of_param(key)
            if owner is None:
                raise UserError(f"--losses `{item}`: `{key}` is not a parameter of any objective (e.g. dft_alpha=0.5).")
            if loss is not None and owner != loss:
                raise UserError(f"--losses `{item}`: `{key}` is a parameter of `{owner}`, not of `{loss}`.")
            loss = owner
            params[key] = yaml.safe_load(value)
        if loss is None:
            continue
        try:
            validate_loss_params(loss, params)
        except UserError as exc:
            raise UserError(f"--losses `{item}`: {exc}") from None
        variants.append(Variant(item, loss, params))
    labels = [v.label for v in variants]
    if len(variants) < 1:
        raise UserError("--losses is empty; give objectives to compare, e.g. --losses sft,dft,dft_alpha=0.5")
    if len(set(labels)) != len(labels):
        raise UserError(f"--losses names a variant twice: {','.join(labels)}")
    return variants


# ----------------------------------------------------------------------------- configs


def variant_config(config_path: Path, variant: Variant, overrides: list[str], *, prior_check: bool):
    """The config with the variant's objective and folder; the file's own objective keys dropped."""
    from dft_peft.config.load import build_config, parse_overrides
    from dft_peft.losses.registry import loss_param_names

    raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise UserError(f"{config_path.name}: the top level must be `key: value` lines.")
    raw.update(parse_overrides(overrides))
    objective_keys = {k for keys in loss_param_names().values() for k in keys} | {"loss", "use_eaft"}
    raw = {k: v for k, v in raw.items() if k not in objective_keys}
    base = build_config(raw, source=config_path, base_dir=config_path.parent)
    out = Path(base.output_dir) / variant.folder
    raw.update(loss=variant.loss, **variant.params)
    raw["output_dir"] = str(out)
    raw["prior_check"] = prior_check and raw.get("prior_check", True) is not False
    raw["auto_resume_from_checkpoints"] = True  # an interrupted variant continues where it stopped
    return build_config(raw, source=config_path, base_dir=config_path.parent)


def finished(cfg: Any) -> dict[str, Any] | None:
    """The train_metrics.json of a finished run of the same objective in cfg.output_dir, or None."""
    folder = Path(cfg.output_dir)
    metrics = folder / "train_metrics.json"
    if not (folder / "adapter_config.json").is_file() or not metrics.is_file():
        return None
    data = json.loads(metrics.read_text())
    if data.get("loss") != cfg.loss or data.get("loss_params") != cfg.loss_kwargs():
        raise UserError(
            f"{folder} holds a run of `loss: {data.get('loss')}` {data.get('loss_params')}, not this variant "
            f"(`loss: {cfg.loss}` {cfg.loss_kwargs()}); move it aside or use another output_dir."
        )
    return data


# ----------------------------------------------------------------------------- the run


@dataclass
class CompareReport:
    config: str
    prior: dict[str, Any] | None
    rows: list[dict[str, Any]]
    eval_dataset: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "prior_check": self.prior, "eval_dataset": self.eval_dataset, "variants": self.rows}

    def table(self) -> str:
        """Markdown: the prior figures, then one row per model."""
        lines: list[str] = []
        if self.prior:
            p = self.prior
            eos = "n/a" if p.get("eos_median_p") is None else f"{p['eos_median_p']:.3g}"
            lines += [
                f"Prior check ({p['rows']} rows, {p['tokens']} target tokens): mean p {p['mean_p']:.3f}, "
                f"median p {p['median_p']:.3f}, p < 1e-2 {100 * p['share_p_below_1e_2']:.1f}%, "
                f"p < 1e-3 {100 * p['share_p_below_1e_3']:.1f}%, EOS median p {eos}; "
                f"judgement: {p['verdict']}.",
                "",
            ]
        with_eval = any("accuracy" in r for r in self.rows)
        head = ["variant", "loss", "params", "steps", "final ce", "final token acc"]
        if with_eval:
            head += ["accuracy", "mean tokens", "no answer"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in self.rows:
            cells = [
                r["variant"], r["loss"] or "-", ", ".join(f"{k}={v}" for k, v in (r["params"] or {}).items()) or "-",
                _fmt(r.get("steps"), "{}"), _fmt(r.get("final_ce"), "{:.3f}"), _fmt(r.get("final_token_acc"), "{:.3f}"),
            ]
            if with_eval:
                cells += [_fmt(r.get("accuracy"), "{:.1%}"), _fmt(r.get("mean_tokens"), "{:.1f}"), _fmt(r.get("no_answer"), "{}")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _fmt(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def compare(
    config_path: str | Path,
    losses: str,
    *,
    eval_dataset: str | Path | None = None,
    overrides: list[str] | None = None,
    limit: int | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
) -> CompareReport:
    """Train every variant that is not trained yet, evaluate all, write compare.md / compare.json."""
    from dft_peft.train import train

    config_path = Path(config_path)
    if not config_path.is_file():
        raise UserError(f"config file not found: {config_path}")
    if eval_dataset is not None and not Path(eval_dataset).is_file():
        raise UserError(f"--eval-dataset {eval_dataset}: file not found")
    variants = parse_variants(losses)
    overrides = list(overrides or [])
    configs = [variant_config(config_path, v, overrides, prior_check=(i == 0)) for i, v in enumerate(variants)]
    root = Path(configs[0].output_dir).parent
    rows: list[dict[str, Any]] = []
    prior: dict[str, Any] | None = None
    for variant, cfg in zip(variants, configs):
        metrics = finished(cfg)
        if metrics is None:
            log.info("compare: training %s into %s", variant.label, cfg.output_dir)
            train(cfg)
            metrics = finished(cfg) or {}
        else:
            log.info("compare: %s already trained in %s; not training it again", variant.label, cfg.output_dir)
        prior = prior or metrics.get("prior_check")
        last = metrics.get("last_log") or {}
        rows.append(
            {
                "variant": variant.label,
                "loss": cfg.loss,
                "params": cfg.loss_kwargs(),
                "folder": str(cfg.output_dir),
                "steps": metrics.get("global_step"),
                "final_ce": last.get("ce"),
                "final_token_acc": last.get("token_acc"),
            }
        )
    if prior is None:
        from dft_peft.evaluate.prior import validate_prior

        prior = validate_prior(configs[0]).metrics()
    if eval_dataset is not None:
        from dft_peft.evaluate.math_eval import evaluate

        report = evaluate(
            configs[0],
            eval_dataset,
            adapters=[f"{v.folder}={cfg.output_dir}" for v, cfg in zip(variants, configs)],
            include_base=True,
            max_new_tokens=max_new_tokens,
            limit=limit,
            batch_size=batch_size,
            out=root / f"{REPORT_NAME}-eval.json",
            config_path=str(config_path),
        )
        by_label = {m.label: m.summary(1) for m in report.models}
        base = by_label.get("base")
        if base:
            rows.insert(0, {"variant": "base", "loss": None, "params": None, "folder": None} | _eval_cells(base))
        for row, variant in zip(rows[1 if base else 0 :], variants):
            row.update(_eval_cells(by_label.get(variant.folder, {})))
    result = CompareReport(str(config_path), prior, rows, None if eval_dataset is None else str(eval_dataset))
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{REPORT_NAME}.md").write_text(result.table() + "\n", encoding="utf-8")
    (root / f"{REPORT_NAME}.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    return result


def _eval_cells(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary.get(k) for k in ("accuracy", "mean_tokens", "no_answer", "n")}
