"""The training labels of selected pool points: a model's argmax (hard) or its softmax at a temperature (soft),
unless the data gives labels to train on. One rule for the pseudo-label stage and for re-selections during SSAT."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssat.choices import PSEUDO_LABELS as KINDS
from ssat.errors import ConfigError


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of logits / temperature, float32 rows that sum to 1 (a tiny temperature gives one-hot rows
    wherever the largest logit is unique)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class TrainingLabels:
    """``kind``: hard (argmax) or soft (probabilities at ``temperature``, ssat.pseudo_labels=soft); ``given``:
    labels of every candidate that win over a model's (pool.labels=file, or the labeled target's true labels)."""

    kind: str = "hard"
    temperature: float = 1.0
    given: np.ndarray | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"ssat.pseudo_labels={self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.temperature > 0:
            raise ConfigError(f"ssat.pseudo_label_temperature={self.temperature} must be greater than 0")

    def of(self, logits: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The hard labels of ``rows`` (int64) and, when soft and no labels are given, their probabilities (R, K);
        ``logits`` may be a memory map of the whole pool: only the rows are read."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.given is not None:
            return np.asarray(self.given)[rows].astype(np.int64), None
        chosen = np.asarray(logits[rows])
        hard = chosen.argmax(axis=1).astype(np.int64)
        return hard, softmax(chosen, self.temperature) if self.kind == "soft" else None
