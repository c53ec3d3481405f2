"""`dft-peft train | validate | preprocess | merge-lora | export | generate | inspect | eval | compare`.

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

from dft_peft.cli import overrides
from dft_peft.errors import UserError

EXIT_BAD_INPUT = 2


# ----------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args)  # before the heavy imports: a config error answers in a second
    from dft_peft.train import train

    from dft_peft.training.distributed import is_main_process

    result = train(cfg, overwrite=getattr(args, "overwrite", False))
    if is_main_process():  # under torchrun / accelerate launch, once
        print(f"done: {result.global_step} steps; adapter saved to {result.output_dir}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from dft_peft.cli.dry_run import describe_run

    from dft_peft.config.checks import check_paths
    from dft_peft.training.run_identity import check_run_folder

    cfg = _config(args)
    gpu_memory = _gpu_memory(args)  # a bad --gpu-memory answers before the slow parts
    check_paths(cfg)  # what train would refuse about paths and output_dir, before anything else
    check_run_folder(cfg)
    run = describe_run(cfg)  # every error comes first, before the long resolved config
    print(cfg.describe())
    print()
    print(run)
    _print_memory_plan(cfg, gpu_memory)
    if getattr(args, "prior", False):
        _print_prior_check(cfg)
    return 0


def _gpu_memory(args: argparse.Namespace) -> int | None:
    from dft_peft.memory.planner import parse_memory

    text = getattr(args, "gpu_memory", None)
    return parse_memory(text) if text else None


def _print_memory_plan(cfg, gpu_memory: int | None) -> None:
    """`validate`: the estimated peak GPU memory, part by part, and the longest sequence_len that fits."""
    from dft_peft.memory import planner
    from dft_peft.memory.preflight import rehearsal_report

    print()
    try:
        print(planner.memory_report(cfg, gpu_memory))
    except UserError as exc:
        print(f"# will it fit\nnot estimated: {exc}")
        return
    if not gpu_memory and planner.cuda_memory() is None:  # asked for, or on a GPU: a search takes a minute
        print("# rehearsed: add --gpu-memory 16GB to run the real step on the meta device and search the longest sequence_len")
        return
    try:
        print(rehearsal_report(cfg, gpu_memory))
    except Exception as exc:  # a model the meta build does not cover: the estimate above stands
        print(f"# rehearsed: not run ({str(exc).splitlines()[0][:160]})")


def _print_prior_check(cfg) -> None:
    """`validate --prior`: the base model's prior on a sample of the training rows (loads the model)."""
    from dft_peft.evaluate.prior import validate_prior

    print()
    print(validate_prior(cfg).text())


def cmd_compare(args: argparse.Namespace) -> int:
    from dft_peft.cli.compare import compare

    report = compare(
        args.config,
        args.losses,
        eval_dataset=args.eval_dataset,
        overrides=args.overrides,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    print(report.table())
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from dft_peft.model import loading, source
    from dft_peft.train import prepare_data

    cfg = _config(args)
    if not cfg.dataset_prepared_path:
        cfg = cfg.model_copy(update={"dataset_prepared_path": str(Path(cfg.output_dir) / "prepared")})
    tokenizer = loading.load_tokenizer(cfg, source.resolve_model_path(cfg.base_model, cfg.model_revision, cfg.gguf_file))
    data = prepare_data(cfg, tokenizer)
    print(data.summary())
    print(f"prepared data cached under {cfg.dataset_prepared_path}")
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from dft_peft.export import merge_lora

    cfg = _config(args)
    out = merge_lora(cfg, args.adapter, args.out)
    print(f"merged model written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dft_peft.export import export_gguf

    cfg = _config(args)
    result = export_gguf(cfg, adapter=args.adapter, out=args.out, quant=args.quant)
    print(result.summary())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from dft_peft.evaluate.prompts import training_prompt
    from dft_peft.model.loading import load_for_inference

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
    from dft_peft.evaluate.probe import inspect

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
    from dft_peft.evaluate.math_eval import evaluate

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


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors (usage block + message) as the one `dft-peft: error:` line, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        import re

        hint = ""
        bad = re.search(r"invalid choice: '([^']+)'", message)
        if bad:
            from dft_peft.errors import did_you_mean

            choices = re.findall(r"'([^']+)'", message.split("choose from", 1)[-1])
            hint = did_you_mean(bad.group(1), choices)
        print(f"dft-peft: error: {self.prog}: {message}{hint} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dft-peft", description="Dynamic Fine-Tuning for LoRA/QLoRA from Axolotl-style YAML.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, fn: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="YAML config file")
        # SUPPRESS: without it the subcommand's default (False) overwrites `dft-peft --debug train`.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.set_defaults(func=fn)
        return p

    trn = command("train", cmd_train, "fine-tune with the config (overrides: --key=value)")
    trn.add_argument("--overwrite", action="store_true", help="output_dir holds another run: move it aside to <output_dir>.old-<time> (nothing is deleted)")
    validate = command("validate", cmd_validate, "check the config and print what the run would do, without training")
    validate.add_argument("--prior", action="store_true", help="also run the prior check: does the base model's prior on the data suit DFT? (loads the model)")
    validate.add_argument("--gpu-memory", metavar="SIZE", help="plan for a card of this size, e.g. 16GB (GB = GiB; default: this machine's CUDA card, else 16 and 24 GiB)")
    cmp = command("compare", cmd_compare, "train several objectives from the same config and rows, evaluate them side by side")
    cmp.add_argument("--losses", required=True, help="variants, e.g. sft,dft,dft_alpha=0.5 (each into output_dir/<variant>)")
    cmp.add_argument("--eval-dataset", help="held-out problems for answer accuracy (as `dft-peft eval --dataset`)")
    cmp.add_argument("--limit", type=int, help="evaluate the first N problems")
    cmp.add_argument("--max-new-tokens", type=int, default=256)
    cmp.add_argument("--batch-size", type=int, default=8)
    command("preprocess", cmd_preprocess, "tokenize the datasets into dataset_prepared_path")
    merge = command("merge-lora", cmd_merge_lora, "merge the trained adapter into a full-precision model")
    merge.add_argument("--adapter", help="adapter folder (default: output_dir)")
    merge.add_argument("--out", help="where to write the merged model (default: output_dir/merged)")
    export = command("export", cmd_export, "merge the adapter and write a GGUF file for llama.cpp / Ollama, with a Modelfile beside it")
    export.add_argument("--format", choices=["gguf"], default="gguf", help="output format (gguf)")
    export.add_argument("--quant", choices=["f16", "q8_0"], default="f16", help="weights in f16 (default) or q8_0")
    export.add_argument("--adapter", help="adapter folder (default: output_dir)")
    export.add_argument("--out", help="GGUF file to write (default: output_dir/gguf/<name>-<quant>.gguf)")
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
    overrides.note_config_key_clashes(parser)
    return parser


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the command's own arguments, config overrides): see `dft_peft.cli.overrides`."""
    return overrides.split_overrides(argv, build_parser())


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line (Python's default adds the source line that issued them)."""
    text = " ".join(str(message).split())
    if category is UserWarning:
        return f"dft-peft: warning: {text}\n"
    return f"warning ({category.__name__}): {text}\n"


def _setup_logging() -> None:
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    warnings.formatwarning = _one_line_warning
    logging.getLogger("dft_peft").setLevel(logging.INFO)
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
    if isinstance(exc, PermissionError) and exc.filename:
        return f"permission denied: {exc.filename}; choose a folder you can write to"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        known, config_overrides = split_overrides(argv)
    except UserError as exc:
        if "--debug" in argv:  # as below: the traceback, then the same line and exit code
            import traceback

            traceback.print_exc()
        print(f"dft-peft: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    args = build_parser().parse_args(known)
    args.overrides = config_overrides
    _setup_logging()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("dft-peft: interrupted; set auto_resume_from_checkpoints: true to continue from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        message = _one_line(exc)
        if message is None:
            raise
        if args.debug:  # the traceback, then the same line and exit code as without --debug
            import traceback

            traceback.print_exc()
        _close_progress_bars()
        print(f"dft-peft: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _close_progress_bars() -> None:
    """A run stopped mid-training leaves the Trainer's progress bar open, its cursor mid-line:
    closing it ends that line, so the error is a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
