"""k-means with FAISS (on every GPU present, else CPU) and the two-nearest-centroid distances in batches."""

from __future__ import annotations

import math

import faiss
import numpy as np

from ssat.errors import ConfigError


def gpu_count() -> int:
    """GPUs FAISS can use: 0 with the faiss-cpu wheel, or without CUDA devices."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def fit_kmeans(features: np.ndarray, k: int, niter: int = 25, nredo: int = 1, seed: int = 0) -> np.ndarray:
    """Centroids (k, D) fitted on every point (FAISS otherwise subsamples 256 points per centroid)."""
    x = _float32(features)
    n, dim = x.shape
    if k > n:
        raise ConfigError(f"k-means with k={k} needs at least {k} points; the pool has {n}")
    kmeans = faiss.Kmeans(dim, k, niter=niter, nredo=nredo, seed=seed, verbose=False,
                          max_points_per_centroid=math.ceil(n / k) + 1, gpu=gpu_count() > 0)
    kmeans.train(x)
    return kmeans.centroids.copy()


def two_nearest_distances(features: np.ndarray, centroids: np.ndarray, batch_size: int = 65536):
    """Euclidean distances d1 <= d2 to the two nearest centroids and the nearest one's index, for every point."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(_float32(centroids))
    n = len(features)
    d1 = np.empty(n, dtype=np.float32)
    d2 = np.empty(n, dtype=np.float32)
    assign = np.empty(n, dtype=np.int64)
    for start in range(0, n, batch_size):
        squared, nearest = index.search(_float32(features[start:start + batch_size]), 2)
        dist = np.sqrt(np.maximum(squared, 0.0))
        d1[start:start + len(dist)], d2[start:start + len(dist)] = dist[:, 0], dist[:, 1]
        assign[start:start + len(dist)] = nearest[:, 0]
    return d1, d2, assign
