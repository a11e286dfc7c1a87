"""Stage 3: choose a budget of the pool with a selector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ssat.errors import check_finite
from ssat.selection import PoolEmbedding, Selector


def select_pool(selector: Selector, pool: PoolEmbedding, budget: float, seed: int, out_dir: Path) -> dict[str, Any]:
    """Writes selection.npy (pool indices, boundary part first), scores.npy, weights.npy, is_boundary.npy."""
    check_finite(pool.features, "the pool's features")
    check_finite(pool.logits, "the pool's logits")
    selection = selector.select(pool, budget, seed)
    np.save(out_dir / "selection.npy", selection.indices)
    np.save(out_dir / "scores.npy", selection.scores)
    np.save(out_dir / "weights.npy", selection.weights)
    np.save(out_dir / "is_boundary.npy", selection.is_boundary)
    # What training uses: the selection, or the coreset an adaptive selector draws from it during training.
    used = min(len(selection.indices), selector.num_selected(budget, len(pool)))
    return {
        "candidates": int(len(pool)),
        "selected": int(used),
        "boundary": selection.num_boundary,
        "random": int(used - selection.num_boundary),
    }
