"""dft-peft: Dynamic Fine-Tuning (DFT, arXiv 2508.05629) for LoRA/QLoRA.

    import dft_peft
    dft_peft.patch_model(model, loss="dft")   # model(..., labels=...) now returns the DFT loss

The public API is re-exported here; everything else is an implementation detail.
"""

from dft_peft import _moved
from dft_peft.losses import (
    TokenStats,
    available_losses,
    compute_loss_func,
    fused_linear_loss,
    get_loss,
    loss_from_logits,
    patch_model,
    register_loss,
    unpatch_model,
)

__version__ = "0.1.0"

_moved.install()  # v0.2's flat import paths (dft_peft.planner, ...) keep working, with a warning

__all__ = [
    "TokenStats",
    "__version__",
    "available_losses",
    "compute_loss_func",
    "fused_linear_loss",
    "get_loss",
    "loss_from_logits",
    "patch_model",
    "register_loss",
    "unpatch_model",
]
