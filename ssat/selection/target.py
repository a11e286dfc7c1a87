"""What a selector reduces (``selection.target``): the unlabeled pool (SSAT) or the labeled training set (data
pruning: plain adversarial training on a reduced labeled set, the pool left out).

A target says which images are the candidates, which labels train on the chosen ones, and what the training
stage then sees, so the stages never ask which target is configured.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ssat.choices import SELECTION_TARGETS
from ssat.data.splits import SemiSupervisedData
from ssat.errors import ConfigError

POOL, LABELED = SELECTION_TARGETS


class PoolTarget:
    """Select from the unlabeled pool; the chosen points train with the intermediate model's pseudo-labels."""

    name = POOL

    def candidates(self, data: SemiSupervisedData):
        return data.pool_images

    def known_labels(self, data: SemiSupervisedData) -> np.ndarray | None:
        return None

    def hidden_labels(self, data: SemiSupervisedData) -> np.ndarray | None:
        return data.pool_hidden_labels

    def training_data(self, data: SemiSupervisedData, selection: np.ndarray,
                      labels: np.ndarray) -> tuple[SemiSupervisedData, np.ndarray, np.ndarray]:
        return data, selection, labels


class LabeledTarget:
    """Select from the labeled set; the chosen points are the whole training set, with their true labels."""

    name = LABELED

    def candidates(self, data: SemiSupervisedData):
        return data.labeled_images

    def known_labels(self, data: SemiSupervisedData) -> np.ndarray | None:
        return data.labeled_labels

    def hidden_labels(self, data: SemiSupervisedData) -> np.ndarray | None:
        return None

    def training_data(self, data: SemiSupervisedData, selection: np.ndarray,
                      labels: np.ndarray) -> tuple[SemiSupervisedData, np.ndarray, np.ndarray]:
        keep = np.sort(selection)
        empty = np.zeros(0, dtype=np.int64)
        reduced = replace(data, labeled_images=data.labeled_images[keep], labeled_labels=data.labeled_labels[keep],
                          pool_images=data.labeled_images[:0], pool_hidden_labels=None)
        return reduced, empty, empty


TARGETS = {target.name: target for target in (PoolTarget(), LabeledTarget())}


def selection_target(name: str) -> PoolTarget | LabeledTarget:
    if name not in TARGETS:
        raise ConfigError(f"selection.target={name!r} is not one of {', '.join(TARGETS)}")
    return TARGETS[name]
