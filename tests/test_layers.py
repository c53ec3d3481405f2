"""The package's rooms stay layered and free of import cycles (issue: "The package in rooms").

`lint-imports` checks the layers contract of pyproject.toml; the cycle check below looks inside
every room too (import-linter's layers see only imports between rooms). Imports inside functions
count like any other: a lazy import does not remove a cycle, it hides it. Imports under
`if TYPE_CHECKING:` are left out: they never run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp", reason="import-linter is a dev dependency (pip install -e '.[dev]')")

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dft_peft"
MAX_LINES = 400
MAX_LOOSE_MODULES = 6


def import_cycles(package: str = "dft_peft") -> list[list[str]]:
    """Every set of modules that import each other in a circle (Tarjan's strongly connected
    components over grimp's import graph), smallest first."""
    graph = grimp.build_graph(package, include_external_packages=False, exclude_type_checking_imports=True)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return sorted(found, key=len)


def lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(exe), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def test_no_import_cycle_anywhere():
    assert import_cycles() == []


def test_rooms_form_layers():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout or "0 broken" in done.stdout


@pytest.fixture()
def package_copy(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the package (and its pyproject.toml) that a test may break; found first on
    PYTHONPATH by the subprocess."""
    shutil.copytree(PACKAGE, tmp_path / "dft_peft", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return tmp_path, env


def test_a_lazy_import_that_climbs_a_layer_breaks_the_contract(package_copy):
    """The check can fail: config reaching up into the training recipe, from inside a function."""
    root, env = package_copy
    schema = root / "dft_peft" / "config" / "paths.py"
    schema.write_text(schema.read_text() + "\n\ndef _climb():\n    from dft_peft.train import train\n\n    return train\n")
    done = lint_imports(root, env)
    assert done.returncode != 0
    assert "dft_peft.config is not allowed to import dft_peft.train" in done.stdout


def test_a_cycle_inside_a_room_is_found(package_copy):
    root, env = package_copy
    folders = root / "dft_peft" / "training" / "checkpoint_folders.py"
    folders.write_text(folders.read_text() + "\n\ndef _back():\n    from dft_peft.training import checkpoints\n\n    return checkpoints\n")
    code = f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); from test_layers import import_cycles; print(import_cycles())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dft_peft.training.checkpoint_folders" in done.stdout and "dft_peft.training.checkpoints" in done.stdout


def test_no_module_over_the_line_limit():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_top_level_shows_the_rooms():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= MAX_LOOSE_MODULES, loose


def test_config_knows_every_format_the_data_room_registers():
    from dft_peft.config.dataset_types import BUILTIN_FORMAT_NAMES
    from dft_peft.data.formats import FORMATS

    assert set(FORMATS) == set(BUILTIN_FORMAT_NAMES)


@pytest.mark.parametrize("old, new, name", [
    ("dft_peft.planner", "dft_peft.memory.planner", "check_fits"),
    ("dft_peft.prior", "dft_peft.evaluate.prior", "run_prior_check"),
    ("dft_peft.hub", "dft_peft.model.hub", "fetch"),
    ("dft_peft.offload", "dft_peft.memory.offload", "offload_checkpointed_inputs"),
])
def test_old_import_paths_still_work_with_a_warning(old, new, name):
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        f"assert old is new and getattr(old, {name!r})\n"
        "print([str(w.message) for w in caught if w.category is FutureWarning])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"`{old}` moved to `{new}`" in done.stdout


def test_old_modeling_path_gathers_its_split_parts():
    from dft_peft.model import adapter, loading, source

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import dft_peft.modeling as modeling  # noqa: PLC0415

    assert modeling.load_model is loading.load_model
    assert modeling.resolve_model_path is source.resolve_model_path
    assert modeling.attach_adapter is adapter.attach_adapter
