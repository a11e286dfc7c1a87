"""What a selector reads and returns, apart from the selectors: the artifacts (ssat/artifacts.py) store them, so
the stages that only load a selection do not depend on the selectors' code."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PoolEmbedding:
    """What the selection model says about the candidates: penultimate features (N, D) and logits (N, K).

    ``images`` and ``labels`` are the candidates themselves, for selectors that train on them; labels exist only
    when the candidates are labeled (``selection.target=labeled``).
    """

    features: np.ndarray
    logits: np.ndarray
    images: np.ndarray | None = None
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.features)

    def pseudo_classes(self, chunk: int = 65536) -> np.ndarray:
        """The selection model's predicted class (argmax of the logits), read in chunks of rows."""
        return np.concatenate([np.asarray(self.logits[s:s + chunk]).argmax(1) for s in range(0, len(self), chunk)]
                              or [np.zeros(0, dtype=np.int64)]).astype(np.int64)

    def classes(self) -> np.ndarray:
        """The true class where known, else the pseudo-class."""
        return self.pseudo_classes() if self.labels is None else np.asarray(self.labels, dtype=np.int64)


@dataclass
class Selection:
    """Chosen pool indices (boundary part first), a score for every pool point and a weight per chosen point."""

    indices: np.ndarray
    scores: np.ndarray
    weights: np.ndarray
    is_boundary: np.ndarray

    @property
    def num_boundary(self) -> int:
        return int(self.is_boundary.sum())

    @classmethod
    def everything(cls, n: int) -> "Selection":
        """Every one of n candidates, unscored: what a selector that chooses during training hands on."""
        return cls(np.arange(n, dtype=np.int64), np.full(n, np.nan), np.ones(n, dtype=np.float32),
                   np.zeros(n, dtype=bool))
