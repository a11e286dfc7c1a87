"""split_pool and stratified_take: disjoint, stratified, reproducible labeled / validation / pool splits."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.datasets import load_digits

from ssat.data.splits import split_pool, stratified_take, take_test_subset
from ssat.errors import ConfigError

N_TRAIN = 1500


@pytest.fixture(scope="module")
def dataset():
    """sklearn digits as uint8 (N, 1, 8, 8) images; the two top-left pixels encode each training image's index."""
    data = load_digits()
    images = (data.images * 15).astype(np.uint8)[:, None]
    labels = data.target.astype(np.int64)
    train = images[:N_TRAIN].copy()
    idx = np.arange(N_TRAIN)
    train[:, 0, 0, 0] = idx // 256
    train[:, 0, 0, 1] = idx % 256
    return SimpleNamespace(train_images=train, train_labels=labels[:N_TRAIN], test_images=images[N_TRAIN:],
                           test_labels=labels[N_TRAIN:], classes=[str(c) for c in range(10)])


def index_of(images: np.ndarray) -> np.ndarray:
    """The training-set index encoded in each image."""
    return images[:, 0, 0, 0].astype(np.int64) * 256 + images[:, 0, 0, 1]


def test_parts_are_disjoint_sized_and_aligned(dataset):
    """labeled, val and pool are disjoint parts of the training set with the requested sizes and their own labels."""
    data = split_pool(dataset, val_size=100, num_labeled=200, num_unlabeled=None, split_seed=0)
    lab, val, pool = index_of(data.labeled_images), index_of(data.val_images), index_of(data.pool_images)
    assert (len(lab), len(val), len(pool)) == (200, 100, N_TRAIN - 300)
    assert data.sizes() == {"labeled": 200, "val": 100, "pool": N_TRAIN - 300, "test": len(dataset.test_labels)}
    for part in (lab, val, pool):
        assert len(np.unique(part)) == len(part)
        assert part.min() >= 0 and part.max() < N_TRAIN
    assert not set(lab) & set(val) and not set(lab) & set(pool) and not set(val) & set(pool)
    assert set(lab) | set(val) | set(pool) == set(range(N_TRAIN))  # num_unlabeled=None: the pool is the rest
    np.testing.assert_array_equal(data.labeled_labels, dataset.train_labels[lab])
    np.testing.assert_array_equal(data.val_labels, dataset.train_labels[val])
    np.testing.assert_array_equal(data.pool_hidden_labels, dataset.train_labels[pool])
    np.testing.assert_array_equal(data.labeled_images, dataset.train_images[lab])
    assert data.test_images is dataset.test_images and data.num_classes == 10


def _assert_stratified(chosen_labels, candidate_labels, n):
    """Per class, the count is within 1 of n times the class share among the candidates."""
    classes, counts = np.unique(candidate_labels, return_counts=True)
    expected = n * counts / counts.sum()
    got = np.array([(chosen_labels == c).sum() for c in classes])
    assert got.sum() == n
    assert np.all(np.abs(got - expected) < 1), (got, expected)


def test_labeled_and_val_are_stratified(dataset):
    data = split_pool(dataset, val_size=97, num_labeled=53, num_unlabeled=None, split_seed=3)
    labels = dataset.train_labels
    _assert_stratified(data.val_labels, labels, 97)
    rest = np.setdiff1d(np.arange(N_TRAIN), index_of(data.val_images))
    _assert_stratified(data.labeled_labels, labels[rest], 53)
    # within 2 of the whole training set's shares as well
    shares = np.bincount(labels, minlength=10) / N_TRAIN
    assert np.all(np.abs(np.bincount(data.labeled_labels, minlength=10) - 53 * shares) < 2)


def test_num_unlabeled_limits_the_pool(dataset):
    """num_unlabeled takes that many pool points from what labeled and val leave."""
    full = split_pool(dataset, val_size=100, num_labeled=200, num_unlabeled=None, split_seed=1)
    part = split_pool(dataset, val_size=100, num_labeled=200, num_unlabeled=321, split_seed=1)
    assert len(part.pool_images) == len(part.pool_hidden_labels) == 321
    pool = index_of(part.pool_images)
    assert len(np.unique(pool)) == 321
    assert set(pool) <= set(index_of(full.pool_images))
    np.testing.assert_array_equal(index_of(part.labeled_images), index_of(full.labeled_images))
    np.testing.assert_array_equal(part.pool_hidden_labels, dataset.train_labels[pool])


def test_same_seed_same_split_other_seed_other_split(dataset):
    a = split_pool(dataset, val_size=100, num_labeled=150, num_unlabeled=500, split_seed=7)
    b = split_pool(dataset, val_size=100, num_labeled=150, num_unlabeled=500, split_seed=7)
    c = split_pool(dataset, val_size=100, num_labeled=150, num_unlabeled=500, split_seed=8)
    for part in ("labeled_images", "val_images", "pool_images"):
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    assert set(index_of(a.labeled_images)) != set(index_of(c.labeled_images))
    assert set(index_of(a.pool_images)) != set(index_of(c.pool_images))


@pytest.mark.parametrize("val_size, num_labeled, num_unlabeled, key", [
    (1000, 500, None, "pool.num_labeled"),  # val + labeled use the whole training set
    (1400, 200, None, "pool.num_labeled"),
    (100, 200, N_TRAIN - 299, "pool.num_unlabeled"),  # one more than what is left
    (100, 200, 0, "pool.num_unlabeled"),
    (100, 0, None, "pool.num_labeled"),
])
def test_sizes_that_do_not_fit_raise_config_error(dataset, val_size, num_labeled, num_unlabeled, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        split_pool(dataset, val_size=val_size, num_labeled=num_labeled, num_unlabeled=num_unlabeled, split_seed=0)


def test_largest_pool_that_fits_is_accepted(dataset):
    data = split_pool(dataset, val_size=100, num_labeled=200, num_unlabeled=N_TRAIN - 300, split_seed=0)
    assert len(data.pool_images) == N_TRAIN - 300


def test_stratified_take_on_an_imbalanced_subset():
    """Sorted distinct candidates, class counts within 1 of proportional (largest remainders), exact total."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), [500, 250, 120, 30])
    rng.shuffle(labels)
    candidates = np.sort(rng.choice(len(labels), size=600, replace=False))
    for n in (1, 7, 50, 333, 600):
        chosen = stratified_take(labels, candidates, n, np.random.default_rng(n))
        assert len(chosen) == n and len(np.unique(chosen)) == n
        assert np.all(np.diff(chosen) > 0)
        assert set(chosen) <= set(candidates)
        if n > 1:
            _assert_stratified(labels[chosen], labels[candidates], n)
    np.testing.assert_array_equal(stratified_take(labels, candidates, 600, np.random.default_rng(1)), candidates)


def test_test_subset_is_fixed_stratified_and_aligned(dataset):
    data = split_pool(dataset, val_size=100, num_labeled=200, num_unlabeled=None, split_seed=0)
    sub = take_test_subset(data, 100)
    again = take_test_subset(split_pool(dataset, val_size=100, num_labeled=200, num_unlabeled=None, split_seed=5), 100)
    np.testing.assert_array_equal(sub.test_images, again.test_images)  # independent of the run's seeds
    # each kept image keeps its own label: find it in the full test set
    for image, label in zip(sub.test_images[:20], sub.test_labels[:20]):
        matches = np.flatnonzero((data.test_images == image).all(axis=(1, 2, 3)))
        assert label in data.test_labels[matches]
    full_share = np.bincount(data.test_labels, minlength=10) / len(data.test_labels)
    np.testing.assert_allclose(np.bincount(sub.test_labels, minlength=10) / 100, full_share, atol=0.011)
    assert take_test_subset(data, None) is data
    with pytest.raises(ConfigError, match=r"test_size=0 must be between 1 and the test set's 297 images"):
        take_test_subset(data, 0)


def test_pool_first_keeps_the_pool_and_validation_split_across_labeled_sizes(dataset):
    small, large = (split_pool(dataset, val_size=100, num_labeled=n, num_unlabeled=600, split_seed=2,
                               pool_first=True) for n in (50, 500))
    assert np.array_equal(index_of(small.pool_images), index_of(large.pool_images))
    assert np.array_equal(index_of(small.val_images), index_of(large.val_images))
    assert len(small.labeled_labels) == 50 and len(large.labeled_labels) == 500
    assert not set(index_of(large.labeled_images)) & set(index_of(large.pool_images))
    with pytest.raises(ConfigError, match="pool.pool_first=true needs pool.num_unlabeled"):
        split_pool(dataset, val_size=100, num_labeled=50, num_unlabeled=None, split_seed=2, pool_first=True)
