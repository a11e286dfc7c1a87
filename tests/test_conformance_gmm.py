"""LCS-GMM against its references: the release's scikit-learn GaussianMixture call and its default method.

The release (TrustMLRG/EfficientSSAT, datasets.py, lcs-gmm) fits ``GaussianMixture(n_components=k,
random_state=seed)`` (scikit-learn's defaults: full covariance, reg_covar 1e-6, tol 1e-3, max_iter 100, k-means
start) on the raw penultimate features of every pool row and puts the lowest ``score_samples`` first. The
references here are scikit-learn itself and log-densities written out in numpy; nothing of ssat's GMM code.
"""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from sklearn.mixture import GaussianMixture

from ssat.config import build
from ssat.selection import GMMSelector, PoolEmbedding

K = 3


def blobs_with_boundary(dim: int, n_per: int = 700, seed: int = 0, separation: float = 10.0) -> np.ndarray:
    """K anisotropic blobs in dim-D, close enough that a few per cent of the points lie between two of them (their
    two largest posteriors are not yet rounded to 1 and 0)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, dim))
    centres *= separation / np.linalg.norm(centres[:, None] - centres[None], axis=-1).max()
    mixing = [np.diag(rng.uniform(0.5, 1.5, size=dim)) + rng.normal(scale=0.3 / np.sqrt(dim), size=(dim, dim))
              for _ in range(K)]
    parts = [c + rng.standard_normal((n_per, dim)) @ m for c, m in zip(centres, mixing)]
    return rng.permutation(np.concatenate(parts)).astype(np.float32)


def release_gmm(features: np.ndarray, seed: int = 0) -> GaussianMixture:
    """The release's call, verbatim in its arguments: scikit-learn's defaults."""
    return GaussianMixture(n_components=K, random_state=seed).fit(features.astype(np.float64))


def weighted_log_probs(gmm: GaussianMixture, x: np.ndarray) -> np.ndarray:
    """log w_k + log N(x; mu_k, Sigma_k), (N, K), written out from the fitted parameters in numpy."""
    x = x.astype(np.float64)
    out = np.empty((len(x), gmm.n_components))
    for k in range(gmm.n_components):
        chol = np.linalg.cholesky(gmm.covariances_[k])
        z = np.linalg.solve(chol, (x - gmm.means_[k]).T)
        log_det = 2 * np.log(np.diag(chol)).sum()
        out[:, k] = np.log(gmm.weights_[k]) - 0.5 * ((z ** 2).sum(0) + log_det + x.shape[1] * np.log(2 * np.pi))
    return out


def reference_scores(gmm: GaussianMixture, x: np.ndarray, score: str) -> np.ndarray:
    """Each score from the reference's log-probabilities, smallest = most boundary-like first."""
    weighted = weighted_log_probs(gmm, x)
    loglik = np.logaddexp.reduce(weighted, axis=1)
    if score == "loglik":
        return loglik
    if score == "loglik_high":
        return -loglik
    top2 = np.sort(weighted, axis=1)[:, -2:]  # the log-posteriors' gap is that of the log-probabilities
    return top2[:, 1] - top2[:, 0]


def boundary_set(scores: np.ndarray, n_b: int) -> set:
    return set(np.argsort(scores, kind="stable")[:n_b].tolist())


def composed_selector(*overrides: str) -> GMMSelector:
    with initialize_config_module(config_module="ssat.conf", version_base="1.3"):
        cfg = compose("config", overrides=["selector=lcs_gmm", f"selector.n_components={K}", *overrides])
    return build(cfg.selector)


def ssat_boundary(selector: GMMSelector, features: np.ndarray, n_b: int) -> set:
    selector.boundary_fraction = 1.0
    pool = PoolEmbedding(features, np.zeros((len(features), K), dtype=np.float32))
    return set(selector.select(pool, budget=n_b / len(features), seed=0).indices.tolist())


@pytest.mark.parametrize("score", ["loglik", "loglik_high", "posterior_gap"])
def test_boundary_set_is_the_release_gaussian_mixture_s(score):
    """Reference: the release's ``GaussianMixture(n_components=k, random_state=seed)`` on the raw features of
    every row (loglik: lowest score_samples first, as the release; loglik_high: highest first, the older code;
    posterior_gap: smallest gap between the two largest log-posteriors, from log-densities written out in
    numpy). The blobs are separated enough that scikit-learn's k-means (the release's start) and ssat's give the
    same hard assignment, so both EMs start alike (equal iteration counts say so). 200-D, so that the whitening
    runs on four coordinate blocks and the fit's E-step prunes components; ssat's selector is composed from the
    real config tree with its defaults. The first n_b of both orders are the same points."""
    features = blobs_with_boundary(dim=200)
    reference = release_gmm(features)
    assert reference.converged_
    n_b = 60  # 3% of the pool
    expected = boundary_set(reference_scores(reference, features, score), n_b)
    selector = composed_selector(f"selector.score={score}")
    assert ssat_boundary(selector, features, n_b) == expected
    assert selector.fitted_.n_iter == reference.n_iter_
    np.testing.assert_allclose(np.sort(selector.fitted_.weights), np.sort(reference.weights_), atol=1e-6)


@pytest.mark.parametrize("separation", [10.0, 0.5])
def test_log_likelihoods_equal_scikit_learn_s_from_the_same_start(separation):
    """Reference: scikit-learn's GaussianMixture started, as ssat's torch EM, from the hard assignment of every
    row to its nearest of the same initial means. In 200-D (four coordinate blocks: the fit's E-step prunes and
    its M-step sums whitened rows) the iterations, every row's log-likelihood (the fit's own and the scoring
    pass's), the posteriors and the parameters agree to float32 rounding; on separated blobs and on overlapping
    ones (separation 0.5, where many rows share their responsibility and pruning has to keep both components)."""
    from ssat.clustering.gmm import fit_gmm

    rng = np.random.default_rng(4)
    features = blobs_with_boundary(dim=200, seed=4, separation=separation)
    init = features[rng.choice(len(features), K, replace=False)].astype(np.float64)
    x = features.astype(np.float64)
    labels = ((x[:, None, :] - init[None]) ** 2).sum(-1).argmin(1)
    weights = np.bincount(labels, minlength=K) / len(x)
    means = np.stack([x[labels == k].mean(0) for k in range(K)])
    precisions = np.stack([np.linalg.inv(np.cov(x[labels == k].T, bias=True) + 1e-6 * np.eye(x.shape[1]))
                           for k in range(K)])
    reference = GaussianMixture(K, weights_init=weights, means_init=means,
                                precisions_init=0.5 * (precisions + precisions.transpose(0, 2, 1))).fit(x)
    ours = fit_gmm(features, K, init_means=init, device="cpu")
    assert ours.n_iter == reference.n_iter_
    np.testing.assert_allclose(ours.log_likelihoods, reference.score_samples(x), rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(ours.mean_log_likelihood, reference.score(x), rtol=1e-7)
    np.testing.assert_allclose(ours.means, reference.means_, atol=1e-4)
    np.testing.assert_allclose(ours.covariances, reference.covariances_, rtol=1e-4, atol=1e-5)
    loglik, posteriors = ours.score(features)
    np.testing.assert_allclose(loglik, reference.score_samples(x), rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(posteriors, reference.predict_proba(x), atol=1e-5)


def test_default_config_is_the_release_s_method():
    """Reference: the release's GaussianMixture call, i.e. scikit-learn's defaults, on the raw features of every
    row: the selector composed from ssat/conf/selector/lcs_gmm.yaml projects nothing and samples no rows."""
    selector = composed_selector()
    defaults = GaussianMixture().get_params()
    assert selector.pca_dim is None and selector.max_fit_points is None
    assert selector.score_type == "loglik"
    assert (selector.covariance_type, selector.reg_covar, selector.tol, selector.max_iter) == (
        defaults["covariance_type"], defaults["reg_covar"], defaults["tol"], defaults["max_iter"])
    features = np.random.default_rng(0).normal(size=(500, 70)).astype(np.float32)
    assert selector.reduce(features).shape == features.shape


def low_variance_outliers(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """96-D: three blobs spread over 64 high-variance coordinates, 32 more of standard deviation 0.01. Eight
    points are typical in the first 64 and 10 standard deviations off in four of the last 32: to a
    full-covariance mixture on the raw features they are the least likely points; PCA to 64 drops exactly
    those directions."""
    rng = np.random.default_rng(seed)
    n_per, high, low = 1000, 64, 32
    centres = np.concatenate([rng.normal(scale=3.0, size=(K, high)), np.zeros((K, low))], axis=1)
    scale = np.concatenate([np.ones(high), np.full(low, 0.01)])
    labels = rng.integers(K, size=K * n_per)
    x = centres[labels] + rng.standard_normal((len(labels), high + low)) * scale
    outliers = rng.choice(len(x), 8, replace=False)
    for i in outliers:
        x[i, high + rng.choice(low, 4, replace=False)] += 0.1 * rng.choice([-1, 1], size=4)
    return x.astype(np.float32), np.sort(outliers)


def test_release_fit_finds_outliers_that_pca_hides():
    """Reference: the release's method (raw features, every row), and the points its log-likelihood puts first
    by construction. The default selects the eight points unusual only in low-variance directions; the PCA
    speed option (selector.pca_dim=64, which keeps the 64 high-variance directions) misses them."""
    features, outliers = low_variance_outliers()
    reference = release_gmm(features)
    assert boundary_set(reference.score_samples(features.astype(np.float64)), 8) == set(outliers.tolist())
    default = ssat_boundary(composed_selector(), features, 8)
    assert default == set(outliers.tolist())
    with_pca = ssat_boundary(composed_selector("selector.pca_dim=64"), features, 8)
    assert len(with_pca & set(outliers.tolist())) <= 2
