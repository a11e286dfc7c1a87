"""The semi-supervised protocol: labeled set, validation split and unlabeled pool carved from a training set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssat.errors import ConfigError


@dataclass
class SemiSupervisedData:
    """The disjoint parts of one run. The pool's labels are hidden from training and only reported on."""

    labeled_images: np.ndarray
    labeled_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    pool_images: np.ndarray
    pool_hidden_labels: np.ndarray | None
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sizes(self) -> dict[str, int]:
        return {
            "labeled": len(self.labeled_labels),
            "val": len(self.val_labels),
            "pool": len(self.pool_images),
            "test": len(self.test_labels),
        }


def stratified_take(labels: np.ndarray, candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n of the candidate indices with class shares as in the candidates (largest remainders get the rest)."""
    classes, counts = np.unique(labels[candidates], return_counts=True)
    exact = n * counts / counts.sum()
    take = np.floor(exact).astype(int)
    leftover = n - take.sum()
    take[np.argsort(-(exact - take), kind="stable")[:leftover]] += 1
    chosen = []
    for cls, k in zip(classes, take):
        members = candidates[labels[candidates] == cls]
        chosen.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(chosen))


def split_pool(dataset, val_size: int, num_labeled: int, num_unlabeled: int | None, split_seed: int,
               name: str = "split") -> SemiSupervisedData:
    """Carve validation (stratified), labeled (stratified) and pool (the rest, or a random part of it)."""
    labels = dataset.train_labels
    n_train = len(labels)
    for key, value in (("val_size", val_size), ("pool.num_labeled", num_labeled)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    if val_size + num_labeled >= n_train:
        raise ConfigError(
            f"val_size={val_size} plus pool.num_labeled={num_labeled} leave no pool: "
            f"the training set has {n_train} images"
        )
    left = n_train - val_size - num_labeled
    if num_unlabeled is not None and not 1 <= num_unlabeled <= left:
        raise ConfigError(
            f"pool.num_unlabeled={num_unlabeled} is larger than the training set allows: "
            f"{n_train} images minus val_size={val_size} and pool.num_labeled={num_labeled} leave {left}"
        )
    rng = np.random.default_rng(split_seed)
    everything = np.arange(n_train)
    val = stratified_take(labels, everything, val_size, rng)
    rest = np.setdiff1d(everything, val)
    labeled = stratified_take(labels, rest, num_labeled, rng)
    pool = np.setdiff1d(rest, labeled)
    if num_unlabeled is not None:
        pool = np.sort(rng.permutation(pool)[:num_unlabeled])
    images = dataset.train_images
    return SemiSupervisedData(
        labeled_images=images[labeled],
        labeled_labels=labels[labeled],
        val_images=images[val],
        val_labels=labels[val],
        pool_images=images[pool],
        pool_hidden_labels=labels[pool],
        test_images=dataset.test_images,
        test_labels=dataset.test_labels,
        classes=list(dataset.classes),
    )
