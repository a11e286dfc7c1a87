"""Streaming pieces for large pools: resumable embedding, lazy training set, finite-feature check, k-means quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits

from ssat.clustering.kmeans import fit_kmeans, inertia
from ssat.data.training_set import LabeledAndSelected
from ssat.errors import DataError
from ssat.models import SmallCNN
from ssat.selection import PoolEmbedding, RandomSelector
from ssat.artifacts import Embedding
from ssat.stages.embed import embed_pool
from ssat.stages.select import select_pool


@pytest.fixture(scope="module")
def digits_images() -> np.ndarray:
    images = load_digits().images
    return np.round(images * 255 / 16).astype(np.uint8)[:, None]


@pytest.fixture(scope="module")
def model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(in_channels=1, num_classes=10, mean=[0.3], std=[0.4], width=8)


class CrashAfter(torch.nn.Module):
    """The model, but the forward pass fails after a number of batches: a crash in the middle of the embed."""

    def __init__(self, model, batches: int):
        super().__init__()
        self.model, self.left, self.feature_dim, self.head = model, batches, model.feature_dim, model.head
        self.calls = 0

    def features(self, x):
        self.calls += 1
        if self.left == 0:
            raise RuntimeError("simulated crash")
        self.left -= 1
        return self.model.features(x)


def test_interrupted_embed_resumes_and_equals_an_uninterrupted_one(model, digits_images, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir()
    broken.mkdir()
    embed_pool(model, digits_images, whole, batch_size=100)
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed_pool(CrashAfter(model, batches=11), digits_images, broken, batch_size=100, flush_seconds=0)
    resumed = CrashAfter(model, batches=10**6)
    info = embed_pool(resumed, digits_images, broken, batch_size=100)
    assert info["resumed_at"] == 1100, "the rows written before the crash are kept"
    assert resumed.calls == 7, "only the remaining 697 rows are embedded again"
    for name in ("features.npy", "logits.npy"):
        np.testing.assert_array_equal(np.load(whole / name), np.load(broken / name))


def test_embed_in_float16_halves_the_feature_file(model, digits_images, tmp_path):
    embed_pool(model, digits_images, tmp_path, batch_size=256, dtype="float16")
    pool = Embedding.load(tmp_path)
    assert pool.features.dtype == np.float16 and pool.features.shape == (len(digits_images), model.feature_dim)


def test_training_set_reads_only_the_selected_pool_rows(digits_images):
    labeled, labeled_y = digits_images[:50], np.arange(50) % 10
    pool = digits_images[50:]
    selection = np.array([700, 3, 41, 1000])
    pseudo = np.array([7, 3, 1, 0])

    class CountingPool:
        """A pool that records which rows are read."""

        def __init__(self, images):
            self.images, self.reads = images, []

        def __getitem__(self, rows):
            self.reads.append(np.asarray(rows).copy())
            return self.images[rows]

    counting = CountingPool(pool)
    train_set = LabeledAndSelected(labeled, labeled_y, counting, selection, pseudo)
    assert len(train_set) == 54
    x, y = train_set.__getitems__([2, 50, 53, 51, 2])
    assert x.dtype == torch.uint8 and x.shape == (5, 1, 8, 8)
    order = np.argsort(selection)
    np.testing.assert_array_equal(x[1].numpy(), pool[selection[order][0]])
    np.testing.assert_array_equal(y.numpy(), [labeled_y[2], pseudo[order][0], pseudo[order][3], pseudo[order][1],
                                              labeled_y[2]])
    assert sorted(np.concatenate(counting.reads).tolist()) == sorted(selection[order][[0, 3, 1]].tolist())


def test_selection_stops_on_non_finite_features(tmp_path):
    features = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    features[37, 2] = np.nan
    pool = PoolEmbedding(features, np.zeros((100, 3), dtype=np.float32))
    with pytest.raises(DataError, match="row 37"):
        select_pool(RandomSelector(), pool, 0.5, 0, tmp_path)
    assert not (tmp_path / "selection.npy").exists()


def test_kmeans_objective_is_as_good_as_scikit_learn_kmeans_plus_plus():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(10, 32)) * 2
    x = (centers[rng.integers(10, size=20000)] + rng.normal(size=(20000, 32))).astype(np.float32)
    ours = inertia(x, fit_kmeans(x, 10, niter=25, nredo=1, seed=0))
    reference = KMeans(10, init="k-means++", n_init=1, random_state=0).fit(x).inertia_
    assert ours <= 1.01 * reference
