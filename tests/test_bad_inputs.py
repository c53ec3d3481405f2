"""A corpus of bad inputs, each answered by one clear line and exit code 2.

Every case is something a new user can type: a config value, a data file, a command-line
argument, a folder. Each must give exactly one `dft-peft: error: ...` line on stderr, no
traceback, exit code 2, and the line must name what is wrong (the key, the file, the value).

The CLI runs in-process (`dft_peft.cli`, stderr through capsys) so the whole corpus stays
fast; `validate` is used wherever it is enough, since it must catch everything `train` would.
A handful of cases run the installed script in a subprocess (tests/test_cli.py has more).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tiny_run import alpaca_rows, config_dict, write_jsonl, write_yaml

from cli_helpers import ERROR_PREFIX, model_dir, restore_cli_state  # noqa: F401 - fixtures

from dft_peft.cli import main

INF, NAN = float("inf"), float("nan")
DROP = object()  # remove the key from the working config


class Ctx:
    """What a case builds its input from: a working config, a data file, a scratch folder."""

    def __init__(self, tmp: Path, model: Path) -> None:
        self.tmp, self.model = tmp, model
        self.data = write_jsonl(tmp / "data" / "train.jsonl", alpaca_rows(8))

    def cfg(self, name: str = "run.yml", **changes: Any) -> Path:
        cfg = config_dict(self.model, self.data, self.tmp / "out")
        for key, value in changes.items():
            if value is DROP:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        return write_yaml(self.tmp / name, cfg)

    def dataset(self, entry: dict[str, Any] | None = None, **changes: Any) -> Path:
        """A config whose only dataset entry is `entry` (default: the working one) plus changes."""
        base = {"path": str(self.data), "type": "alpaca"} if entry is None else entry
        return self.cfg(datasets=[{**base, **changes}])

    def text(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def rows(self, name: str, rows: list[Any]) -> Path:
        return self.text(name, "".join(json.dumps(r) + "\n" for r in rows))

    def folder(self, name: str, *files: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        for f in files:
            (path / f).write_text("{}")
        return path


@dataclass
class Case:
    argv: Callable[[Ctx], list[Any]]  # the command line, built from the context
    needles: tuple[str, ...]  # what the one line must contain ("{tmp}" = the scratch folder)


CASES: dict[str, Case] = {}


def case(name: str, needles: tuple[str, ...] | str, command: str = "validate", extra: tuple = ()):
    """Register `fn(ctx) -> config path` (or a full argv list) as a corpus case."""

    def register(fn):
        def argv(ctx: Ctx) -> list[Any]:
            made = fn(ctx)
            return made if isinstance(made, list) else [command, made, *extra]

        assert name not in CASES, name
        CASES[name] = Case(argv, (needles,) if isinstance(needles, str) else tuple(needles))
        return fn

    return register


def value_case(name: str, needles, **changes):
    case(name, needles)(lambda ctx: ctx.cfg(**changes))


def override_case(name: str, needles, *overrides: str):
    case(name, needles)(lambda ctx: ["validate", ctx.cfg(), *overrides])


# ----------------------------------------------------------------------------- non-finite numbers

for key in ("learning_rate", "lora_dropout", "weight_decay", "num_epochs", "max_grad_norm", "adam_epsilon",
            "warmup_ratio", "val_set_size"):
    value_case(f"inf_{key}", key, **{key: INF})
value_case("nan_learning_rate", "learning_rate", learning_rate=NAN)
value_case("minus_inf_learning_rate", "learning_rate", learning_rate=-INF)
value_case("nan_adam_beta1", "adam_beta1", adam_beta1=NAN)
value_case("nan_dft_alpha", "dft_alpha", dft_alpha=NAN)
value_case("inf_power_q", "power_q", loss="power", power_q=INF)
value_case("nan_asft_lambda", "asft_lambda", loss="asft", asft_lambda=NAN)
case("nan_min_weight", "min_weight")(lambda ctx: ctx.dataset(weight_field="score", min_weight=NAN))

# ----------------------------------------------------------------------------- wrong types

for key in ("lora_r", "lora_alpha", "micro_batch_size", "max_steps", "gradient_accumulation_steps", "sequence_len",
            "warmup_steps", "logging_steps", "save_total_limit"):
    value_case(f"bool_{key}", key, **{key: True})
value_case("bool_learning_rate", "learning_rate", learning_rate=True)
value_case("bool_lora_dropout", "lora_dropout", lora_dropout=False)
value_case("text_lora_r", ("lora_r", "eight"), lora_r="eight")
value_case("fraction_lora_r", ("lora_r", "8.5"), lora_r=8.5)
value_case("text_learning_rate", ("learning_rate", "fast"), learning_rate="fast")
value_case("text_seed", ("seed", "abc"), seed="abc")
value_case("bool_text_strict", "strict", strict="yes")
value_case("bf16_maybe", ("bf16", "maybe"), bf16="maybe")
value_case("save_steps_bool", "save_steps", save_steps=True)
value_case("target_modules_number", "lora_target_modules", lora_target_modules=5)
value_case("datasets_string", "datasets", datasets="data.jsonl")
value_case("dataset_entry_string", "datasets", datasets=["data.jsonl"])
value_case("special_tokens_string", "special_tokens", special_tokens="x")
value_case("roles_to_train_number", "roles_to_train", datasets=[{"path": "d.jsonl", "type": "chat_template", "roles_to_train": 5}])

# ----------------------------------------------------------------------------- out of range, wrong choices

value_case("seed_minus_one", ("seed", "-1"), seed=-1)
value_case("seed_too_large", "seed", seed=2**40)
value_case("empty_loss", "loss", loss=None)
value_case("blank_loss", "loss", loss="")
value_case("lora_r_zero", "lora_r", lora_r=0)
value_case("learning_rate_zero", "learning_rate", learning_rate=0)
value_case("learning_rate_negative", "learning_rate", learning_rate=-1e-4)
value_case("lora_dropout_one", "lora_dropout", lora_dropout=1.0)
value_case("micro_batch_zero", "micro_batch_size", micro_batch_size=0)
value_case("sequence_len_tiny", "sequence_len", sequence_len=4)
value_case("max_steps_zero", "max_steps", max_steps=0)
value_case("warmup_ratio_two", "warmup_ratio", warmup_ratio=2)
value_case("save_steps_negative", "save_steps", save_steps=-1)
value_case("dft_alpha_negative", ("dft_alpha", "-0.1"), dft_alpha=-0.1)
value_case("power_q_zero", "power_q", loss="power", power_q=0)
value_case("optimizer_sgd", ("optimizer", "sgd"), optimizer="sgd")
value_case("scheduler_typo", ("lr_scheduler", "cosin"), lr_scheduler="cosin")
value_case("adapter_full", ("adapter", "full"), adapter="full")
value_case("attn_flash", ("attn_implementation", "flash"), attn_implementation="flash")
value_case("report_to_neptune", ("report_to", "neptune"), report_to="neptune")
value_case("chat_template_typo", ("chatmll", "chatml"), chat_template="chatmll")
value_case("loss_typo", ("dtf", "dft"), loss="dtf")
value_case("gradient_checkpointing_text", ("gradient_checkpointing", "sometimes"), gradient_checkpointing="sometimes")
value_case("legacy_flash_attention_text", "flash_attention", flash_attention="yes")
value_case("bnb_kwargs_unknown", "bnb_config_kwargs.foo", bnb_config_kwargs={"foo": 1})

# ----------------------------------------------------------------------------- keys and combinations

value_case("adapter_missing", "adapter", adapter=DROP)
value_case("qlora_without_4bit", ("qlora", "load_in_4bit"), adapter="qlora")
value_case("4bit_and_8bit", ("load_in_4bit", "load_in_8bit"), load_in_4bit=True, load_in_8bit=True)
value_case("no_lora_target", ("lora_target_linear", "lora_target_modules"), lora_target_linear=False)
value_case("warmup_both", ("warmup_steps", "warmup_ratio"), warmup_steps=2, warmup_ratio=0.1)
value_case("save_both", ("save_steps", "saves_per_epoch"), saves_per_epoch=2)
value_case("eval_steps_without_eval", "eval_steps", eval_steps=2)
value_case("jinja_without_template", "chat_template_jinja", chat_template="jinja")
value_case("datasets_empty", "datasets", datasets=[])
value_case("datasets_missing", "datasets", datasets=DROP)
value_case("base_model_missing", "base_model", base_model=DROP)
value_case("learning_rate_missing", "learning_rate", learning_rate=DROP)
value_case("typo_key", ("lora_rr", "lora_r"), lora_rr=8)
value_case("unknown_key", "foo_bar_baz", foo_bar_baz=1)
value_case("unsupported_axolotl_key", "lisa_n_layers", lisa_n_layers=4)
value_case("other_objectives_param", ("asft_lambda", "asft"), asft_lambda=0.1)
value_case("special_tokens_unknown", "foo_token", special_tokens={"foo_token": "x"})
case("dataset_key_pth", ("pth", "path"))(lambda ctx: ctx.cfg(datasets=[{"pth": str(ctx.data), "type": "alpaca"}]))
case("dataset_key_tpye", ("tpye", "type"))(lambda ctx: ctx.dataset(tpye="alpaca"))
case("dataset_type_typo", ("alpacaa", "alpaca"))(lambda ctx: ctx.dataset(type="alpacaa"))
case("dataset_ds_type_xml", ("ds_type", "xml"))(lambda ctx: ctx.dataset(ds_type="xml"))
case("min_weight_without_field", ("min_weight", "weight_field"))(lambda ctx: ctx.dataset(min_weight=0.5))
case("test_datasets_and_val", ("test_datasets", "val_set_size"))(
    lambda ctx: ctx.cfg(val_set_size=0.25, test_datasets=[{"path": str(ctx.data), "type": "alpaca"}])
)

# ----------------------------------------------------------------------------- the YAML file itself

case("yaml_top_level_list", ("bad.yml", "top level"))(lambda ctx: ctx.text("bad.yml", "- a\n- b\n"))
case("yaml_empty", ("empty.yml", "empty"))(lambda ctx: ctx.text("empty.yml", ""))
case("yaml_syntax", ("syntax.yml", "YAML"))(lambda ctx: ctx.text("syntax.yml", "base_model: [a\nlora_r: 8\n"))
case("yaml_duplicate_key", ("lora_r", "twice"))(lambda ctx: ctx.text("dup.yml", ctx.cfg().read_text() + "lora_r: 16\n"))
case("yaml_not_utf8", "latin.yml")(lambda ctx: ctx.text("latin.yml", b"base_model: caf\xe9\n"))
case("config_is_folder", "a-folder")(lambda ctx: ctx.folder("a-folder"))
case("config_missing", "nope.yml")(lambda ctx: ctx.tmp / "nope.yml")
case("yaml_key_not_text", "123")(lambda ctx: ctx.text("numkey.yml", ctx.cfg().read_text() + "123: x\n"))

# ----------------------------------------------------------------------------- command-line overrides

override_case("override_flag_without_value", ("--lora_r", "lora_r"), "--lora_r")
override_case("override_empty_value", "--learning_rate", "--learning_rate=")
override_case("override_text_for_int", ("--lora_r", "abc"), "--lora_r=abc")
override_case("override_inf", "--learning_rate", "--learning_rate=.inf")
override_case("override_loss_typo", ("--loss", "dtf"), "--loss=dtf")
override_case("override_unknown_key", ("--lerning_rate", "learning_rate"), "--lerning_rate=1e-3")
override_case("override_seed_negative", ("--seed", "-1"), "--seed=-1")
override_case("override_max_steps_zero", "--max_steps", "--max_steps=0")
override_case("override_datasets_text", "--datasets", "--datasets=foo")
override_case("override_bad_yaml", "--lora_r", "--lora_r=[1")
override_case("override_no_key", "=5", "--=5")
override_case("override_output_dir_flag", "--output_dir", "--output_dir")
override_case("override_adapter_choice", ("--adapter", "full"), "--adapter=full")

# ----------------------------------------------------------------------------- command-line arguments

case("cli_no_command", "command")(lambda ctx: [])
case("cli_unknown_command", ("trian", "train"))(lambda ctx: ["trian", ctx.cfg()])
case("cli_no_config", "config")(lambda ctx: ["train"])
case("cli_generate_without_prompt", "--prompt")(lambda ctx: ["generate", ctx.cfg()])
case("cli_max_new_tokens_text", ("--max-new-tokens", "abc"))(
    lambda ctx: ["generate", ctx.cfg(), "--prompt", "hi", "--max-new-tokens", "abc"]
)
case("cli_eval_samples_text", ("--samples", "x"))(lambda ctx: ["eval", ctx.cfg(), "--dataset", ctx.data, "--samples", "x"])
case("cli_generate_missing_adapter", "no-adapter-here")(
    lambda ctx: ["generate", ctx.cfg(), "--prompt", "hi", "--adapter", ctx.tmp / "no-adapter-here"]
)
case("cli_merge_missing_adapter", "no-adapter-here")(lambda ctx: ["merge-lora", ctx.cfg(), "--adapter", ctx.tmp / "no-adapter-here"])
case("cli_eval_missing_dataset", "missing-problems.jsonl")(
    lambda ctx: ["eval", ctx.cfg(), "--dataset", ctx.tmp / "missing-problems.jsonl", "--no-base", "--adapter", ctx.tmp]
)
case("cli_debug_still_exit_2", ("dtf",))(lambda ctx: ["train", ctx.cfg(loss="dtf"), "--debug"])

# ----------------------------------------------------------------------------- paths and folders

case("base_model_missing_folder", "missing-model")(lambda ctx: ctx.cfg(base_model=str(ctx.tmp / "missing-model")))
case("base_model_relative_missing", "missing-model")(lambda ctx: ctx.cfg(base_model="./missing-model"))
case("base_model_is_a_file", ("base_model", "train.jsonl"))(lambda ctx: ctx.cfg(base_model=str(ctx.data)))
case("base_model_folder_without_config", ("base_model", "config.json"))(
    lambda ctx: ctx.cfg(base_model=str(ctx.folder("empty-model")))
)
case("base_model_missing_gguf", "missing.gguf")(lambda ctx: ctx.cfg(base_model=str(ctx.tmp / "missing.gguf")))
case("tokenizer_config_missing", ("tokenizer_config", "missing-tok"))(
    lambda ctx: ctx.cfg(tokenizer_config=str(ctx.tmp / "missing-tok"))
)
case("tokenizer_config_is_a_file", ("tokenizer_config", "train.jsonl"))(lambda ctx: ctx.cfg(tokenizer_config=str(ctx.data)))
case("base_model_config_missing", ("base_model_config", "missing-cfg"))(
    lambda ctx: ctx.cfg(base_model_config=str(ctx.tmp / "missing-cfg"))
)
case("lora_model_dir_missing", ("lora_model_dir", "missing-adapter"))(
    lambda ctx: ctx.cfg(lora_model_dir=str(ctx.tmp / "missing-adapter"))
)
case("lora_model_dir_is_a_file", ("lora_model_dir", "train.jsonl"))(lambda ctx: ctx.cfg(lora_model_dir=str(ctx.data)))
case("lora_model_dir_without_adapter", ("lora_model_dir", "adapter_config.json"))(
    lambda ctx: ctx.cfg(lora_model_dir=str(ctx.folder("not-an-adapter")))
)
case("output_dir_is_a_file", ("output_dir", "train.jsonl"))(lambda ctx: ctx.cfg(output_dir=str(ctx.data)))
case("output_dir_under_a_file", ("output_dir", "train.jsonl"))(lambda ctx: ctx.cfg(output_dir=str(ctx.data / "sub")))
case("output_dir_empty", "output_dir")(lambda ctx: ctx.cfg(output_dir=""))
case("prepared_path_is_a_file", ("dataset_prepared_path", "train.jsonl"))(
    lambda ctx: ctx.cfg(dataset_prepared_path=str(ctx.data))
)
case("prepared_path_under_a_file", ("dataset_prepared_path", "train.jsonl"))(
    lambda ctx: ctx.cfg(dataset_prepared_path=str(ctx.data / "prepared"))
)
case("prepared_path_empty", "dataset_prepared_path")(lambda ctx: ctx.cfg(dataset_prepared_path=""))
case("resume_nowhere", ("resume_from_checkpoint", "checkpoint-7"))(
    lambda ctx: ctx.cfg(resume_from_checkpoint=str(ctx.tmp / "out" / "checkpoint-7"))
)
case("resume_incomplete", ("resume_from_checkpoint", "checkpoint-2"))(
    lambda ctx: ctx.cfg(resume_from_checkpoint=str(ctx.folder("out/checkpoint-2", "config.json")))
)
case("resume_is_a_file", ("resume_from_checkpoint", "train.jsonl"))(lambda ctx: ctx.cfg(resume_from_checkpoint=str(ctx.data)))
case("train_output_dir_is_a_file", ("output_dir", "train.jsonl"), command="train")(
    lambda ctx: ctx.cfg(output_dir=str(ctx.data))
)

# ----------------------------------------------------------------------------- dataset files

case("dataset_path_missing", "missing.jsonl")(lambda ctx: ctx.dataset(path=str(ctx.tmp / "missing.jsonl")))
case("dataset_folder_without_files", "no-data")(lambda ctx: ctx.dataset(path=str(ctx.folder("no-data"))))
case("dataset_data_files_missing", "nothere.jsonl")(lambda ctx: ctx.dataset(path=str(ctx.tmp / "data"), data_files="nothere.jsonl"))
case("dataset_unknown_extension", ("notes.txt", "ds_type"))(lambda ctx: ctx.dataset(path=str(ctx.text("notes.txt", "hello\n"))))
case("dataset_empty_file", ("empty.jsonl", "empty"))(lambda ctx: ctx.dataset(path=str(ctx.text("empty.jsonl", ""))))
case("dataset_blank_lines", ("blank.jsonl", "blank"))(lambda ctx: ctx.dataset(path=str(ctx.text("blank.jsonl", "\n\n  \n"))))
case("dataset_malformed_line", ("broken.jsonl", "line 3"))(
    lambda ctx: ctx.dataset(path=str(ctx.text("broken.jsonl", ctx.data.read_text().replace("\n", "\n{oops\n", 2).replace("\n{oops\n", "\n", 1))))
)
case("dataset_not_utf8_line", ("latin.jsonl", "line 2"))(
    lambda ctx: ctx.dataset(path=str(ctx.text("latin.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')))
)
case("dataset_line_is_a_list", ("list.jsonl", "line 2"))(
    lambda ctx: ctx.dataset(path=str(ctx.text("list.jsonl", '{"instruction": "a", "output": "b"}\n[1, 2]\n')))
)
case("dataset_json_truncated", "trunc.json")(lambda ctx: ctx.dataset(path=str(ctx.text("trunc.json", '[{"instruction": "a", "output": "b"}, {"instr'))))
case("dataset_empty_csv", "empty.csv")(lambda ctx: ctx.dataset(path=str(ctx.text("empty.csv", ""))))
case("dataset_mixed_types", ("mixed", "ds_type"))(
    lambda ctx: ctx.dataset(path=str(ctx.folder("mixed", "a.jsonl", "b.csv")))
)
case("row_missing_instruction", ("noinst.jsonl", "row 2", "instruction"))(
    lambda ctx: ctx.dataset(path=str(ctx.rows("noinst.jsonl", [{"instruction": "a", "output": "b"}, {"output": "b"}])))
)
case("rows_too_long", "sequence_len")(lambda ctx: ctx.cfg(sequence_len=8))


def _weighted(ctx: Ctx, weight: Any, name: str) -> Path:
    rows = [dict(r, score=1.0) for r in alpaca_rows(4)]
    rows[1]["score"] = weight
    path = ctx.text(name, "".join(json.dumps(r) + "\n" for r in rows))
    return ctx.dataset(path=str(path), weight_field="score")


case("weight_infinity", ("w_inf.jsonl", "row 2", "score"))(lambda ctx: _weighted(ctx, INF, "w_inf.jsonl"))
case("weight_beyond_float32", ("w_big.jsonl", "row 2", "score"))(lambda ctx: _weighted(ctx, 1e39, "w_big.jsonl"))
case("weight_nan", ("w_nan.jsonl", "row 2", "score"))(lambda ctx: _weighted(ctx, NAN, "w_nan.jsonl"))
case("weight_negative", ("w_neg.jsonl", "row 2", "score", "-1"))(lambda ctx: _weighted(ctx, -1.0, "w_neg.jsonl"))
case("weight_text", ("w_txt.jsonl", "row 2", "score"))(lambda ctx: _weighted(ctx, "high", "w_txt.jsonl"))
case("weight_missing", ("w_none.jsonl", "row 2", "score"))(lambda ctx: _weighted(ctx, None, "w_none.jsonl"))


def _chat(ctx: Ctx, name: str, messages: list[dict[str, Any]], **entry: Any) -> Path:
    path = ctx.rows(name, [{"messages": messages}] * 3)
    return ctx.dataset({"path": str(path), "type": "chat_template", "chat_template": "chatml"}, **entry)


_TURNS = [{"role": "user", "content": "Tom has 3 apples."}, {"role": "assistant", "content": "He has 3."}]
case("chat_roles_match_nothing", ("roles.jsonl", "bot", "person"))(
    lambda ctx: _chat(ctx, "roles.jsonl", [{"role": "person", "content": "hi"}, {"role": "bot", "content": "hello"}])
)
case("chat_roles_to_train_typo", ("asistant", "assistant"))(
    lambda ctx: _chat(ctx, "typo.jsonl", _TURNS, roles_to_train=["asistant"])
)
case("chat_missing_messages", ("nomsg.jsonl", "messages"))(
    lambda ctx: ctx.dataset({"path": str(ctx.rows("nomsg.jsonl", [{"conversation": _TURNS}])), "type": "chat_template", "chat_template": "chatml"})
)
case("chat_message_without_content", ("nocontent.jsonl", "content"))(
    lambda ctx: _chat(ctx, "nocontent.jsonl", [{"role": "user"}, {"role": "assistant", "content": "x"}])
)
case("chat_unknown_template_in_entry", "notatemplate")(lambda ctx: _chat(ctx, "tmpl.jsonl", _TURNS, chat_template="notatemplate"))
case("val_set_size_too_many_rows", "val_set_size")(lambda ctx: ctx.cfg(val_set_size=100))

# ----------------------------------------------------------------------------- the model

case("sequence_len_beyond_positions", ("sequence_len", "256"))(lambda ctx: ctx.cfg(sequence_len=4096))
case("target_module_missing", "nonexistent_proj")(lambda ctx: ctx.cfg(lora_target_linear=False, lora_target_modules=["q_proj", "nonexistent_proj"]))
case("target_modules_none_match", "zzz_proj")(lambda ctx: ctx.cfg(lora_target_linear=False, lora_target_modules=["zzz_proj"]))
case("fp16_on_cpu", "fp16", command="train")(lambda ctx: ctx.cfg(fp16=True))  # validate only notes it


@case("needs_trust_remote_code", "trust_remote_code")
def _remote_code_model(ctx: Ctx) -> Path:
    folder = ctx.folder("remote-model")
    config = json.loads((ctx.model / "config.json").read_text())
    config.update(model_type="my_custom_llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                        "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text("raise RuntimeError('remote code ran')\n")
    for f in ctx.model.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (folder / f.name).write_bytes(f.read_bytes())
    return ctx.cfg(base_model=str(folder))


# ----------------------------------------------------------------------------- the runner


def run_cli(capsys, argv: list[Any]) -> tuple[Any, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - a traceback is a failure of the case
        code = f"raised {type(exc).__name__}: {exc}"
    _, err = capsys.readouterr()
    return code, err


def check_one_line(code: Any, err: str, needles: tuple[str, ...]) -> str | None:
    """None when the answer is right, else what is wrong with it."""
    if code != 2:
        return f"exit {code!r}, stderr {err[-300:]!r}"
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("Traceback", "  "))]
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    if len(errors) != 1 or len(lines) != 1:
        return f"not one error line: {err[-400:]!r}"
    missing = [n for n in needles if n not in errors[0]]
    if missing:
        return f"line lacks {missing}: {errors[0]}"
    return None


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_line(name, model_dir, tmp_path, capsys):
    ctx = Ctx(tmp_path, model_dir)
    argv = CASES[name].argv(ctx)
    code, err = run_cli(capsys, argv)
    problem = check_one_line(code, err, CASES[name].needles)
    if name == "cli_debug_still_exit_2":
        assert code == 2 and "Traceback" in err, err  # --debug: the traceback, and still exit 2
        return
    assert "Traceback" not in err, err
    assert problem is None, problem


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 120, len(CASES)


def tally(model_dir: Path, tmp_root: Path, capsys) -> tuple[int, list[str]]:
    """(passing, failing names) over the whole corpus: the before/after number in the notes."""
    passing, failing = 0, []
    for i, (name, c) in enumerate(sorted(CASES.items())):
        ctx = Ctx(tmp_root / f"c{i}", model_dir)
        code, err = run_cli(capsys, c.argv(ctx))
        if name == "cli_debug_still_exit_2":
            ok = code == 2 and "Traceback" in err
        else:
            ok = check_one_line(code, err, c.needles) is None and "Traceback" not in err
        if ok:
            passing += 1
        else:
            failing.append(name)
    return passing, failing


@pytest.mark.skipif(not os.environ.get("DFT_PEFT_TALLY"), reason="set DFT_PEFT_TALLY=1 to print the corpus tally")
def test_print_tally(model_dir, tmp_path, capsys):
    passing, failing = tally(model_dir, tmp_path, capsys)
    with capsys.disabled():
        print(f"\ncorpus: {passing}/{len(CASES)} pass; failing: {', '.join(failing)}")


# ----------------------------------------------------------------------------- accepted, with one warning


@pytest.mark.parametrize(
    "changes, needles",
    [
        (dict(load_in_4bit=True), ("load_in_4bit", "adapter: lora", "QLoRA")),
        (dict(learning_rate=2.0), ("learning_rate 2", "adapter is noise", "exponent")),
        (dict(learning_rate=2e-9), ("learning_rate 2e-09",)),
    ],
    ids=["4bit_lora_is_qlora", "learning_rate_huge", "learning_rate_tiny"],
)
def test_values_axolotl_accepts_get_one_warning_line(changes, needles, model_dir, tmp_path, caplog):
    """Axolotl runs these, so they are not errors; each is one warning naming the key (a log line,
    or a Python warning where it must reach API and notebook users too: the destructive rate)."""
    import logging
    import warnings

    from dft_peft.config import load_config

    with caplog.at_level(logging.WARNING, logger="dft_peft.config"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(Ctx(tmp_path, model_dir).cfg(**changes))
    lines = [r.getMessage() for r in caplog.records if r.name == "dft_peft.config"]
    lines += [str(w.message) for w in caught if w.category is UserWarning]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert all(n in lines[0] for n in needles), lines[0]


def test_a_good_config_gets_no_warning(model_dir, tmp_path, caplog):
    import logging

    from dft_peft.config import load_config

    with caplog.at_level(logging.WARNING, logger="dft_peft.config"):
        load_config(Ctx(tmp_path, model_dir).cfg())
    assert not [r for r in caplog.records if r.name == "dft_peft.config"]


def test_script_bad_input_is_one_stderr_line(model_dir, tmp_path):
    """The installed script, in a subprocess: what a user's terminal shows for a corpus case."""
    import shutil
    import subprocess
    import sys

    script = Path(sys.executable).with_name("dft-peft")
    if not script.is_file():
        script = shutil.which("dft-peft")
        if script is None:
            pytest.skip("the dft-peft console script is not installed (pip install -e .)")
    ctx = Ctx(tmp_path, model_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    for build, needle in (  # built one at a time: each writes the same run.yml
        (lambda: ["validate", ctx.cfg(learning_rate=INF)], "learning_rate"),
        (lambda: ["trian", ctx.cfg()], "Did you mean `train`?"),
    ):
        proc = subprocess.run([str(script), *map(str, build())], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX) and needle in lines[0], proc.stderr
