"""Selection on pools read in blocks (a memory map larger than RAM): each streamed result equals the in-memory one."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.format import open_memmap

from ssat.clustering.blocks import float32_blocks, sample_rows, take_rows
from ssat.clustering.gmm import fit_gmm
from ssat.clustering.kmeans import fit_kmeans_margins, inertia, lloyd_passes, two_nearest_distances
from ssat.clustering.pca import fit_pca
from ssat.errors import DataError
from ssat.selection import GMMSelector, KMeansMarginSelector, PoolEmbedding


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory):
    """Three blobs in 16-D, 3,001 rows, as a float16 .npy memory map and the same values as float32 in memory."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 16)) * 3
    x = (centres[rng.integers(3, size=3001)] + rng.normal(size=(3001, 16))).astype(np.float16)
    path = tmp_path_factory.mktemp("pool") / "features.npy"
    out = open_memmap(path, mode="w+", dtype=np.float16, shape=x.shape)
    out[:] = x
    out.flush()
    return np.load(path, mmap_mode="r"), x.astype(np.float32)


def test_blocks_convert_float16_and_take_rows_reads_them_in_one_pass(pool_file):
    mapped, x = pool_file
    blocks = [(start, block.copy()) for start, block in float32_blocks(mapped, batch_size=700)]
    assert [start for start, _ in blocks] == list(range(0, 3001, 700))
    np.testing.assert_array_equal(np.concatenate([block for _, block in blocks]), x)
    rows = sample_rows(len(x), 250, seed=4)
    assert np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(take_rows(mapped, rows, batch_size=333), x[rows])


def numpy_lloyd(x: np.ndarray, centroids: np.ndarray, steps: int) -> np.ndarray:
    """Lloyd's iterations in float64 on the whole array: the reference for the streamed passes."""
    x64, c = x.astype(np.float64), centroids.astype(np.float64)
    for _ in range(steps):
        labels = ((x64[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x64[labels == j].mean(0) for j in range(len(c))])
    return c


def test_streamed_lloyd_passes_equal_lloyd_on_the_whole_array(pool_file):
    mapped, x = pool_file
    start = x[[0, 1, 2]]
    fit = lloyd_passes(mapped, start, max_passes=3, batch_size=512)
    assert fit.passes == 3 and len(fit.pass_inertia) == 3
    assert fit.pass_inertia[0] >= fit.pass_inertia[1] >= fit.pass_inertia[2]
    # the kept centroids are those of the third pass's assignment: two Lloyd steps from the start
    np.testing.assert_allclose(fit.centroids, numpy_lloyd(x, start, 2), rtol=1e-5, atol=1e-5)
    d1, d2, assign = two_nearest_distances(x, fit.centroids)
    np.testing.assert_array_equal(fit.d1, d1)
    np.testing.assert_array_equal(fit.d2, d2)
    np.testing.assert_array_equal(fit.assign, assign)
    assert fit.inertia == pytest.approx(inertia(x, fit.centroids), rel=1e-6)
    # the same passes on the float32 array in memory give the same bits
    again = lloyd_passes(x, start, max_passes=3, batch_size=512)
    np.testing.assert_array_equal(again.centroids, fit.centroids)
    np.testing.assert_array_equal(again.d1, fit.d1)


def test_passes_stop_when_they_no_longer_improve(pool_file):
    _, x = pool_file
    fit = lloyd_passes(x, x[[0, 1, 2]], max_passes=50)
    assert fit.passes < 50  # three separated blobs: converged in a few passes
    assert fit.pass_inertia[-2] - fit.pass_inertia[-1] <= 1e-4 * fit.pass_inertia[-1]


def test_kmeans_on_a_sample_then_passes_matches_kmeans_on_every_row(pool_file):
    mapped, x = pool_file
    full = fit_kmeans_margins(x, 3, nredo=2, seed=0)  # 3,001 rows <= sample_size: FAISS on every row
    assert full.passes == 0
    streamed = fit_kmeans_margins(mapped, 3, nredo=2, seed=0, sample_size=500, batch_size=256)
    assert streamed.passes >= 1
    assert streamed.inertia <= full.inertia * (1 + 1e-4)
    # the same selection from the memory map and from the array in memory
    for features in (mapped, x):
        selector = KMeansMarginSelector(n_clusters=3, sample_size=500)
        pool = PoolEmbedding(features, np.zeros((len(x), 3), dtype=np.float32))
        scores = selector.score(pool, seed=1)
        if features is mapped:
            mapped_scores = scores
    np.testing.assert_array_equal(mapped_scores, scores)
    one = KMeansMarginSelector(n_clusters=3, sample_size=500, max_passes=1)
    one.score(PoolEmbedding(mapped, np.zeros((len(x), 3), dtype=np.float32)), seed=1)
    assert one.fitted_.passes == 1


@pytest.mark.parametrize("kind", ["loglik", "posterior_gap"])
def test_streamed_gmm_scores_equal_in_memory_scores(pool_file, kind):
    mapped, x = pool_file
    projection = fit_pca(x, 4)
    reduced = projection.transform(x)
    fit = fit_gmm(reduced, 3, seed=0, device="cpu")
    streamed = fit.row_scores(mapped, kind, batch_size=97, device="cpu", projection=projection)
    if kind == "loglik":
        expected, _ = fit.score(reduced)
    else:
        top2 = np.sort(fit.log_posteriors(reduced), axis=1)[:, -2:]
        expected = top2[:, 1] - top2[:, 0]
    np.testing.assert_allclose(streamed, expected, rtol=1e-6, atol=1e-6)


def test_gmm_selector_on_a_sample_of_a_memory_map_equals_it_in_memory(pool_file):
    mapped, x = pool_file
    scores = []
    for features in (mapped, x):
        selector = GMMSelector(n_components=3, pca_dim=4, max_fit_points=800, batch_size=256)
        scores.append(selector.score(PoolEmbedding(features, np.zeros((len(x), 3), dtype=np.float32)), seed=2))
        assert len(selector.reduce(features, seed=2)) == 800
    np.testing.assert_array_equal(scores[0], scores[1])


def test_streamed_scoring_names_the_bad_row(pool_file):
    _, x = pool_file
    fit = fit_gmm(x, 3, seed=0, device="cpu")
    bad = x.copy()
    bad[2345, 7] = np.nan
    with pytest.raises(DataError, match="row 2345 \\(of 3001\\)"):
        fit.row_scores(bad, "loglik", batch_size=1000)
