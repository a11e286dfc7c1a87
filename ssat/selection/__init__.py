"""Selectors: each returns pool indices, per-point scores and per-selected-point weights."""

from ssat.selection.base import PoolEmbedding, Selection, Selector, budget_size, mix_boundary_random
from ssat.selection.latent import GMMSelector, KMeansMarginSelector
from ssat.selection.simple import FullSelector, PredictionConfidenceSelector, RandomSelector

__all__ = [
    "FullSelector",
    "GMMSelector",
    "KMeansMarginSelector",
    "PoolEmbedding",
    "PredictionConfidenceSelector",
    "RandomSelector",
    "Selection",
    "Selector",
    "budget_size",
    "mix_boundary_random",
]
