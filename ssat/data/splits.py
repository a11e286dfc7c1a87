"""The semi-supervised protocol: labeled set, validation split and unlabeled pool carved from a training set."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields, replace

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

    def fingerprint(self) -> str:
        """A hash of what was read, for the cache keys in place of where it was read from. A memory-mapped pool
        (millions of images) is represented by its files' sizes and modification times, not read whole."""
        digest = hashlib.sha256()
        for part in fields(self):
            value = getattr(self, part.name)
            digest.update(part.name.encode())
            if isinstance(value, np.ndarray):
                digest.update(repr((value.dtype.str, value.shape)).encode())
                digest.update(np.ascontiguousarray(value).data)
            elif hasattr(value, "fingerprint"):
                digest.update(repr(value.fingerprint).encode())
            else:
                digest.update(repr(value).encode())
        return digest.hexdigest()[:16]

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
               name: str = "split", pool_first: bool = False) -> SemiSupervisedData:
    """Carve validation (stratified), labeled (stratified) and pool (the rest, or a random part of it).

    ``pool_first``: the pool (``num_unlabeled`` images) is drawn before the labeled set, so runs that differ only
    in ``num_labeled`` share the same validation split and the same pool (a map over labeled-set sizes)."""
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
    if pool_first:
        if num_unlabeled is None:
            raise ConfigError("pool.pool_first=true needs pool.num_unlabeled (the size of the fixed pool)")
        everything = np.arange(n_train)
        val = stratified_take(labels, everything, val_size, rng)
        rest = np.setdiff1d(everything, val)
        pool = np.sort(rng.permutation(rest)[:num_unlabeled])
        labeled = stratified_take(labels, np.setdiff1d(rest, pool), num_labeled, rng)
        return assemble(dataset, val, labeled, dataset.train_images[pool], labels[pool])
    val, labeled, left = carve_val_and_labeled(labels, val_size, num_labeled, rng)
    pool = left if num_unlabeled is None else np.sort(rng.permutation(left)[:num_unlabeled])
    return assemble(dataset, val, labeled, dataset.train_images[pool], labels[pool])


def carve_val_and_labeled(labels: np.ndarray, val_size: int, num_labeled: int | None, rng: np.random.Generator):
    """Indices of a stratified validation split, then of a stratified labeled set of ``num_labeled`` (None: all
    the rest), and of what is left; every pool type carves the same way, so equal seeds give equal splits."""
    everything = np.arange(len(labels))
    val = stratified_take(labels, everything, val_size, rng)
    rest = np.setdiff1d(everything, val)
    labeled = rest if num_labeled is None else stratified_take(labels, rest, num_labeled, rng)
    return val, labeled, np.setdiff1d(rest, labeled)


def assemble(dataset, val: np.ndarray, labeled: np.ndarray, pool_images,
             pool_hidden_labels: np.ndarray | None) -> SemiSupervisedData:
    images, labels = dataset.train_images, dataset.train_labels
    return SemiSupervisedData(
        labeled_images=images[labeled],
        labeled_labels=labels[labeled],
        val_images=images[val],
        val_labels=labels[val],
        pool_images=pool_images,
        pool_hidden_labels=pool_hidden_labels,
        test_images=dataset.test_images,
        test_labels=dataset.test_labels,
        classes=list(dataset.classes),
    )


def take_test_subset(data: SemiSupervisedData, test_size: int | None, seed: int = 0) -> SemiSupervisedData:
    """A fixed, stratified part of the test set (the same for every run seed), for evaluations a CPU can afford."""
    n_test = len(data.test_labels)
    if test_size is None or test_size == n_test:
        return data
    if not 1 <= test_size <= n_test:
        raise ConfigError(f"test_size={test_size} must be between 1 and the test set's {n_test} images (null: all)")
    keep = stratified_take(data.test_labels, np.arange(n_test), test_size, np.random.default_rng(seed))
    return replace(data, test_images=data.test_images[keep], test_labels=data.test_labels[keep])
