"""The training set of a stage: labeled images followed by the selected pool points, fetched a batch at a time.

Selected points are read from the pool (possibly a memory map of millions of images) only when a batch asks for
them, so selecting the whole pool never copies it into RAM.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class LabeledAndSelected(Dataset):
    """Indices [0, L) are labeled images, [L, L + S) the selected pool points with their pseudo-labels."""

    def __init__(self, labeled_images: np.ndarray, labeled_labels: np.ndarray, pool_images=None,
                 selection: np.ndarray | None = None, pseudo_labels: np.ndarray | None = None):
        self.labeled_images = labeled_images
        self.labeled_labels = labeled_labels.astype(np.int64)
        self.pool_images = pool_images
        selection = np.zeros(0, dtype=np.int64) if selection is None else np.asarray(selection)
        order = np.argsort(selection, kind="stable")  # neighbouring dataset indices read neighbouring pool rows
        self.selection = selection[order]
        self.pseudo_labels = (np.zeros(0, dtype=np.int64) if pseudo_labels is None
                              else np.asarray(pseudo_labels, dtype=np.int64)[order])
        self.weights: np.ndarray | None = None  # per-index loss weights (a coreset's); batches then carry them

    @property
    def num_labeled(self) -> int:
        return len(self.labeled_labels)

    def __len__(self) -> int:
        return self.num_labeled + len(self.selection)

    def __getitems__(self, indices) -> tuple[torch.Tensor, ...]:
        """A whole batch in one read: uint8 images (B, C, H, W), int64 labels (B,) and, when set, weights (B,)."""
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
        if self.weights is not None:
            return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(self.weights[idx])
        return torch.from_numpy(images), torch.from_numpy(labels)

    def __getitem__(self, index: int):
        return tuple(part[0] for part in self.__getitems__([index]))


def batch_as_is(batch):
    """collate_fn for datasets whose __getitems__ already returns the collated batch."""
    return batch
