"""The training set of a stage: labeled images followed by the selected pool points, fetched a batch at a time.

Selected points are read from the pool (possibly a memory map of millions of images) only when a batch asks for
them, so selecting the whole pool never copies it into RAM.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class LabeledAndSelected(Dataset):
    """Indices [0, L) are labeled images, [L, L + S) the selected pool points with their pseudo-labels.

    With ``soft_labels`` (S, K) probabilities (ssat.pseudo_labels=soft) batches carry label distributions (B, K):
    the selected points' probabilities and the labeled points' one-hot labels."""

    def __init__(self, labeled_images: np.ndarray, labeled_labels: np.ndarray, pool_images=None,
                 selection: np.ndarray | None = None, pseudo_labels: np.ndarray | None = None,
                 soft_labels: np.ndarray | None = None):
        self.labeled_images = labeled_images
        self.labeled_labels = labeled_labels.astype(np.int64)
        self.pool_images = pool_images
        self.weights: np.ndarray | None = None  # per-index loss weights (a coreset's); batches then carry them
        self.replace_selection(np.zeros(0, dtype=np.int64) if selection is None else selection,
                               np.zeros(0, dtype=np.int64) if pseudo_labels is None else pseudo_labels, soft_labels)

    def replace_selection(self, selection: np.ndarray, pseudo_labels: np.ndarray,
                          soft_labels: np.ndarray | None = None) -> None:
        """The selected pool points and their labels (aligned with ``selection``), as an adaptive selector
        re-chooses them during training; the number of points stays what the sampler was built for."""
        selection = np.asarray(selection, dtype=np.int64)
        if hasattr(self, "selection") and len(selection) != len(self.selection):
            raise ValueError(f"a re-selection of {len(selection)} points replaces one of {len(self.selection)}")
        order = np.argsort(selection, kind="stable")  # neighbouring dataset indices read neighbouring pool rows
        self.selection = selection[order]
        self.pseudo_labels = np.asarray(pseudo_labels, dtype=np.int64)[order]
        self.soft_labels = None if soft_labels is None else np.asarray(soft_labels, dtype=np.float32)[order]

    @property
    def num_labeled(self) -> int:
        return len(self.labeled_labels)

    def __len__(self) -> int:
        return self.num_labeled + len(self.selection)

    def __getitems__(self, indices) -> tuple[torch.Tensor, ...]:
        """A whole batch in one read: uint8 images (B, C, H, W), int64 labels (B,) (with soft labels: float32
        distributions (B, K)) and, when set, weights (B,)."""
        idx = np.asarray(indices, dtype=np.int64)
        labeled = idx < self.num_labeled
        images = np.empty((len(idx), *self.labeled_images.shape[1:]), dtype=np.uint8)
        labels = np.empty(len(idx), dtype=np.int64)
        images[labeled] = self.labeled_images[idx[labeled]]
        labels[labeled] = self.labeled_labels[idx[labeled]]
        if not labeled.all():
            positions = idx[~labeled] - self.num_labeled
            images[~labeled] = self.pool_images[self.selection[positions]]
            labels[~labeled] = self.pseudo_labels[positions]
        if self.soft_labels is not None:
            targets = np.eye(self.soft_labels.shape[1], dtype=np.float32)[labels]
            if not labeled.all():
                targets[~labeled] = self.soft_labels[idx[~labeled] - self.num_labeled]
            labels = targets
        if self.weights is not None:
            return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(self.weights[idx])
        return torch.from_numpy(images), torch.from_numpy(labels)

    def __getitem__(self, index: int):
        return tuple(part[0] for part in self.__getitems__([index]))


def batch_as_is(batch):
    """collate_fn for datasets whose __getitems__ already returns the collated batch."""
    return batch
