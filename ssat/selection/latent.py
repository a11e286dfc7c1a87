"""Latent clustering selection (LCS): boundary points lie between clusters of the selection model's features."""

from __future__ import annotations

import numpy as np

from ssat.clustering.gmm import fit_gmm, gmm_log_likelihood_and_posteriors
from ssat.clustering.kmeans import fit_kmeans, two_nearest_distances
from ssat.errors import ConfigError
from ssat.selection.base import PoolEmbedding, Selector


class KMeansMarginSelector(Selector):
    """LCS-KM: margin d2 - d1 between the nearest and second-nearest k-means centroid, smallest first."""

    def __init__(self, name: str = "lcs_km", boundary_fraction: float = 0.4, n_clusters: int = 10,
                 niter: int = 25, nredo: int = 3):
        super().__init__(name, boundary_fraction)
        if n_clusters < 2:
            raise ConfigError(f"selector.n_clusters={n_clusters} must be at least 2 for a margin")
        self.n_clusters, self.niter, self.nredo = n_clusters, niter, nredo

    def score(self, pool: PoolEmbedding, seed: int) -> np.ndarray:
        centroids = fit_kmeans(pool.features, self.n_clusters, niter=self.niter, nredo=self.nredo, seed=seed)
        d1, d2, _ = two_nearest_distances(pool.features, centroids)
        return (d2 - d1).astype(np.float64)


GMM_SCORES = ("loglik", "loglik_high", "posterior_gap")


class GMMSelector(Selector):
    """LCS-GMM: a Gaussian mixture on the features; ``score`` says which points count as boundary.

    loglik: lowest log-likelihood first (the release); loglik_high: highest first (the older code);
    posterior_gap: smallest gap between the two largest posteriors first (the analogue of the k-means margin).
    """

    def __init__(self, name: str = "lcs_gmm", boundary_fraction: float = 0.4, n_components: int = 10,
                 covariance_type: str = "full", score: str = "loglik", max_iter: int = 100,
                 reg_covar: float = 1e-6):
        super().__init__(name, boundary_fraction)
        if score not in GMM_SCORES:
            raise ConfigError(f"selector.score={score!r} is not one of {', '.join(GMM_SCORES)}")
        if n_components < 2 and score == "posterior_gap":
            raise ConfigError(f"selector.n_components={n_components} must be at least 2 for score=posterior_gap")
        self.n_components, self.covariance_type, self.score_type = n_components, covariance_type, score
        self.max_iter, self.reg_covar = max_iter, reg_covar

    def score(self, pool: PoolEmbedding, seed: int) -> np.ndarray:
        gmm = fit_gmm(pool.features, self.n_components, self.covariance_type, self.max_iter, self.reg_covar, seed)
        loglik, posteriors = gmm_log_likelihood_and_posteriors(gmm, pool.features)
        if self.score_type == "loglik":
            return loglik
        if self.score_type == "loglik_high":
            return -loglik
        top2 = np.sort(posteriors, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
