"""Selection: the shared boundary/random rule, the baselines, PCS and the latent-clustering selectors."""

from __future__ import annotations

import numpy as np
import pytest

from ssat.clustering.kmeans import fit_kmeans, two_nearest_distances
from ssat.errors import ConfigError, DataError
from ssat.selection import (
    FullSelector,
    GMMSelector,
    KMeansMarginSelector,
    PoolEmbedding,
    PredictionConfidenceSelector,
    RandomSelector,
    Selector,
    budget_size,
    mix_boundary_random,
)
from ssat.stages.select import select_pool


class FixedScoreSelector(Selector):
    """A selector whose scores are given, so the mixing rule can be checked against known values."""

    def __init__(self, scores: np.ndarray, boundary_fraction: float):
        super().__init__("fixed", boundary_fraction)
        self.scores = scores
        self.calls = 0

    def score(self, pool, seed):
        self.calls += 1
        return self.scores


def _pool(n: int, dim: int = 3, classes: int = 4, seed: int = 0) -> PoolEmbedding:
    rng = np.random.default_rng(seed)
    return PoolEmbedding(rng.normal(size=(n, dim)).astype(np.float32),
                         rng.normal(size=(n, classes)).astype(np.float32))


@pytest.fixture
def scores():
    """Distinct scores in a shuffled order, so 'lowest first' is not the index order."""
    return np.random.default_rng(123).permutation(np.linspace(-3.0, 5.0, 40))


# ---------------------------------------------------------------- the boundary / random rule


@pytest.mark.parametrize("budget, b", [(0.25, 0.4), (0.5, 0.5), (0.3, 0.6), (0.125, 0.5), (1.0, 0.4), (0.7, 0.9)])
def test_boundary_part_is_lowest_scores_and_rest_is_random_from_remaining(scores, budget, b):
    """First round(b n) = lowest scores ascending; the rest distinct, outside the boundary part; n = round(budget N)."""
    n_pool = len(scores)
    selector = FixedScoreSelector(scores, b)
    sel = selector.select(PoolEmbedding(np.zeros((n_pool, 2)), np.zeros((n_pool, 3))), budget, seed=7)
    n = round(budget * n_pool)
    n_b = round(b * n)
    assert len(sel.indices) == n
    ascending = np.argsort(scores)
    np.testing.assert_array_equal(sel.indices[:n_b], ascending[:n_b])
    assert np.all(np.diff(scores[sel.indices[:n_b]]) > 0)
    rest = sel.indices[n_b:]
    assert len(set(rest.tolist())) == len(rest) == n - n_b
    assert not set(rest.tolist()) & set(ascending[:n_b].tolist())
    assert np.all((rest >= 0) & (rest < n_pool))
    assert len(np.unique(sel.indices)) == n
    np.testing.assert_array_equal(sel.is_boundary, np.arange(n) < n_b)
    assert sel.num_boundary == n_b
    np.testing.assert_array_equal(sel.scores, scores)
    assert sel.weights.shape == (n,)


def test_budget_size_uses_python_round():
    """n = round(budget * N) with Python's round (half to even) and at least one point."""
    for budget, n_pool in [(0.25, 10), (0.35, 10), (0.5, 5), (0.5, 7), (0.1, 1000), (1.0, 13), (0.05, 30)]:
        assert budget_size(budget, n_pool) == round(budget * n_pool)
    assert budget_size(0.25, 10) == 2  # 2.5 rounds to 2
    assert budget_size(0.5, 7) == 4  # 3.5 rounds to 4


def test_boundary_count_uses_python_round(scores):
    """round(b n) boundary points, with Python's round: b=0.5 of n=5 gives 2, of n=7 gives 4."""
    rng = np.random.default_rng(0)
    assert mix_boundary_random(scores, 5, 0.5, rng, len(scores)).num_boundary == 2
    assert mix_boundary_random(scores, 7, 0.5, rng, len(scores)).num_boundary == 4


def test_b_one_is_exactly_the_n_lowest(scores):
    """b = 1: the selection is the n lowest scores, lowest first, with no random part."""
    sel = mix_boundary_random(scores, 12, 1.0, np.random.default_rng(0), len(scores))
    np.testing.assert_array_equal(sel.indices, np.argsort(scores)[:12])
    assert sel.is_boundary.all()


def test_b_zero_is_a_uniform_draw(scores):
    """b = 0: no boundary part and each point is chosen with probability n/N, low scores not favoured."""
    n_pool, n, draws = len(scores), 10, 3000
    counts = np.zeros(n_pool)
    for seed in range(draws):
        sel = mix_boundary_random(scores, n, 0.0, np.random.default_rng(seed), n_pool)
        assert not sel.is_boundary.any()
        assert len(np.unique(sel.indices)) == n
        counts[sel.indices] += 1
    freq = counts / draws
    # binomial standard deviation ~ 0.008 for p = 0.25; 0.05 is > 6 sigma
    assert np.abs(freq - n / n_pool).max() < 0.05
    lowest = np.argsort(scores)[:n]
    assert abs(freq[lowest].mean() - n / n_pool) < 0.03


@pytest.mark.parametrize("class_balanced", [False, True])
def test_tied_scores_select_at_random_not_the_first_rows(class_balanced):
    """Issue 13: equal scores are ordered by a seeded random permutation, never by position. With every score
    equal the boundary part is a uniform draw: not the first rows, and over seeds each row is as likely."""
    n_pool, budget, b, draws = 40, 0.25, 0.6, 2000
    pool = _pool(n_pool)
    selector = FixedScoreSelector(np.zeros(n_pool), b)
    selector.class_balanced = class_balanced
    classes = pool.classes() if class_balanced else np.zeros(n_pool, dtype=np.int64)
    first = selector.select(pool, budget, seed=0)
    n_b = first.num_boundary
    assert n_b >= 5 and not np.array_equal(np.sort(first.indices[:n_b]), np.arange(n_b))
    np.testing.assert_array_equal(first.indices, selector.select(pool, budget, seed=0).indices)
    # a row's chance: its class's boundary count over the class's size (one class unless class_balanced)
    per_class = np.bincount(classes[first.indices[:n_b]], minlength=classes.max() + 1) / np.bincount(classes)
    counts = np.zeros(n_pool)
    for seed in range(draws):
        sel = selector.select(pool, budget, seed)
        counts[sel.indices[sel.is_boundary]] += 1
    # chances near 0.15: binomial sd 0.008 over 2000 draws; 0.04 is 5 sigma
    assert np.abs(counts / draws - per_class[classes]).max() < 0.04


def test_random_selector_and_zero_fraction_do_not_score():
    """RandomSelector (b = 0) never calls score and matches the rule with b = 0."""
    pool = _pool(50)
    selector = FixedScoreSelector(np.arange(50.0), 0.0)
    sel = selector.select(pool, 0.2, seed=3)
    assert selector.calls == 0
    assert not sel.is_boundary.any()
    rand = RandomSelector().select(pool, 0.2, seed=3)
    np.testing.assert_array_equal(rand.indices, sel.indices)
    assert len(np.unique(rand.indices)) == 10


def test_random_part_covers_all_of_the_rest(scores):
    """Over many seeds the random part reaches every non-boundary point and never a boundary one."""
    n_b_indices = set(np.argsort(scores)[:4].tolist())
    seen = set()
    for seed in range(200):
        sel = mix_boundary_random(scores, 10, 0.4, np.random.default_rng(seed), len(scores))
        seen |= set(sel.indices[4:].tolist())
    assert seen == set(range(len(scores))) - n_b_indices


def test_same_seed_same_selection_different_seed_different_random_part(scores):
    """Determinism in the seed; another seed keeps the boundary part and changes the random part."""
    selector = FixedScoreSelector(scores, 0.4)
    pool = PoolEmbedding(np.zeros((40, 2)), np.zeros((40, 3)))
    a = selector.select(pool, 0.5, seed=11)
    b = selector.select(pool, 0.5, seed=11)
    c = selector.select(pool, 0.5, seed=12)
    np.testing.assert_array_equal(a.indices, b.indices)
    n_b = a.num_boundary
    np.testing.assert_array_equal(a.indices[:n_b], c.indices[:n_b])
    assert set(a.indices[n_b:].tolist()) != set(c.indices[n_b:].tolist())


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.01, 2.0])
def test_budget_outside_range_raises_config_error_naming_budget(budget):
    with pytest.raises(ConfigError, match="budget"):
        budget_size(budget, 100)
    with pytest.raises(ConfigError, match="budget"):
        FixedScoreSelector(np.arange(100.0), 0.5).select(_pool(100), budget, seed=0)


def test_budget_buying_no_point_raises():
    """A budget that rounds to zero points is a config error, not an empty selection."""
    with pytest.raises(ConfigError, match="budget"):
        budget_size(0.001, 100)


@pytest.mark.parametrize("b", [-0.01, 1.5])
def test_boundary_fraction_outside_range_raises_config_error_naming_key(b):
    with pytest.raises(ConfigError, match=r"selector\.boundary_fraction"):
        FixedScoreSelector(np.arange(10.0), b)
    with pytest.raises(ConfigError, match=r"selector\.boundary_fraction"):
        mix_boundary_random(np.arange(10.0), 5, b, np.random.default_rng(0), 10)
    with pytest.raises(ConfigError, match=r"selector\.boundary_fraction"):
        KMeansMarginSelector(boundary_fraction=b)


# ---------------------------------------------------------------- full and PCS


def test_full_selector_returns_every_index():
    sel = FullSelector().select(_pool(37), budget=0.1, seed=0)
    np.testing.assert_array_equal(np.sort(sel.indices), np.arange(37))
    assert len(sel.indices) == 37 and not sel.is_boundary.any()


def _logits_with_max_softmax(conf: np.ndarray, classes: int, rng) -> np.ndarray:
    """Logits whose softmax is (c, (1-c)/(K-1), ...) with the top class in a random column, then shifted."""
    rest = (1 - conf) / (classes - 1)
    probs = np.repeat(rest[:, None], classes, axis=1)
    top = rng.integers(classes, size=len(conf))
    probs[np.arange(len(conf)), top] = conf
    return np.log(probs) + rng.normal(size=(len(conf), 1)) * 3  # a per-row shift leaves softmax unchanged


def test_pcs_boundary_is_lowest_confidence_first():
    """PCS scores equal the max softmax; the boundary part lists the least confident points, lowest first."""
    rng = np.random.default_rng(5)
    classes, n_pool = 5, 60
    conf = rng.uniform(1 / classes + 0.01, 0.99, size=n_pool)
    logits = _logits_with_max_softmax(conf, classes, rng).astype(np.float32)
    pool = PoolEmbedding(rng.normal(size=(n_pool, 4)), logits)
    selector = PredictionConfidenceSelector("pcs", boundary_fraction=0.5)
    np.testing.assert_allclose(selector.score(pool, 0), conf, atol=1e-5)
    sel = selector.select(pool, budget=0.5, seed=0)
    n_b = round(0.5 * 30)
    np.testing.assert_array_equal(sel.indices[:n_b], np.argsort(conf)[:n_b])


# ---------------------------------------------------------------- latent clustering: blobs with midway points


@pytest.fixture(scope="module")
def blobs():
    """Three well separated Gaussian blobs in 4-D plus points exactly midway between two centres.

    ``features`` hides the midway points among the blob points; ``with_outliers`` appends three far outliers.
    """
    rng = np.random.default_rng(2024)
    dim, per_blob, sep = 4, 300, 10.0
    centres = np.zeros((3, dim))
    centres[1, 0] = sep
    centres[2, :2] = [sep / 2, sep * np.sqrt(3) / 2]  # an equilateral triangle
    points = [c + rng.normal(size=(per_blob, dim)) for c in centres]
    midway = np.array([(centres[i] + centres[j]) / 2 for i, j in [(0, 1), (0, 2), (1, 2), (0, 1), (1, 2)]])
    midway[3, 3] += 0.3  # distinct points, still on the bisecting hyperplane of their two centres
    midway[4, 2] -= 0.3
    features = np.concatenate(points + [midway])
    order = rng.permutation(len(features))  # hide the midway points among the others
    features = features[order]
    midway_idx = np.sort(np.argsort(order)[3 * per_blob:])
    outliers = np.array([[60.0, 60, 60, 60], [-50.0, 40, -45, 70], [30.0, -80, 20, -40]])
    with_outliers = np.concatenate([features, outliers])
    return dict(features=features.astype(np.float32), centres=centres, midway=midway_idx,
                with_outliers=with_outliers.astype(np.float32),
                outliers=np.arange(len(features), len(with_outliers)))


def _embedding(features):
    return PoolEmbedding(features, np.zeros((len(features), 3), dtype=np.float32))


def test_kmeans_margin_selects_exactly_the_midway_points(blobs):
    """LCS-KM with k = number of blobs, b = 1 and budget = #midway points picks exactly the midway points."""
    feats = blobs["features"]
    n_mid = len(blobs["midway"])
    selector = KMeansMarginSelector(boundary_fraction=1.0, n_clusters=3, nredo=5)
    sel = selector.select(_embedding(feats), budget=n_mid / len(feats), seed=0)
    assert len(sel.indices) == n_mid
    np.testing.assert_array_equal(np.sort(sel.indices), blobs["midway"])
    # scores agree with the selection: every midway margin is below every other margin
    others = np.setdiff1d(np.arange(len(feats)), blobs["midway"])
    assert sel.scores[blobs["midway"]].max() < sel.scores[others].min()


def test_two_nearest_distances_match_brute_force(blobs):
    """d1, d2 and d2 - d1 equal a numpy brute force against the same centroids; every point is assigned."""
    feats = blobs["features"]
    centroids = fit_kmeans(feats, 3, niter=25, nredo=5, seed=0)
    d1, d2, assign = two_nearest_distances(feats, centroids, batch_size=97)  # several batches
    dist = np.sqrt(((feats[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1))
    ordered = np.sort(dist, axis=1)
    np.testing.assert_allclose(d1, ordered[:, 0], atol=1e-4, rtol=1e-6)
    np.testing.assert_allclose(d2, ordered[:, 1], atol=1e-4, rtol=1e-6)
    np.testing.assert_allclose(d2 - d1, ordered[:, 1] - ordered[:, 0], atol=1e-4, rtol=1e-6)
    assert assign.shape == (len(feats),)
    np.testing.assert_array_equal(assign, dist.argmin(axis=1))
    # the fit found the three blobs (one centroid near each true centre)
    to_centre = np.sqrt(((centroids[:, None, :] - blobs["centres"][None]) ** 2).sum(-1))
    assert sorted(to_centre.argmin(axis=1).tolist()) == [0, 1, 2]
    assert to_centre.min(axis=1).max() < 0.3


def test_fit_kmeans_uses_every_point():
    """Centroids are fitted on all points: with many points per centroid they equal the exact cluster means."""
    rng = np.random.default_rng(1)
    k, per = 2, 2000  # > 256 points per centroid, where FAISS would subsample by default
    feats = np.concatenate([rng.normal(size=(per, 2)), rng.normal(size=(per, 2)) + 50]).astype(np.float32)
    centroids = fit_kmeans(feats, k, seed=0)
    means = np.stack([feats[:per].mean(0), feats[per:].mean(0)])
    got = centroids[np.argsort(centroids[:, 0])]
    np.testing.assert_allclose(got, means, atol=1e-3)


def test_fit_kmeans_same_seed_is_bit_identical(blobs):
    a = fit_kmeans(blobs["features"], 3, niter=10, nredo=2, seed=17)
    b = fit_kmeans(blobs["features"], 3, niter=10, nredo=2, seed=17)
    assert a.tobytes() == b.tobytes()


def test_fit_kmeans_more_clusters_than_points_raises():
    with pytest.raises(ConfigError):
        fit_kmeans(np.zeros((4, 2), dtype=np.float32), 5)


def test_kmeans_selector_needs_two_clusters():
    with pytest.raises(ConfigError, match="n_clusters"):
        KMeansMarginSelector(n_clusters=1)


def test_gmm_posterior_gap_puts_midway_points_first(blobs):
    """LCS-GMM posterior_gap: the points between two components have the smallest posterior gap."""
    feats = blobs["features"]
    n_mid = len(blobs["midway"])
    selector = GMMSelector(boundary_fraction=1.0, n_components=3, score="posterior_gap")
    sel = selector.select(_embedding(feats), budget=n_mid / len(feats), seed=0)
    np.testing.assert_array_equal(np.sort(sel.indices), blobs["midway"])
    assert np.all(sel.scores >= 0)


def test_gmm_posterior_gap_ranks_points_whose_posteriors_round_to_one():
    """Issue 13: on far-apart blobs every posterior rounds to exactly 1 and 0, so the gaps of posteriors all tie
    at 1.0 (and a stable sort took the pool in file order); the gap of log-posteriors still puts the points
    between two blobs (40% of the way, not on the bisector) first."""
    rng = np.random.default_rng(7)
    dim, per_blob, sep = 4, 200, 100.0
    centres = np.zeros((3, dim))
    centres[1, 0], centres[2, 1] = sep, sep
    pairs = [(0, 1), (0, 2), (1, 2), (1, 0), (2, 0), (2, 1)]
    between = np.array([centres[i] + 0.4 * (centres[j] - centres[i]) for i, j in pairs])
    features = np.concatenate([c + rng.normal(size=(per_blob, dim)) for c in centres] + [between])
    order = rng.permutation(len(features))
    features = features[order].astype(np.float32)
    between_idx = np.sort(np.argsort(order)[3 * per_blob:])
    selector = GMMSelector(boundary_fraction=1.0, n_components=3, score="posterior_gap", pca_dim=None,
                           max_fit_points=None)
    sel = selector.select(_embedding(features), budget=len(between) / len(features), seed=0)
    _, posteriors = selector.fitted_.score(features)
    top2 = np.sort(posteriors, axis=1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] == 1.0), "the posteriors tie: the case this guards"
    np.testing.assert_array_equal(np.sort(sel.indices), between_idx)


def test_gmm_loglik_puts_far_outliers_first_and_loglik_high_reverses(blobs):
    """loglik: the far outliers have the lowest likelihood and come first; loglik_high is the exact reverse."""
    feats = blobs["with_outliers"]
    pool = _embedding(feats)
    n_out = len(blobs["outliers"])
    low = GMMSelector(boundary_fraction=1.0, n_components=3, score="loglik")
    sel = low.select(pool, budget=n_out / len(feats), seed=0)
    np.testing.assert_array_equal(np.sort(sel.indices), blobs["outliers"])

    full_low = low.select(pool, budget=1.0, seed=0)
    full_high = GMMSelector(boundary_fraction=1.0, n_components=3, score="loglik_high").select(pool, 1.0, seed=0)
    np.testing.assert_array_equal(full_high.indices, full_low.indices[::-1])
    assert set(full_high.indices[-n_out:].tolist()) == set(blobs["outliers"].tolist())


def test_gmm_unknown_score_raises():
    with pytest.raises(ConfigError, match="score"):
        GMMSelector(score="entropy")


# ---------------------------------------------------------------- the select stage


def test_select_pool_writes_consistent_files(tmp_path, scores):
    """select_pool saves the selection, its scores and boundary mask, and reports the split of the counts."""
    pool = PoolEmbedding(np.zeros((40, 2)), np.zeros((40, 3)))
    info = select_pool(FixedScoreSelector(scores, 0.5), pool, 0.25, 3, tmp_path)
    indices = np.load(tmp_path / "selection.npy")
    is_boundary = np.load(tmp_path / "is_boundary.npy")
    assert info == {"candidates": 40, "selected": 10, "boundary": 5, "random": 5}
    np.testing.assert_array_equal(indices[:5], np.argsort(scores)[:5])
    np.testing.assert_array_equal(is_boundary, np.arange(10) < 5)
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), scores)
    assert np.load(tmp_path / "weights.npy").shape == (10,)


def test_gmm_posterior_gap_needs_two_components():
    """posterior_gap with a single component is a config error, found before any fitting."""
    with pytest.raises(ConfigError, match="n_components"):
        GMMSelector(boundary_fraction=1.0, n_components=1, score="posterior_gap")


@pytest.mark.parametrize("part", ["features", "logits"])
def test_select_stage_refuses_non_finite_embeddings_and_writes_nothing(tmp_path, part):
    rng = np.random.default_rng(0)
    arrays = {"features": rng.normal(size=(300, 8)).astype(np.float32),
              "logits": rng.normal(size=(300, 3)).astype(np.float32)}
    arrays[part][217, 1] = np.nan
    with pytest.raises(DataError, match=f"pool's {part} contain NaN or infinity at row 217"):
        select_pool(RandomSelector(), PoolEmbedding(**arrays), 0.2, seed=0, out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
