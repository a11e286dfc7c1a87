"""k-means with FAISS (on every GPU present, else CPU) from a k-means++ start, and the two-nearest-centroid
distances in batches.

FAISS alone starts from random points and, by default, trains on 256 points per centroid; here every point
trains the centroids and the start is k-means++ (Arthur and Vassilvitskii 2007, greedy variant as in
scikit-learn), so the objective matches scikit-learn's k-means++.

A pool of more than ``sample_size`` rows is clustered in two steps: the restarts (seeding and Lloyd's iterations
by FAISS) run on a uniform sample of sample_size rows, the best of them by the sample's objective is kept, and
Lloyd's iterations then continue on every row in streamed passes (a block of rows at a time, so a memory map
larger than RAM goes through the page cache) until a pass lowers the objective by less than ``tol`` of it. Each
pass also gives every row's two nearest distances to the centroids it assigned to, so the margin costs no extra
pass. The restarts cost a fraction of a pass over a large pool, and a start that good converges in a few passes.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from ssat.clustering.blocks import BLOCK_ROWS, float32_blocks, sample_rows, take_rows
from ssat.errors import FAISS_MISSING, ConfigError

# The restarts (k-means++ seeding and FAISS's Lloyd iterations) run on this many rows at most: enough for k
# centroids, a fraction of a pass over pools of millions.
SEEDING_SAMPLE = 100_000
# Passes over every row stop when one lowers the objective by less than this fraction of it.
PASS_TOL = 1e-4


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


def _squared_distances(x: np.ndarray, centers: np.ndarray, x_norms: np.ndarray) -> np.ndarray:
    """|x - c|^2 from the rows' squared norms, computed once by the caller (not once per call: that was most of
    the seeding's time), and one GEMM."""
    return np.maximum(x_norms[:, None] - 2 * (x @ centers.T) + (centers * centers).sum(1)[None, :], 0)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeds: each new centre is the best of 2 + log(k) candidates drawn by D^2 sampling."""
    n = len(x)
    trials = 2 + int(math.log(k))
    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    centers[0] = x[rng.integers(n)]
    x_norms = (x * x).sum(1)
    closest = _squared_distances(x, centers[:1], x_norms)[:, 0]
    for i in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: any point will do
            candidates = rng.integers(n, size=trials)
        else:
            candidates = np.searchsorted(np.cumsum(closest), rng.random(trials) * total).clip(max=n - 1)
        candidate_closest = np.minimum(closest[None, :], _squared_distances(x, x[candidates], x_norms).T)
        best = int(np.argmin(candidate_closest.sum(1)))
        centers[i] = x[candidates[best]]
        closest = candidate_closest[best]
    return centers


def _restarts(x: np.ndarray, k: int, niter: int, nredo: int, seed: int, rng: np.random.Generator) -> np.ndarray:
    """The best of ``nredo`` FAISS runs of ``niter`` Lloyd iterations on x (float32), each from k-means++ seeds."""
    n, dim = x.shape
    best, best_objective = None, math.inf
    for redo in range(max(1, nredo)):
        seeds = kmeans_plus_plus(x, k, rng)
        kmeans = faiss_lib().Kmeans(dim, k, niter=niter, seed=seed + redo, verbose=False,
                              max_points_per_centroid=math.ceil(n / k) + 1, gpu=gpu_count() > 0)
        kmeans.train(x, init_centroids=seeds)
        if kmeans.obj[-1] < best_objective:
            best, best_objective = kmeans.centroids.copy(), kmeans.obj[-1]
    return best


def fit_kmeans(features: np.ndarray, k: int, niter: int = 25, nredo: int = 1, seed: int = 0,
               sample_size: int = SEEDING_SAMPLE, max_passes: int | None = None) -> np.ndarray:
    """Centroids (k, D): ``nredo`` runs of Lloyd's iterations from k-means++ seeds, best kept; on a pool larger
    than sample_size, the runs are on a sample and streamed passes over every row follow (``KMeansPasses``)."""
    return fit_kmeans_margins(features, k, niter, nredo, seed, sample_size, max_passes).centroids


@dataclass
class KMeansPasses:
    """Centroids, and every row's distances d1 <= d2 to its two nearest of them and its nearest one's index."""

    centroids: np.ndarray
    d1: np.ndarray
    d2: np.ndarray
    assign: np.ndarray
    inertia: float
    passes: int  # streamed passes over every row (0: the pool was the sample, FAISS saw every row)
    pass_inertia: list[float]  # the objective of each pass's centroids on every row


def fit_kmeans_margins(features: np.ndarray, k: int, niter: int = 25, nredo: int = 1, seed: int = 0,
                       sample_size: int = SEEDING_SAMPLE, max_passes: int | None = None,
                       batch_size: int = BLOCK_ROWS) -> KMeansPasses:
    """k-means and every row's two nearest distances.

    A pool of at most sample_size rows is clustered by FAISS on every row. A larger one: the restarts on
    sample_size rows drawn at random, then Lloyd passes over every row, streamed, until a pass lowers the
    objective by less than PASS_TOL of it or after ``max_passes`` (default ``niter``); the centroids kept are
    those the last pass assigned to (1: the sample's centroids, with an exact assignment of every row).
    """
    n = len(features)
    if k > n:
        raise ConfigError(f"k-means with k={k} needs at least {k} points; the pool has {n}")
    if sample_size < k:
        raise ConfigError(f"selector.sample_size={sample_size} must be at least the number of clusters {k}")
    rng = np.random.default_rng(seed)
    if n <= sample_size:
        x = as_float32(features)
        centroids = _restarts(x, k, niter, nredo, seed, rng)
        d1, d2, assign = two_nearest_distances(x, centroids, batch_size)
        return KMeansPasses(centroids, d1, d2, assign, float(np.square(d1, dtype=np.float64).sum()), 0, [])
    sample = take_rows(features, sample_rows(n, sample_size, seed), batch_size)
    centroids = _restarts(sample, k, niter, nredo, seed, rng)
    del sample
    return lloyd_passes(features, centroids, niter if max_passes is None else max_passes, batch_size)


def lloyd_passes(features: np.ndarray, centroids: np.ndarray, max_passes: int,
                 batch_size: int = BLOCK_ROWS) -> KMeansPasses:
    """Lloyd's iterations on every row, one streamed pass each, from ``centroids``; see fit_kmeans_margins."""
    if max_passes < 1:
        raise ConfigError(f"selector.max_passes={max_passes} must be at least 1 (one exact assignment)")
    n, k = len(features), len(centroids)
    d1, d2 = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    assign = np.empty(n, dtype=np.int64)
    history: list[float] = []
    while True:
        sums, counts = _assign_pass(features, centroids, d1, d2, assign, batch_size)
        history.append(float(np.square(d1, dtype=np.float64).sum()))
        improved = len(history) == 1 or history[-2] - history[-1] > PASS_TOL * history[-1]
        if len(history) == max_passes or not improved:
            return KMeansPasses(centroids, d1, d2, assign, history[-1], len(history), history)
        # an empty cluster keeps its centroid
        centroids = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids).astype(np.float32)


def _assign_pass(features: np.ndarray, centroids: np.ndarray, d1: np.ndarray, d2: np.ndarray, assign: np.ndarray,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fills d1, d2 and assign for every row (as two_nearest_distances); returns the per-cluster sums and counts
    of the rows assigned (float64 across blocks, float32 within one)."""
    k, dim = centroids.shape
    nearest_two = _NearestTwo(centroids)
    sums = torch.zeros((k, dim), dtype=torch.float64)
    block_sums = torch.zeros((k, dim), dtype=torch.float32)
    counts = np.zeros(k, dtype=np.int64)
    for start, x in float32_blocks(features, batch_size):
        nearest_two(x, d1, d2, assign, start)
        nearest = assign[start:start + len(x)]
        block_sums.zero_().index_add_(0, torch.from_numpy(nearest), torch.from_numpy(x))
        sums += block_sums
        counts += np.bincount(nearest, minlength=k)
    return sums.numpy(), counts


class _NearestTwo:
    """Each row's two nearest centroids: |x|^2 - 2 x.c + |c|^2 with the centroids' norms computed once, one float32
    GEMM per block and a top-2 (FAISS's k=2 search keeps a heap per row: several times slower here)."""

    def __init__(self, centroids: np.ndarray):
        self.centroids = torch.from_numpy(as_float32(centroids))
        self.norms = torch.einsum("kd,kd->k", self.centroids, self.centroids)

    def __call__(self, x: np.ndarray, d1: np.ndarray, d2: np.ndarray, assign: np.ndarray, start: int) -> None:
        rows = torch.from_numpy(x)
        squared = torch.addmm(self.norms, rows, self.centroids.T, alpha=-2)
        squared += torch.linalg.vector_norm(rows, dim=1).square_()[:, None]  # one read, no (B, D) temporary
        two, nearest = squared.topk(2, dim=1, largest=False)
        dist = two.clamp_(min=0).sqrt_().numpy()
        d1[start:start + len(dist)], d2[start:start + len(dist)] = dist[:, 0], dist[:, 1]
        assign[start:start + len(dist)] = nearest[:, 0].numpy()


def two_nearest_distances(features: np.ndarray, centroids: np.ndarray, batch_size: int = 65536):
    """Euclidean distances d1 <= d2 to the two nearest centroids and the nearest one's index, for every point."""
    n = len(features)
    d1, d2 = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    assign = np.empty(n, dtype=np.int64)
    nearest_two = _NearestTwo(centroids)
    for start, x in float32_blocks(features, batch_size):
        nearest_two(x, d1, d2, assign, start)
    return d1, d2, assign


def inertia(features: np.ndarray, centroids: np.ndarray, batch_size: int = 65536) -> float:
    """Sum of squared distances to the nearest centroid (scikit-learn's objective), in batches."""
    index = faiss_lib().IndexFlatL2(centroids.shape[1])
    index.add(as_float32(centroids))
    total = 0.0
    for _, x in float32_blocks(features, batch_size):
        squared, _ = index.search(x, 1)
        total += float(np.maximum(squared, 0).sum(dtype=np.float64))
    return total
