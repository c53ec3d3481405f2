"""The planner's view of tiled MLP: how many tokens' MLP intermediates exist at once.

Kept apart from planner.py (which stays torch-free at import) and from tiled_mlp.py (the
autograd function): the shard count comes from `tiled_mlp.mlp_shard_count`, the one rule both the
running code and the planner use, imported when a tiled setup is planned.
"""

from __future__ import annotations

import math
from typing import Any


def mlp_shard_tokens(shape: Any, setup: Any) -> int:
    """Tokens whose MLP intermediates (gate, up, act, product) are live at once: all of them, or
    one shard's with tiled_mlp (its forward keeps only the MLP input; its backward recomputes
    and back-propagates one shard at a time)."""
    if not setup.tiled_mlp:
        return setup.tokens
    from dft_peft.memory.tiled_mlp import mlp_shard_count  # imports torch: only for tiled setups

    shards = mlp_shard_count(setup.sequence_len, shape.intermediate, setup.act_bytes, setup.tiled_mlp_num_shards,
                             batch_size=setup.micro_batch_size)
    return math.ceil(setup.sequence_len / shards) * setup.micro_batch_size
