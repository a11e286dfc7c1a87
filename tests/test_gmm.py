"""Gaussian mixtures (torch EM against scikit-learn), batched scoring, PCA, bad input and the LCS-GMM selector."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

from ssat.clustering.gmm import FeatureRows, _nearest_centroid, fit_gmm
from ssat.clustering.pca import fit_pca
from ssat.errors import ConfigError, DataError
from ssat.selection import GMMSelector, PoolEmbedding


@pytest.fixture(scope="module")
def blobs():
    """Four anisotropic, unequal Gaussian blobs in 8-D (2000 points) and starting means near their centres."""
    rng = np.random.default_rng(7)
    k, dim, n = 4, 8, 2000
    centres = rng.normal(size=(k, dim)) * 4
    mixing = rng.normal(size=(k, dim, dim)) * 0.4
    labels = rng.choice(k, size=n, p=[0.4, 0.3, 0.2, 0.1])
    x = centres[labels] + np.einsum("nd,nde->ne", rng.normal(size=(n, dim)), mixing[labels])
    return dict(x=x.astype(np.float32), init=centres + rng.normal(size=centres.shape), k=k)


def sklearn_from(x: np.ndarray, init: np.ndarray, covariance_type: str, reg_covar: float = 1e-6, **kwargs):
    """scikit-learn's GaussianMixture started, as ours, from each point's nearest initial mean (hard resp)."""
    x = x.astype(np.float64)
    labels = ((x[:, None, :] - init[None]) ** 2).sum(-1).argmin(1)
    k, dim = init.shape
    weights = np.bincount(labels, minlength=k) / len(x)
    means = np.stack([x[labels == j].mean(0) for j in range(k)])
    if covariance_type == "full":
        precisions = np.stack([np.linalg.inv(np.cov(x[labels == j].T, bias=True) + reg_covar * np.eye(dim))
                               for j in range(k)])
        precisions = 0.5 * (precisions + precisions.transpose(0, 2, 1))
    else:
        precisions = np.stack([1 / (x[labels == j].var(0) + reg_covar) for j in range(k)])
    gmm = GaussianMixture(k, covariance_type=covariance_type, reg_covar=reg_covar, weights_init=weights,
                          means_init=means, precisions_init=precisions, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning when tol=0
        return gmm.fit(x)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_torch_em_matches_sklearn_from_the_same_start(blobs, covariance_type):
    """Same start: same iterations, mean log-likelihood, per-point log-likelihoods, posteriors and parameters."""
    x = blobs["x"]
    ours = fit_gmm(x, blobs["k"], covariance_type, init_means=blobs["init"], device="cpu")
    ref = sklearn_from(x, blobs["init"], covariance_type)
    x64 = x.astype(np.float64)
    assert ours.n_iter == ref.n_iter_ and ours.converged and ref.converged_
    assert abs(ours.mean_log_likelihood - ref.score(x64)) < 1e-3 * abs(ref.score(x64))
    loglik, posteriors = ours.score(x)
    np.testing.assert_allclose(loglik, ref.score_samples(x64), rtol=1e-5, atol=1e-3)
    assert np.abs(posteriors - ref.predict_proba(x64)).max() < 1e-4
    np.testing.assert_allclose(ours.means, ref.means_, atol=1e-4)
    np.testing.assert_allclose(ours.weights, ref.weights_, atol=1e-6)
    np.testing.assert_allclose(ours.covariances, ref.covariances_, rtol=1e-4, atol=1e-4)
    assert ours.covariances.shape == ((4, 8, 8) if covariance_type == "full" else (4, 8))


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_sklearn_backend_is_sklearn_from_the_same_start(blobs, covariance_type):
    """backend=sklearn returns scikit-learn's own fit and scores; tol=0 runs every iteration, as for torch."""
    x = blobs["x"]
    ours = fit_gmm(x, blobs["k"], covariance_type, max_iter=4, tol=0.0, init_means=blobs["init"], backend="sklearn")
    torch_fit = fit_gmm(x, blobs["k"], covariance_type, max_iter=4, tol=0.0, init_means=blobs["init"])
    ref = sklearn_from(x, blobs["init"], covariance_type, max_iter=4, tol=0.0)
    assert ours.n_iter == torch_fit.n_iter == 4 and not ours.converged and not torch_fit.converged
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(ours.mean_log_likelihood, ref.score(x64), rtol=1e-10)
    loglik, posteriors = ours.score(x, batch_size=333)
    np.testing.assert_allclose(loglik, ref.score_samples(x64), rtol=1e-10)
    np.testing.assert_allclose(posteriors, ref.predict_proba(x64), atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_score_in_batches_equals_score_in_one_batch(blobs, backend):
    x = blobs["x"]
    fit = fit_gmm(x, blobs["k"], init_means=blobs["init"], backend=backend)
    loglik_small, posteriors_small = fit.score(x, batch_size=7)
    loglik, posteriors = fit.score(x, batch_size=len(x))
    # rows are scored independently; only float32 rounding in matmuls of other shapes may differ
    np.testing.assert_allclose(loglik_small, loglik, rtol=0, atol=1e-4)
    np.testing.assert_allclose(posteriors_small, posteriors, rtol=0, atol=1e-5)
    assert loglik.dtype == posteriors.dtype == np.float64 and posteriors.shape == (len(x), blobs["k"])
    np.testing.assert_allclose(posteriors.sum(1), 1.0)
    np.testing.assert_allclose(loglik.mean(), fit.mean_log_likelihood, rtol=1e-6)


def test_fit_in_small_batches_equals_one_batch(blobs):
    """The EM sums over batches, so the batch size changes nothing but rounding."""
    x = blobs["x"]
    small = fit_gmm(x, blobs["k"], init_means=blobs["init"], batch_size=64)
    whole = fit_gmm(x, blobs["k"], init_means=blobs["init"], batch_size=len(x))
    assert small.n_iter == whole.n_iter
    np.testing.assert_allclose(small.means, whole.means, atol=1e-5)
    np.testing.assert_allclose(small.mean_log_likelihood, whole.mean_log_likelihood, rtol=1e-7)


def test_read_only_float16_memmap_without_warnings(blobs, tmp_path):
    """A read-only memory map (float32 and float16) is fitted and scored without a warning or a write."""
    x = blobs["x"]
    for dtype in (np.float32, np.float16):
        np.save(tmp_path / "f.npy", x.astype(dtype))
        features = np.load(tmp_path / "f.npy", mmap_mode="r")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fit = fit_gmm(features, blobs["k"], init_means=blobs["init"])
            loglik, _ = fit.score(features)
        reference = fit_gmm(features.astype(np.float32), blobs["k"], init_means=blobs["init"])
        np.testing.assert_allclose(fit.mean_log_likelihood, reference.mean_log_likelihood, rtol=1e-7)
        assert np.isfinite(loglik).all()


def test_kmeans_start_finds_the_blobs(blobs):
    """Without init_means the start is FAISS k-means: the fit recovers the blob weights."""
    fit = fit_gmm(blobs["x"], blobs["k"], seed=0)
    np.testing.assert_allclose(np.sort(fit.weights), [0.1, 0.2, 0.3, 0.4], atol=0.03)


# ---------------------------------------------------------------- PCA


@pytest.fixture(scope="module")
def correlated():
    """600 points in 12-D with distinct variances along random directions and a large offset."""
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    x = (rng.normal(size=(600, 12)) * np.linspace(5, 0.2, 12)) @ basis.T + 100
    return x.astype(np.float32)


def test_pca_matches_sklearn_up_to_sign(correlated):
    """Orthonormal components; explained variance, components and coordinates as sklearn's PCA (up to sign)."""
    projection = fit_pca(correlated, 5, batch_size=7, device="cpu")
    ref = PCA(5).fit(correlated.astype(np.float64))
    c = projection.components
    np.testing.assert_allclose(c @ c.T, np.eye(5), atol=1e-10)
    np.testing.assert_allclose(projection.explained_variance, ref.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(np.abs((c * ref.components_).sum(1)), 1.0, atol=1e-6)
    signs = np.sign((c * ref.components_).sum(1))
    np.testing.assert_allclose(projection.transform(correlated, batch_size=11) * signs,
                               ref.transform(correlated.astype(np.float64)), atol=1e-3)
    np.testing.assert_allclose(projection.mean, correlated.astype(np.float64).mean(0), rtol=1e-9)


def test_pca_matches_numpy_svd(correlated):
    x = correlated.astype(np.float64)
    centred = x - x.mean(0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    projection = fit_pca(correlated, 3)
    np.testing.assert_allclose(projection.explained_variance, singular[:3] ** 2 / (len(x) - 1), rtol=1e-6)
    np.testing.assert_allclose(np.abs((projection.components * vt[:3]).sum(1)), 1.0, atol=1e-6)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinity_is_a_data_error_naming_the_row(blobs, bad):
    x = blobs["x"].copy()
    x[1234, 3] = bad
    with pytest.raises(DataError, match="row 1234"):
        fit_gmm(x, blobs["k"], batch_size=500)
    with pytest.raises(DataError, match="row 1234"):
        fit_pca(x, 2)
    with pytest.raises(DataError, match="row 1234"):
        fit_gmm(blobs["x"], blobs["k"], init_means=blobs["init"]).score(x)


@pytest.mark.parametrize("kwargs, key", [
    (dict(covariance_type="spherical"), r"selector\.covariance_type='spherical' is not one of full, diag"),
    (dict(backend="cuml"), r"selector\.backend='cuml' is not one of torch, sklearn"),
    (dict(n_components=2001), r"selector\.n_components=2001"),
    (dict(n_components=0), r"selector\.n_components=0"),
    (dict(max_iter=0), r"selector\.max_iter=0"),
    (dict(tol=-1.0), r"selector\.tol=-1.0"),
    (dict(reg_covar=-1e-6), r"selector\.reg_covar"),
])
def test_bad_options_are_config_errors_naming_the_key(blobs, kwargs, key):
    options = dict(n_components=blobs["k"]) | kwargs
    with pytest.raises(ConfigError, match=key):
        fit_gmm(blobs["x"], **options)


@pytest.mark.parametrize("kwargs, key", [
    (dict(covariance_type="tied"), r"selector\.covariance_type"),
    (dict(backend="faiss"), r"selector\.backend"),
    (dict(pca_dim=0), r"selector\.pca_dim"),
    (dict(max_fit_points=5, n_components=10), r"selector\.max_fit_points"),
])
def test_selector_rejects_bad_options_before_fitting(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        GMMSelector(**kwargs)


def test_pca_dim_above_the_feature_dimension_is_a_config_error(correlated):
    with pytest.raises(ConfigError, match=r"selector\.pca_dim=13"):
        fit_pca(correlated, 13)


# ---------------------------------------------------------------- the selector


@pytest.fixture(scope="module")
def midway_blobs():
    """Three blobs in 16-D (300 points each) and 5 points exactly midway between two centres, hidden among them."""
    rng = np.random.default_rng(11)
    dim, per_blob = 16, 300
    centres = rng.normal(size=(3, dim))
    centres *= 12 / np.linalg.norm(centres[:, None] - centres[None], axis=-1).max()
    points = [c + rng.normal(size=(per_blob, dim)) for c in centres]
    midway = np.array([(centres[i] + centres[j]) / 2 for i, j in [(0, 1), (0, 2), (1, 2), (0, 1), (1, 2)]])
    features = np.concatenate(points + [midway])
    order = rng.permutation(len(features))
    return features[order].astype(np.float32), np.sort(np.argsort(order)[3 * per_blob:])


@pytest.mark.parametrize("options", [
    dict(backend="torch", pca_dim=4),
    dict(backend="torch", pca_dim=4, max_fit_points=500),
    dict(backend="sklearn", pca_dim=4),
    dict(backend="sklearn", pca_dim=None, max_fit_points=None),
    dict(backend="torch", covariance_type="diag", pca_dim=None),
])
def test_selector_posterior_gap_puts_midway_points_first(midway_blobs, options):
    features, midway = midway_blobs
    selector = GMMSelector(boundary_fraction=1.0, n_components=3, score="posterior_gap", **options)
    pool = PoolEmbedding(features, np.zeros((len(features), 3), dtype=np.float32))
    selection = selector.select(pool, budget=len(midway) / len(features), seed=0)
    np.testing.assert_array_equal(np.sort(selection.indices), midway)
    fitted_rows = selector.reduce(features, seed=0)
    assert fitted_rows.shape == (min(len(features), options.get("max_fit_points") or len(features)),
                                 options["pca_dim"] or features.shape[1])
    assert selector.fitted_.means.shape == (3, fitted_rows.shape[1])


def test_selector_backends_agree(midway_blobs):
    """Both back-ends start from the same k-means fit, so they score the pool alike."""
    features, _ = midway_blobs
    pool = PoolEmbedding(features, np.zeros((len(features), 3), dtype=np.float32))
    scores = [GMMSelector(n_components=3, pca_dim=6, backend=backend).score(pool, seed=1)
              for backend in ("torch", "sklearn")]
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5, atol=1e-4)


def test_collinear_features_fit_as_in_float64():
    """Features of rank 6 in 40-D: float32-summed statistics would leave covariances indefinite beyond reg_covar."""
    rng = np.random.default_rng(5)
    labels = rng.integers(3, size=4000)
    latent = rng.normal(size=(3, 6))[labels] * 4 + rng.normal(size=(4000, 6))
    x = (latent @ rng.normal(size=(6, 40)) + 3).astype(np.float32)
    init = np.stack([x[labels == j].mean(0) for j in range(3)])
    ours = fit_gmm(x, 3, init_means=init)
    ref = sklearn_from(x, init.astype(np.float64), "full")
    np.testing.assert_allclose(ours.mean_log_likelihood, ref.score(x.astype(np.float64)), rtol=1e-5)


def test_nearest_centroid_matches_brute_force_far_from_the_origin():
    """The one-matmul assignment that starts EM, on features offset by 1e4 (where |x|^2 - 2 x.c + |c|^2 in float32
    without centring loses the differences between centroids)."""
    rng = np.random.default_rng(3)
    centroids = rng.normal(size=(8, 16)).astype(np.float32) + 1e4
    x = (centroids[rng.integers(8, size=3000)] + rng.normal(scale=0.8, size=(3000, 16))).astype(np.float32)
    brute = ((x[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    labels = _nearest_centroid(FeatureRows(x, 1024, torch.device("cpu")), centroids)
    assert (labels == brute).mean() > 0.999


@pytest.mark.parametrize("dim, spectral", [(256, False), (64, True)])
def test_pruned_e_step_and_whitened_m_step_equal_the_exact_ones(dim, spectral):
    """The fit's E-step leaves out components more than PRUNE_LOG_RATIO nats below a row's best and sums whitened
    rows: with two nearly coinciding components (many rows split their responsibility) and a third 30-70 nats
    away from them, its log-likelihoods and the M-step that follows equal the exact E-step's (every component)
    and the raw-coordinate float64 sums', both for the head bound (256-D: four coordinate blocks) and for the
    spectral bound (64-D: one block)."""
    from ssat.clustering.gmm import _SufficientStatistics, _TorchMixture, _WhitenedStatistics

    rng = np.random.default_rng(0)
    n = 3000
    means = np.zeros((3, dim))
    means[1, 0], means[2, :4] = 0.5, 5.0
    mixing = np.eye(dim) + rng.normal(scale=0.3 / np.sqrt(dim), size=(3, dim, dim))
    mixing[1] = mixing[0]  # the same covariance: the log-ratio of 0 and 1 is linear in x, of spread about 0.5
    covariances = mixing @ mixing.transpose(0, 2, 1)
    labels = rng.choice(3, size=n, p=[0.4, 0.4, 0.2])
    x = torch.as_tensor(means[labels] + np.einsum("nd,nde->ne", rng.normal(size=(n, dim)), mixing[labels]),
                        dtype=torch.float32)
    mixture = _TorchMixture(*(torch.as_tensor(a, dtype=torch.float64) for a in ([0.4, 0.4, 0.2], means, covariances)),
                            "full")
    assert mixture.prunes and mixture.spectral == spectral
    with torch.no_grad():
        exact_loglik, resp = mixture.log_prob(x)
        assert ((resp > 1e-3) & (resp < 0.999)).any(1).float().mean() > 0.3  # the overlap is real
        exact = _SufficientStatistics(mixture.means32, "full")
        exact.add(x, resp)
        whitened = _WhitenedStatistics(mixture)
        loglik = mixture.e_step(x, whitened)
    np.testing.assert_allclose(loglik.numpy(), exact_loglik.numpy(), rtol=1e-6)
    for ours, reference in zip(whitened.m_step(1e-6), exact.m_step(1e-6)):
        np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-5, atol=1e-5)
