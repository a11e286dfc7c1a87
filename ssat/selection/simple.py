"""The baselines (full pool, uniform) and prediction-confidence selection."""

from __future__ import annotations

import numpy as np

from ssat.selection.base import PoolEmbedding, Selection, Selector


class FullSelector(Selector):
    """The whole pool, whatever the budget: plain robust self-training."""

    def __init__(self, name: str = "full"):
        super().__init__(name, boundary_fraction=0.0)

    def num_selected(self, budget: float, pool_size: int) -> int:
        return pool_size

    def select(self, pool: PoolEmbedding, budget: float, seed: int) -> Selection:
        return Selection.everything(len(pool))


class RandomSelector(Selector):
    """Uniform sampling without replacement: the boundary/random rule with b = 0 (stratified when class_balanced)."""

    def __init__(self, name: str = "random", class_balanced: bool = False):
        super().__init__(name, boundary_fraction=0.0, class_balanced=class_balanced)


def max_softmax(logits: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Largest softmax probability per row, computed in chunks so a memory-mapped pool stays on disk."""
    out = np.empty(len(logits), dtype=np.float64)
    for start in range(0, len(logits), chunk):
        z = np.asarray(logits[start:start + chunk], dtype=np.float64)
        z = z - z.max(axis=1, keepdims=True)
        out[start:start + chunk] = 1.0 / np.exp(z).sum(axis=1)
    return out


class PredictionConfidenceSelector(Selector):
    """PCS: the intermediate model's least confident predictions are the boundary."""

    def score(self, pool: PoolEmbedding, seed: int) -> np.ndarray:
        return max_softmax(pool.logits)
