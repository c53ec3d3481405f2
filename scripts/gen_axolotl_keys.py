#!/usr/bin/env python
"""Write Axolotl's own key names, chat templates and dataset types into dft-peft's data files.

Run it with the Python of the Axolotl virtual environment (scripts/axolotl-venv.sh):

    .venv-axolotl/bin/python scripts/gen_axolotl_keys.py           # rewrite the files
    .venv-axolotl/bin/python scripts/gen_axolotl_keys.py --check   # exit 1 if they are stale

It reads, from the installed Axolotl (never from a hand-kept list):

* the top-level config keys: the fields of `axolotl.utils.schemas.config.AxolotlInputConfig`,
  their aliases and defaults, and the class of its schema that declares each one;
* the keys that Axolotl's bundled plugins (`axolotl.integrations.*`) add: each plugin's
  `get_input_args()` names a pydantic model whose fields join the config when the plugin is
  listed under `plugins:` (found by reading the plugin sources, so a plugin whose optional
  dependency is missing here still counts);
* the dataset-entry keys of its dataset models (`SFTDataset`, `DPODataset`, `KTODataset`, ...);
* the chat template names (the `ChatTemplate` enum) and the Jinja text of the named templates
  (`axolotl.utils.chat_templates._CHAT_TEMPLATES`, Apache-2.0, Axolotl AI);
* the dataset `type:` names: `axolotl.prompt_strategies` modules and their `load`/`load_*`
  functions, the built-in prompt-style handlers (`alpaca`, `alpaca:phi`, ...) and the preference
  (DPO/KTO/ORPO) and EBFT transforms that Axolotl only uses with `rl:`.

Outputs (data, not code; dft_peft/config/axolotl_keys.py loads the first and sorts its keys):

* dft_peft/config/axolotl_keys.json
* dft_peft/config/axolotl_chat_templates.json
"""

from __future__ import annotations

import argparse
import ast
import enum
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import pkgutil
import sys
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
KEYS_FILE = REPO / "dft_peft" / "config" / "axolotl_keys.json"
TEMPLATES_FILE = REPO / "dft_peft" / "config" / "axolotl_chat_templates.json"

# Axolotl's dataset models: which `datasets:` entries each describes.
DATASET_MODELS = {
    "SFTDataset": "supervised fine-tuning (what dft-peft trains)",
    "PretrainingDataset": "pretraining_dataset (streamed raw text)",
    "DPODataset": "rl: dpo / ipo / simpo preference pairs",
    "KTODataset": "rl: kto",
    "StepwiseSupervisedDataset": "process reward models",
    "SyntheticDataset": "type: _synthetic (benchmarking)",
}
PREFERENCE_PACKAGES = ("dpo", "kto", "orpo", "ebft")


def quiet() -> None:
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


def plain(value: Any) -> Any:
    """A field default as JSON: enums by value, anything exotic by its repr."""
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return repr(value)


def field_default(field: Any) -> Any:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        try:
            return plain(field.default_factory())
        except TypeError:  # a factory that wants the validated data
            return None
    return None if field.default is PydanticUndefined else plain(field.default)


def declaring_class(model: type, name: str) -> str:
    """The class in the schema's MRO that declares `name` (LoraConfig, HyperparametersConfig...)."""
    for cls in model.__mro__:
        if name in getattr(cls, "__annotations__", {}):
            return cls.__name__
    return model.__name__


def model_keys(model: type) -> dict[str, dict[str, Any]]:
    out = {}
    for name, field in sorted(model.model_fields.items()):
        entry: dict[str, Any] = {"default": field_default(field), "in": declaring_class(model, name)}
        if field.alias and field.alias != name:
            entry["alias"] = field.alias
        out[name] = entry
    return out


# ----------------------------------------------------------------------------- plugins


def _returned_string(fn: ast.FunctionDef) -> str | None:
    for node in ast.walk(fn):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant):
            if isinstance(node.value.value, str):
                return node.value.value
    return None


def plugin_declarations() -> dict[str, str | None]:
    """`axolotl.integrations.<pkg>.<Plugin>` -> its `get_input_args()` dotted path (or None).

    Read from the sources with `ast`: importing a plugin can fail when its optional dependency
    (llmcompressor, ...) is absent, but its keys are real Axolotl keys all the same.
    """
    import axolotl.integrations as integrations

    root = Path(integrations.__file__).parent
    found: dict[str, str | None] = {}
    for pkg in sorted(p for p in root.iterdir() if (p / "__init__.py").is_file()):
        for source in sorted(pkg.rglob("*.py")):
            tree = ast.parse(source.read_text(encoding="utf-8"))
            for node in tree.body:
                if not isinstance(node, ast.ClassDef):
                    continue
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if "BasePlugin" not in bases:
                    continue
                args = None
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "get_input_args":
                        args = _returned_string(item)
                found[f"axolotl.integrations.{pkg.name}.{node.name}"] = args
    return found


def import_model(dotted: str) -> type:
    """Import a pydantic model by dotted path; load its file alone if its package cannot import."""
    module_name, cls_name = dotted.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except ImportError:
        pass
    spec = importlib.util.find_spec("axolotl")
    assert spec is not None and spec.origin
    base = Path(spec.origin).parent.parent
    parts = module_name.split(".")
    for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            loader_spec = importlib.util.spec_from_file_location(f"_gen_{cls_name}", candidate)
            assert loader_spec and loader_spec.loader
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
            return getattr(module, cls_name)
    raise ImportError(f"cannot import {dotted}")


def plugins() -> dict[str, dict[str, Any]]:
    out = {}
    for path, args in plugin_declarations().items():
        entry: dict[str, Any] = {"args": args, "keys": {}}
        if args:
            entry["keys"] = model_keys(import_model(args))
        out[path] = entry
    return out


# ----------------------------------------------------------------------------- dataset types


def _takes_tokenizer(obj: Any) -> bool:
    try:
        params = list(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "tokenizer"


def sft_strategy_types() -> dict[str, str]:
    """`type:` names that `axolotl.prompt_strategies.load` resolves for supervised data."""
    import axolotl.prompt_strategies as strategies

    types: dict[str, str] = {}
    for info in pkgutil.iter_modules(strategies.__path__):
        if info.name in PREFERENCE_PACKAGES or info.name == "bradley_terry":
            continue
        try:
            module = importlib.import_module(f"axolotl.prompt_strategies.{info.name}")
        except ImportError:
            continue
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if not (attr == "load" or attr.startswith("load_")) or not callable(obj):
                continue
            if not _takes_tokenizer(obj):
                continue
            name = info.name if attr == "load" else f"{info.name}.{attr}"
            types[name] = f"axolotl.prompt_strategies.{info.name}.{attr}"
    types["messages"] = "axolotl.prompt_strategies.messages.load"
    from axolotl.prompt_strategies import bradley_terry

    for info in pkgutil.iter_modules(bradley_terry.__path__):
        types[f"bradley_terry.{info.name}"] = f"axolotl.prompt_strategies.bradley_terry.{info.name}"
    return types


def handler_types() -> dict[str, str]:
    """Built-in prompters chosen by the part before `:`, styled by the part after."""
    from axolotl.prompters import PromptStyle
    from axolotl.utils.data.wrappers import DATASET_HANDLERS

    types = {}
    for base in sorted(DATASET_HANDLERS):
        types[base] = f"axolotl.utils.data.wrappers.DATASET_HANDLERS[{base!r}]"
        for style in PromptStyle:
            types[f"{base}:{style.value}"] = f"{types[base]} with PromptStyle.{style.name}"
    return types


def preference_types() -> dict[str, str]:
    """DPO/KTO/ORPO/EBFT transforms (`chat_template.default`, `llama3.ultra`, ...): `rl:` only."""
    types: dict[str, str] = {}
    for package in PREFERENCE_PACKAGES:
        try:
            pkg = importlib.import_module(f"axolotl.prompt_strategies.{package}")
        except ImportError:
            continue
        for info in pkgutil.iter_modules(pkg.__path__):
            try:
                module = importlib.import_module(f"{pkg.__name__}.{info.name}")
            except ImportError:
                continue
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or not inspect.isfunction(obj) or obj.__module__ != module.__name__:
                    continue
                params = list(inspect.signature(obj).parameters)
                if not params or params[0] not in ("cfg", "tokenizer"):
                    continue
                name = f"{info.name}.{attr}"
                types.setdefault(name, [])  # type: ignore[arg-type]
                types[name].append(f"rl: {package}")  # type: ignore[union-attr]
    return {k: ", ".join(v) for k, v in sorted(types.items())}  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- assemble


def collect() -> tuple[dict[str, Any], dict[str, Any]]:
    quiet()
    from axolotl.utils.chat_templates import _CHAT_TEMPLATES
    from axolotl.utils.schemas import datasets as ds_schemas
    from axolotl.utils.schemas.config import AxolotlInputConfig
    from axolotl.utils.schemas.enums import ChatTemplate

    version = importlib.metadata.version("axolotl")
    generator = "scripts/gen_axolotl_keys.py"
    keys = {
        "axolotl_version": version,
        "generated_by": generator,
        "config_keys": model_keys(AxolotlInputConfig),
        "plugins": plugins(),
        "dataset_keys": {
            name: {"used_for": why, "keys": model_keys(getattr(ds_schemas, name))}
            for name, why in DATASET_MODELS.items()
        },
        "chat_templates": sorted(t.value for t in ChatTemplate),
        "chat_template_fallback_prefix": "tokenizer_default_fallback_",
        "dataset_types": {
            "strategies": sft_strategy_types(),
            "handlers": handler_types(),
            "preference": preference_types(),
        },
    }
    templates = {
        "axolotl_version": version,
        "generated_by": generator,
        "license": "Apache-2.0; the templates are copied from Axolotl "
        "(axolotl/utils/chat_templates/templates/*.jinja, Copyright Axolotl AI), "
        "which took many of them from the models' own tokenizer_config.json",
        "templates": dict(sorted(_CHAT_TEMPLATES.items())),
    }
    return keys, templates


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=False, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in files differ")
    parser.add_argument("--out-dir", type=Path, help="write both files here instead of the package")
    args = parser.parse_args(argv)
    keys, templates = collect()
    targets = [(KEYS_FILE, render(keys)), (TEMPLATES_FILE, render(templates))]
    if args.out_dir:
        targets = [(args.out_dir / path.name, text) for path, text in targets]
    stale = []
    for path, text in targets:
        if args.check:
            current = path.read_text(encoding="utf-8") if path.is_file() else ""
            if current != text:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} (axolotl {keys['axolotl_version']})")
    if stale:
        names = ", ".join(str(p.relative_to(REPO)) for p in stale)
        print(
            f"{names} disagree with the installed axolotl {keys['axolotl_version']}; rerun "
            f"{sys.executable} scripts/gen_axolotl_keys.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
