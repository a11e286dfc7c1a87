"""k-means with FAISS (on every GPU present, else CPU) from a k-means++ start, and the two-nearest-centroid
distances in batches.

FAISS alone starts from random points and, by default, trains on 256 points per centroid; here every point
trains the centroids and the start is k-means++ (Arthur and Vassilvitskii 2007, greedy variant as in
scikit-learn), so the objective matches scikit-learn's k-means++ at a fraction of the time.
"""

from __future__ import annotations

import math
from types import ModuleType

import numpy as np

from ssat.errors import ConfigError

# k-means++ seeding looks at this many points at most: enough for k centroids, cheap on pools of millions.
SEEDING_SAMPLE = 100_000

# faiss-cpu and faiss-gpu both install the module faiss (installing both leaves whichever wrote last), so the
# package depends on neither and each comes with an extra.
FAISS_MISSING = ("FAISS is not installed; install ssat with one of its FAISS extras: pip install -e '.[cpu]', "
                 "or '.[gpu]' (faiss-gpu) on a machine with CUDA 12 drivers")


def faiss_lib() -> ModuleType:
    """The faiss module, from whichever extra installed it."""
    try:
        import faiss
    except ImportError:
        raise ConfigError(FAISS_MISSING) from None
    return faiss


def gpu_count() -> int:
    """GPUs FAISS can use: 0 with the faiss-cpu wheel, or without CUDA devices."""
    faiss = faiss_lib()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def as_float32(x: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 view when possible (a float32 memory map is not copied), else a copy."""
    return np.ascontiguousarray(x, dtype=np.float32)


def _squared_distances(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return np.maximum((x * x).sum(1)[:, None] - 2 * x @ centers.T + (centers * centers).sum(1)[None, :], 0)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeds: each new centre is the best of 2 + log(k) candidates drawn by D^2 sampling."""
    n = len(x)
    trials = 2 + int(math.log(k))
    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    centers[0] = x[rng.integers(n)]
    closest = _squared_distances(x, centers[:1])[:, 0]
    for i in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: any point will do
            candidates = rng.integers(n, size=trials)
        else:
            candidates = np.searchsorted(np.cumsum(closest), rng.random(trials) * total).clip(max=n - 1)
        candidate_closest = np.minimum(closest[None, :], _squared_distances(x, x[candidates]).T)
        best = int(np.argmin(candidate_closest.sum(1)))
        centers[i] = x[candidates[best]]
        closest = candidate_closest[best]
    return centers


def fit_kmeans(features: np.ndarray, k: int, niter: int = 25, nredo: int = 1, seed: int = 0) -> np.ndarray:
    """Centroids (k, D): ``nredo`` runs of Lloyd's iterations on every point from k-means++ seeds, best kept."""
    x = as_float32(features)
    n, dim = x.shape
    if k > n:
        raise ConfigError(f"k-means with k={k} needs at least {k} points; the pool has {n}")
    rng = np.random.default_rng(seed)
    best, best_objective = None, math.inf
    for redo in range(max(1, nredo)):
        sample = x if n <= SEEDING_SAMPLE else x[np.sort(rng.choice(n, SEEDING_SAMPLE, replace=False))]
        seeds = kmeans_plus_plus(sample, k, rng)
        kmeans = faiss_lib().Kmeans(dim, k, niter=niter, seed=seed + redo, verbose=False,
                              max_points_per_centroid=math.ceil(n / k) + 1, gpu=gpu_count() > 0)
        kmeans.train(x, init_centroids=seeds)
        if kmeans.obj[-1] < best_objective:
            best, best_objective = kmeans.centroids.copy(), kmeans.obj[-1]
    return best


def two_nearest_distances(features: np.ndarray, centroids: np.ndarray, batch_size: int = 65536):
    """Euclidean distances d1 <= d2 to the two nearest centroids and the nearest one's index, for every point."""
    index = faiss_lib().IndexFlatL2(centroids.shape[1])
    index.add(as_float32(centroids))
    n = len(features)
    d1 = np.empty(n, dtype=np.float32)
    d2 = np.empty(n, dtype=np.float32)
    assign = np.empty(n, dtype=np.int64)
    for start in range(0, n, batch_size):
        squared, nearest = index.search(as_float32(features[start:start + batch_size]), 2)
        dist = np.sqrt(np.maximum(squared, 0.0))
        d1[start:start + len(dist)], d2[start:start + len(dist)] = dist[:, 0], dist[:, 1]
        assign[start:start + len(dist)] = nearest[:, 0]
    return d1, d2, assign


def inertia(features: np.ndarray, centroids: np.ndarray, batch_size: int = 65536) -> float:
    """Sum of squared distances to the nearest centroid (scikit-learn's objective), in batches."""
    index = faiss_lib().IndexFlatL2(centroids.shape[1])
    index.add(as_float32(centroids))
    total = 0.0
    for start in range(0, len(features), batch_size):
        squared, _ = index.search(as_float32(features[start:start + batch_size]), 1)
        total += float(np.maximum(squared, 0).sum(dtype=np.float64))
    return total
