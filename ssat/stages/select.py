"""Stage 3: choose a budget of the pool with a selector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ssat.errors import DataError
from ssat.selection import PoolEmbedding, Selector


def check_finite(name: str, array: np.ndarray, batch_size: int = 65536) -> None:
    """A NaN or infinity would silently corrupt every clustering score: stop at the first one."""
    for start in range(0, len(array), batch_size):
        finite = np.isfinite(array[start:start + batch_size])
        if not finite.all():
            row = start + int(np.argwhere(~finite)[0][0])
            raise DataError(f"the pool's {name} contain NaN or infinity (first at row {row}); the selection model "
                            f"diverged or the pool holds broken images")


def select_pool(selector: Selector, pool: PoolEmbedding, budget: float, seed: int, out_dir: Path) -> dict[str, Any]:
    """Writes selection.npy (pool indices, boundary part first), scores.npy, weights.npy, is_boundary.npy."""
    check_finite("features", pool.features)
    check_finite("logits", pool.logits)
    selection = selector.select(pool, budget, seed)
    np.save(out_dir / "selection.npy", selection.indices)
    np.save(out_dir / "scores.npy", selection.scores)
    np.save(out_dir / "weights.npy", selection.weights)
    np.save(out_dir / "is_boundary.npy", selection.is_boundary)
    return {
        "selected": int(len(selection.indices)),
        "boundary": selection.num_boundary,
        "random": int(len(selection.indices) - selection.num_boundary),
    }
