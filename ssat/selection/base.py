"""One interface for every selector: order the pool most-boundary-like first, then mix boundary and random."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssat.errors import ConfigError


@dataclass
class PoolEmbedding:
    """What the selection model says about the pool: penultimate features (N, D) and logits (N, K)."""

    features: np.ndarray
    logits: np.ndarray

    def __len__(self) -> int:
        return len(self.features)


@dataclass
class Selection:
    """Chosen pool indices (boundary part first), a score for every pool point and a weight per chosen point."""

    indices: np.ndarray
    scores: np.ndarray
    weights: np.ndarray
    is_boundary: np.ndarray

    @property
    def num_boundary(self) -> int:
        return int(self.is_boundary.sum())


def budget_size(budget: float, pool_size: int) -> int:
    """The number of pool points a budget (a fraction of the pool) buys."""
    if not 0 < budget <= 1:
        raise ConfigError(f"budget={budget} is outside (0, 1]: it is the fraction of the pool to select")
    n = round(budget * pool_size)
    if n < 1:
        raise ConfigError(f"budget={budget} of a pool of {pool_size} selects no point; raise the budget")
    return n


def mix_boundary_random(scores: np.ndarray | None, n: int, boundary_fraction: float,
                        rng: np.random.Generator, pool_size: int) -> Selection:
    """The shared rule: the round(b n) lowest scores, then n - round(b n) uniform draws from the rest."""
    if not 0 <= boundary_fraction <= 1:
        raise ConfigError(f"selector.boundary_fraction={boundary_fraction} is outside [0, 1]")
    if scores is None:
        scores, boundary_fraction = np.full(pool_size, np.nan), 0.0
    n_boundary = round(boundary_fraction * n)
    order = np.argsort(scores, kind="stable")
    boundary = order[:n_boundary]
    random = rng.choice(order[n_boundary:], size=n - n_boundary, replace=False)
    indices = np.concatenate([boundary, np.sort(random)]).astype(np.int64)
    is_boundary = np.zeros(n, dtype=bool)
    is_boundary[:n_boundary] = True
    return Selection(indices, scores.astype(np.float64), np.ones(n, dtype=np.float32), is_boundary)


class Selector:
    """Base of the score-based selectors: subclasses implement ``score`` (lower = closer to the boundary)."""

    def __init__(self, name: str, boundary_fraction: float = 0.0):
        if not 0 <= boundary_fraction <= 1:
            raise ConfigError(f"selector.boundary_fraction={boundary_fraction} is outside [0, 1]")
        self.name = name
        self.boundary_fraction = boundary_fraction

    def score(self, pool: PoolEmbedding, seed: int) -> np.ndarray | None:
        raise NotImplementedError

    def num_selected(self, budget: float, pool_size: int) -> int:
        return budget_size(budget, pool_size)

    def select(self, pool: PoolEmbedding, budget: float, seed: int) -> Selection:
        n = self.num_selected(budget, len(pool))
        scores = self.score(pool, seed) if self.boundary_fraction > 0 else None
        return mix_boundary_random(scores, n, self.boundary_fraction, np.random.default_rng(seed), len(pool))
