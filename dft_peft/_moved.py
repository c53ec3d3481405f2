"""Import paths that moved when the package was grouped into rooms, kept working for one more
release: `import dft_peft.planner` still gives the planner, with one FutureWarning naming the
new path (CHANGELOG, "Changed", lists them). Remove them in the release after next.

A finder on `sys.meta_path` rather than a stub file per old name, so the top level of the
package shows only the rooms; the old module object *is* the new one (same functions, same
state), so `monkeypatch.setattr(dft_peft.planner, ...)` still reaches the code that runs.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED = {
    "dft_peft.checkpoints": "dft_peft.training.checkpoints",
    "dft_peft.compare": "dft_peft.cli.compare",
    "dft_peft.distributed": "dft_peft.training.distributed",
    "dft_peft.divergence": "dft_peft.training.divergence",
    "dft_peft.dry_run": "dft_peft.cli.dry_run",
    "dft_peft.hub": "dft_peft.model.hub",
    "dft_peft.hub_datasets": "dft_peft.data.hub",
    "dft_peft.liger": "dft_peft.model.liger",
    "dft_peft.math_eval": "dft_peft.evaluate.math_eval",
    "dft_peft.metrics": "dft_peft.training.metrics",
    "dft_peft.model_shape": "dft_peft.model.shape",
    "dft_peft.modeling": "dft_peft.model.loading",
    "dft_peft.offload": "dft_peft.memory.offload",
    "dft_peft.overrides": "dft_peft.cli.overrides",
    "dft_peft.planner": "dft_peft.memory.planner",
    "dft_peft.prior": "dft_peft.evaluate.prior",
    "dft_peft.probe": "dft_peft.evaluate.probe",
    "dft_peft.run_identity": "dft_peft.training.run_identity",
    "dft_peft.watchdog": "dft_peft.training.watchdog",
    "dft_peft.data.spec": "dft_peft.config.datasets",
    "dft_peft.data.dataset_types": "dft_peft.config.dataset_types",
    "dft_peft.data.templates": "dft_peft.config.chat_templates",
}
# `dft_peft.modeling` was split in three; its names are gathered back for the old path.
SPLIT = {"dft_peft.modeling": ("dft_peft.model.source", "dft_peft.model.adapter")}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"`{spec.name}` moved to `{new}`; the old path keeps working for one more release.",
            FutureWarning,
            stacklevel=2,
        )
        if spec.name not in SPLIT:
            return importlib.import_module(new)
        gathered = ModuleType(spec.name, f"`{spec.name}` of dft-peft 0.2: see {new}")
        for part in (new, *SPLIT[spec.name]):
            for name, value in vars(importlib.import_module(part)).items():
                if not name.startswith("__"):
                    setattr(gathered, name, value)
        return gathered

    def exec_module(self, module: ModuleType) -> None:
        """The module is the new one, already executed."""


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
