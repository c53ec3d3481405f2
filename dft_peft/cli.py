"""`dft-peft train | validate | preprocess | merge-lora | generate | inspect | eval`.

Bad input (a mistyped key, a missing file, a row without its field, a config that does not fit
in memory) is one line on stderr and exit code 2; `--debug` shows the traceback as well.
Config keys can be overridden on the command line: `dft-peft train cfg.yml --max_steps=5`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from dft_peft.errors import UserError

EXIT_BAD_INPUT = 2


# ----------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args)  # before the heavy imports: a config error answers in a second
    from dft_peft.train import train

    result = train(cfg)
    print(f"done: {result.global_step} steps; adapter saved to {result.output_dir}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from dft_peft.dry_run import describe_run

    cfg = _config(args)
    print(cfg.describe())
    print()
    print(describe_run(cfg))
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from dft_peft import modeling
    from dft_peft.train import prepare_data

    cfg = _config(args)
    if not cfg.dataset_prepared_path:
        cfg = cfg.model_copy(update={"dataset_prepared_path": str(Path(cfg.output_dir) / "prepared")})
    tokenizer = modeling.load_tokenizer(cfg, modeling.resolve_model_path(cfg.base_model, cfg.model_revision))
    data = prepare_data(cfg, tokenizer)
    print(data.summary())
    print(f"prepared data cached under {cfg.dataset_prepared_path}")
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from dft_peft.modeling import load_for_inference

    cfg = _config(args)
    adapter = args.adapter or cfg.output_dir
    out = Path(args.out or Path(cfg.output_dir) / "merged")
    model, tokenizer = load_for_inference(cfg, adapter)
    merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from dft_peft.math_eval import training_prompt
    from dft_peft.modeling import load_for_inference

    cfg = _config(args)
    adapter = None if args.base else (args.adapter or cfg.output_dir)
    model, tokenizer = load_for_inference(cfg, adapter)
    text = args.prompt if args.raw else training_prompt(cfg, tokenizer, args.prompt)
    # A chat template carries its own special tokens; other prompts get the tokenizer's BOS.
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=cfg.datasets[0].type != "chat_template")
    encoded = {k: v.to(model.device) for k, v in encoded.items()}
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from dft_peft.probe import inspect

    cfg = _config(args)
    adapters = ([args.adapter] if args.adapter else []) + list(args.compare or [])
    out = Path(args.out or Path(cfg.output_dir) / "inspect.png")
    report = inspect(
        cfg,
        adapters=adapters,
        dataset=args.dataset,
        max_rows=args.max_rows,
        out=out,
        batch_size=args.batch_size,
        config_path=args.config,
    )
    print(report.table())
    print(f"report written to {out} and {out.with_suffix('.json')}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dft_peft.math_eval import evaluate

    cfg = _config(args)
    report = evaluate(
        cfg,
        args.dataset,
        adapters=list(args.adapter or []),
        include_base=not args.no_base,
        max_new_tokens=args.max_new_tokens,
        samples=args.samples,
        temperature=args.temperature,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        out=args.out,
        config_path=args.config,
    )
    print(report.table())
    if args.out:
        print(f"per-problem records written to {args.out}")
    return 0


# ----------------------------------------------------------------------------- plumbing


def _config(args: argparse.Namespace):
    from dft_peft.config import load_config

    return load_config(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dft-peft", description="Dynamic Fine-Tuning for LoRA/QLoRA from Axolotl-style YAML.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, fn: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="YAML config file")
        # SUPPRESS: without it the subcommand's default (False) overwrites `dft-peft --debug train`.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.set_defaults(func=fn)
        return p

    command("train", cmd_train, "fine-tune with the config (overrides: --key=value)")
    command("validate", cmd_validate, "check the config and print what the run would do, without training")
    command("preprocess", cmd_preprocess, "tokenize the datasets into dataset_prepared_path")
    merge = command("merge-lora", cmd_merge_lora, "merge the trained adapter into a full-precision model")
    merge.add_argument("--adapter", help="adapter folder (default: output_dir)")
    merge.add_argument("--out", help="where to write the merged model (default: output_dir/merged)")
    gen = command("generate", cmd_generate, "answer a prompt with the trained adapter")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--adapter", help="adapter folder (default: output_dir)")
    gen.add_argument("--base", action="store_true", help="use the base model without the adapter")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, not in the training data's format")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    insp = command("inspect", cmd_inspect, "histogram of the training tokens' probabilities: base model vs adapters")
    insp.add_argument("--adapter", help="adapter folder to compare with the base model")
    insp.add_argument("--compare", nargs="+", action="extend", metavar="DIR", help="more adapter folders (NAME=DIR sets the label)")
    insp.add_argument("--dataset", help="rows to use instead of the config's training data (formatted like its first entry)")
    insp.add_argument("--max-rows", type=int, default=200, help="rows to run (default 200)")
    insp.add_argument("--batch-size", type=int, default=8)
    insp.add_argument("--out", help="PNG to write; the numbers go to the .json beside it (default output_dir/inspect.png)")
    ev = command("eval", cmd_eval, "answer accuracy on maths problems (GSM `#### N` / \\boxed{}) for the base model and adapters")
    ev.add_argument("--dataset", required=True, help="problems with an `answer` field (or `output` ending in `#### N`)")
    ev.add_argument("--adapter", nargs="+", action="extend", metavar="DIR", help="adapter folders to evaluate (NAME=DIR sets the label)")
    ev.add_argument("--no-base", action="store_true", help="skip the base model")
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--samples", type=int, default=1, help="K sampled answers per problem for Avg@K (greedy accuracy is always reported)")
    ev.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --samples (default 1.0)")
    ev.add_argument("--seed", type=int, help="sampling seed (default: the config's seed)")
    ev.add_argument("--limit", type=int, help="evaluate the first N problems")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--out", help="JSON file for the per-problem records")
    return parser


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `--key=value` / `--key value` config overrides from the command's own options."""
    parser = build_parser()
    own = {opt for action in _all_actions(parser) for opt in action.option_strings}
    known, overrides = [], []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        name = item.split("=", 1)[0]
        if item.startswith("--") and name not in own:
            if "=" in item:
                overrides.append(item[2:])
            elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                overrides.append(f"{item[2:]}={items[i + 1]}")
                i += 1
            else:
                overrides.append(f"{item[2:]}=true")
        else:
            known.append(item)
        i += 1
    return known, overrides


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from sub._actions


def _setup_logging() -> None:
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("dft_peft").setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network at run time
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # bitsandbytes on an AVX512-bf16 CPU logs at import that `kernels` (which downloads from the
    # hub) is missing: an offline tool cannot act on it, and it preceded every error line.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*publisher trust check.*")
    # Axolotl's environment brings torchao, which logs missing CUDA-only libraries and torch
    # pytree deprecations on import (through peft): noise before every line we print.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not sys.stderr.isatty():
        # Per-step dataset progress bars in a log file or pipe are noise (and came before the
        # one-line error of a bad row); the data summary is logged anyway.
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()


def _one_line(exc: BaseException) -> str | None:
    """A user-fixable failure as one line, or None for a bug (which keeps its traceback)."""
    import torch

    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return (
            "out of GPU memory: lower micro_batch_size or sequence_len, set gradient_checkpointing: true, "
            "or load_in_4bit: true with adapter: qlora."
        )
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"file not found: {exc.filename}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    known, overrides = split_overrides(argv)
    args = build_parser().parse_args(known)
    args.overrides = overrides
    _setup_logging()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("dft-peft: interrupted; set auto_resume_from_checkpoints: true to continue from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        message = _one_line(exc)
        if message is None or args.debug:
            raise
        print(f"dft-peft: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
