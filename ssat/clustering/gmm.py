"""Gaussian mixtures on pool features (scikit-learn back-end), scored in batches."""

from __future__ import annotations

import numpy as np
from sklearn.mixture import GaussianMixture

from ssat.errors import ConfigError


def fit_gmm(features: np.ndarray, n_components: int, covariance_type: str = "full", max_iter: int = 100,
            reg_covar: float = 1e-6, seed: int = 0) -> GaussianMixture:
    """EM from a k-means initialisation; reg_covar keeps dead feature dimensions from breaking the covariance."""
    if n_components > len(features):
        raise ConfigError(f"a GMM with {n_components} components needs at least that many points; "
                          f"the pool has {len(features)}")
    gmm = GaussianMixture(n_components=n_components, covariance_type=covariance_type, max_iter=max_iter,
                          reg_covar=reg_covar, random_state=seed)
    return gmm.fit(np.asarray(features, dtype=np.float64))


def gmm_log_likelihood_and_posteriors(gmm: GaussianMixture, features: np.ndarray, batch_size: int = 65536):
    """Per-point log-likelihood (N,) and posteriors (N, K) without holding more than one batch in float64."""
    n = len(features)
    loglik = np.empty(n, dtype=np.float64)
    posteriors = np.empty((n, gmm.n_components), dtype=np.float64)
    for start in range(0, n, batch_size):
        x = np.asarray(features[start:start + batch_size], dtype=np.float64)
        loglik[start:start + len(x)] = gmm.score_samples(x)
        posteriors[start:start + len(x)] = gmm.predict_proba(x)
    return loglik, posteriors
