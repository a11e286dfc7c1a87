"""Latent clustering selection (LCS): boundary points lie between clusters of the selection model's features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssat.clustering.blocks import sample_rows, take_rows
from ssat.clustering.gmm import check_gmm_options, fit_gmm
from ssat.clustering.kmeans import SEEDING_SAMPLE, fit_kmeans_margins
from ssat.clustering.pca import fit_pca
from ssat.errors import ConfigError
from ssat.selection.base import PoolEmbedding, Selector


@dataclass
class KMeansFit:
    """The clustering behind the last k-means score, kept for reports and benchmarks."""

    centroids: np.ndarray
    inertia: float
    passes: int = 0  # streamed Lloyd passes over every row after the sample's restarts (0: no sample)
    pass_inertia: tuple[float, ...] = ()  # the objective on every row after each of them


class KMeansMarginSelector(Selector):
    """LCS-KM: margin d2 - d1 between the nearest and second-nearest k-means centroid, smallest first.

    A pool larger than ``sample_size`` runs its restarts on that many rows drawn at random, then streamed Lloyd
    passes over every row (at most ``max_passes``, null: niter) until one lowers the objective by less than
    1e-4 of it; the margins come from the last pass (ssat.clustering.kmeans).
    """

    def __init__(self, name: str = "lcs_km", boundary_fraction: float = 0.4, n_clusters: int = 10,
                 niter: int = 25, nredo: int = 3, sample_size: int = SEEDING_SAMPLE, max_passes: int | None = None,
                 class_balanced: bool = False, **reselection):
        super().__init__(name, boundary_fraction, class_balanced, **reselection)
        if n_clusters < 2:
            raise ConfigError(f"selector.n_clusters={n_clusters} must be at least 2 for a margin")
        if sample_size < n_clusters:
            raise ConfigError(f"selector.sample_size={sample_size} must be at least selector.n_clusters={n_clusters}")
        if max_passes is not None and max_passes < 1:
            raise ConfigError(f"selector.max_passes={max_passes} must be at least 1 (null: niter)")
        self.n_clusters, self.niter, self.nredo = n_clusters, niter, nredo
        self.sample_size, self.max_passes = sample_size, max_passes

    def score(self, pool: PoolEmbedding, seed: int) -> np.ndarray:
        fit = fit_kmeans_margins(pool.features, self.n_clusters, niter=self.niter, nredo=self.nredo, seed=seed,
                                 sample_size=self.sample_size, max_passes=self.max_passes)
        self.fitted_ = KMeansFit(fit.centroids, fit.inertia, fit.passes, tuple(fit.pass_inertia))
        return (fit.d2 - fit.d1).astype(np.float64)


GMM_SCORES = ("loglik", "loglik_high", "posterior_gap")


class GMMSelector(Selector):
    """LCS-GMM: a Gaussian mixture on the features; ``score`` says which points count as boundary.

    loglik: lowest log-likelihood first (the release); loglik_high: highest first (the older code);
    posterior_gap: smallest gap between the two largest log-posteriors first (the analogue of the k-means margin;
    the posteriors themselves round to 1 and 0 away from a boundary, and would all tie).

    The defaults are the release's method (TrustMLRG/EfficientSSAT: scikit-learn's GaussianMixture, full
    covariance, on the raw features of every row). A full-covariance mixture costs O(N K D^2) per EM iteration, so
    two speed options deviate from it: ``pca_dim`` projects the features on their top principal components first
    (which changes the scores: the dropped low-variance directions are those a full-covariance log-likelihood
    weighs most) and ``max_fit_points`` fits the PCA and the mixture on that many rows drawn at random (one
    streamed pass reads them); every row is then scored in a second streamed pass, so a memory-mapped pool larger
    than RAM needs memory for the sample and per-row scores only.
    """

    def __init__(self, name: str = "lcs_gmm", boundary_fraction: float = 0.4, n_components: int = 10,
                 covariance_type: str = "full", score: str = "loglik", max_iter: int = 100,
                 reg_covar: float = 1e-6, tol: float = 1e-3, backend: str = "torch", pca_dim: int | None = None,
                 max_fit_points: int | None = None, batch_size: int = 65536, device: str | None = None,
                 class_balanced: bool = False, **reselection):
        super().__init__(name, boundary_fraction, class_balanced, **reselection)
        if score not in GMM_SCORES:
            raise ConfigError(f"selector.score={score!r} is not one of {', '.join(GMM_SCORES)}")
        if n_components < 2 and score == "posterior_gap":
            raise ConfigError(f"selector.n_components={n_components} must be at least 2 for score=posterior_gap")
        check_gmm_options(n_components, covariance_type, backend, max_iter, tol, reg_covar, batch_size)
        if pca_dim is not None and pca_dim < 1:
            raise ConfigError(f"selector.pca_dim={pca_dim} must be at least 1 (null: no PCA)")
        if max_fit_points is not None and max_fit_points < n_components:
            raise ConfigError(f"selector.max_fit_points={max_fit_points} must be at least "
                              f"selector.n_components={n_components} (null: every row)")
        self.n_components, self.covariance_type, self.score_type = n_components, covariance_type, score
        self.max_iter, self.reg_covar, self.tol, self.backend = max_iter, reg_covar, tol, backend
        self.pca_dim, self.max_fit_points, self.batch_size, self.device = pca_dim, max_fit_points, batch_size, device

    def fit_rows(self, n: int, seed: int) -> np.ndarray | None:
        """The rows the mixture (and PCA) are fitted on: None (all), or max_fit_points drawn at random, in file
        order."""
        if self.max_fit_points is None or n <= self.max_fit_points:
            return None
        return sample_rows(n, self.max_fit_points, seed)

    def reduce(self, features: np.ndarray, seed: int = 0) -> np.ndarray:
        """Exactly the (projected) rows ``score`` fits the mixture on with this seed; the PCA, if any, fitted on
        them is kept in ``projection_``."""
        rows = self.fit_rows(len(features), seed)
        fit_on = features if rows is None else take_rows(features, rows, self.batch_size)
        self.projection_ = None
        if self.pca_dim is None or self.pca_dim >= features.shape[1]:
            return fit_on
        self.projection_ = fit_pca(fit_on, self.pca_dim, self.batch_size, self.device)
        return self.projection_.transform(fit_on, self.batch_size, self.device)

    def score(self, pool: PoolEmbedding, seed: int) -> np.ndarray:
        """Fit on the rows of ``reduce``; then every row is scored, streamed (read a block at a time, projected
        on the fly), unless the fit's last pass already scored every row."""
        fit_on = self.reduce(pool.features, seed)
        self.fitted_ = fit_gmm(fit_on, self.n_components, self.covariance_type,
                               max_iter=self.max_iter, tol=self.tol, reg_covar=self.reg_covar, seed=seed,
                               backend=self.backend, device=self.device, batch_size=self.batch_size)
        kind = "posterior_gap" if self.score_type == "posterior_gap" else "loglik"
        if len(fit_on) == len(pool.features) and kind == "loglik" and self.fitted_.log_likelihoods is not None:
            loglik = self.fitted_.log_likelihoods  # the fit's last pass scored every row
        else:
            loglik = self.fitted_.row_scores(pool.features, kind, self.batch_size, self.device, self.projection_)
        return loglik if self.score_type != "loglik_high" else -loglik
