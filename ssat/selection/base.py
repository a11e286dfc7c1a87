"""One interface for every selector: order the pool most-boundary-like first, then mix boundary and random."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ssat.errors import ConfigError
from ssat.selection.labels import TrainingLabels
from ssat.selection.types import PoolEmbedding, Selection

if TYPE_CHECKING:
    from ssat.data.sampler import SSATBatchSampler
    from ssat.data.training_set import LabeledAndSelected


@dataclass(frozen=True)
class PoolView:
    """What a selector that re-embeds the pool during training needs beside its images: the intermediate model's
    logits (the labels a re-selection keeps unless it relabels), the labelling rule (``ssat.pseudo_labels``), the
    hidden labels when known (for the pseudo-label accuracy of each re-selection) and the embed stage's batch size
    and feature dtype."""

    intermediate_logits: np.ndarray
    labels: TrainingLabels
    hidden_labels: np.ndarray | None = None
    embed_batch_size: int = 512
    embed_dtype: str = "float32"


@dataclass
class TrainingSetup:
    """What the SSAT stage gives a selector that re-chooses during training: the training set (labeled points,
    then the selected candidates), its batch sampler, the training loss, the whole pool's images, the number of
    points the budget buys (``size``, computed once by the select stage), the schedule's epochs, the seed, the
    stage's folder and, for a selector that re-embeds the pool, ``pool`` (None when the candidates are the labeled
    set)."""

    train_set: "LabeledAndSelected"
    sampler: "SSATBatchSampler"
    train_loss: Callable
    pool_images: np.ndarray
    size: int
    epochs: int
    seed: int
    out_dir: Path
    pool: PoolView | None = None

    @property
    def candidates(self) -> range:
        """The training set's indices a selector chooses among: the pseudo-labeled candidates, or the labeled
        points when there are none (selection.target=labeled)."""
        if len(self.train_set.selection):
            return range(self.train_set.num_labeled, len(self.train_set))
        return range(self.train_set.num_labeled)

    @property
    def candidate_labels(self) -> np.ndarray:
        return self.train_set.pseudo_labels if len(self.train_set.selection) else self.train_set.labeled_labels

    def train_on(self, positions: np.ndarray | None, weights: np.ndarray | None = None,
                 weighted: bool = False) -> None:
        """Draw the candidates' part of every batch from ``positions`` (into the candidates; None: all of them).
        ``weighted``: batches carry loss weights, ``weights`` on the positions (None: 1) and 0 on the other
        candidates, for a loss that reads them (``WeightedLoss``); else the stage's loss sees none."""
        subset = None if positions is None else torch.from_numpy(np.asarray(positions, dtype=np.int64))
        if len(self.train_set.selection):
            self.sampler.unlabeled_subset = subset
        else:
            self.sampler.labeled_subset = subset
        if not weighted:
            self.train_set.weights = None
            return
        all_weights = np.ones(len(self.train_set), dtype=np.float32)
        if positions is not None:
            all_weights[self.candidates.start:self.candidates.stop] = 0.0
            all_weights[self.candidates.start + np.asarray(positions)] = 1.0 if weights is None else weights
        self.train_set.weights = all_weights


@dataclass
class DuringTraining:
    """What a selector that re-chooses during training adds to the SSAT stage's training: a loss in place of the
    stage's (None: the stage's), Lightning callbacks (their state is saved in last.ckpt, so a resumed run
    continues their schedule), the number of epochs the trainer runs when the schedule skips some (None: all),
    and what results.json records of it: ``reselections``, a list of {epoch, size, seconds} whose seconds count in
    ``selection_seconds``, and a selector's own keys in the SSAT stage's record."""

    loss: Callable | None = None
    callbacks: tuple = ()
    trained_epochs: int | None = None
    summary: Callable[[], dict] = field(default=dict)


def budget_size(budget: float, pool_size: int) -> int:
    """The number of pool points a budget (a fraction of the pool) buys."""
    if not 0 < budget <= 1:
        raise ConfigError(f"budget={budget} is outside (0, 1]: it is the fraction of the pool to select")
    n = round(budget * pool_size)
    if n < 1:
        raise ConfigError(f"budget={budget} of a pool of {pool_size} selects no point; raise the budget")
    return n


def ascending(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices by ascending score, equal scores in a seeded random order: never by position in the pool, which
    would take the first rows of the file wherever scores tie."""
    if len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    shuffled = rng.permutation(len(scores))
    return shuffled[np.argsort(scores[shuffled], kind="stable")]


def mix_boundary_random(scores: np.ndarray | None, n: int, boundary_fraction: float,
                        rng: np.random.Generator, pool_size: int) -> Selection:
    """The shared rule: the round(b n) lowest scores (ties broken at random), then n - round(b n) uniform draws
    from the rest."""
    if not 0 <= boundary_fraction <= 1:
        raise ConfigError(f"selector.boundary_fraction={boundary_fraction} is outside [0, 1]")
    if scores is None:
        scores, boundary_fraction = np.full(pool_size, np.nan), 0.0
    n_boundary = round(boundary_fraction * n)
    boundary = ascending(scores, rng)[:n_boundary] if n_boundary else np.zeros(0, dtype=np.int64)
    rest = np.ones(pool_size, dtype=bool)
    rest[boundary] = False
    random = rng.choice(np.flatnonzero(rest), size=n - n_boundary, replace=False)
    indices = np.concatenate([boundary, np.sort(random)]).astype(np.int64)
    is_boundary = np.zeros(n, dtype=bool)
    is_boundary[:n_boundary] = True
    return Selection(indices, scores.astype(np.float64), np.ones(n, dtype=np.float32), is_boundary)


def class_shares(classes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The classes present and how many of n points each gets: the same fraction of every class (largest
    remainders get the points rounding leaves over)."""
    values, counts = np.unique(classes, return_counts=True)
    exact = n * counts / counts.sum()
    take = np.floor(exact).astype(np.int64)
    take[np.argsort(-(exact - take), kind="stable")[:n - take.sum()]] += 1
    return values, take


def mix_per_class(scores: np.ndarray | None, n: int, boundary_fraction: float, rng: np.random.Generator,
                  classes: np.ndarray) -> Selection:
    """The boundary/random rule inside every class, each class getting the same share of its points, so that
    a score that favours some classes cannot drain the others."""
    n_pool = len(classes)
    scores = np.full(n_pool, np.nan) if scores is None else np.asarray(scores, dtype=np.float64)
    boundary, rest = [], []
    for value, take in zip(*class_shares(classes, n)):
        members = np.flatnonzero(classes == value)
        part = mix_boundary_random(scores[members], int(take), boundary_fraction, rng, len(members))
        boundary.append(members[part.indices[part.is_boundary]])
        rest.append(members[part.indices[~part.is_boundary]])
    boundary_idx = np.concatenate(boundary)
    boundary_idx = boundary_idx[ascending(scores[boundary_idx], rng)]
    indices = np.concatenate([boundary_idx, np.sort(np.concatenate(rest))]).astype(np.int64)
    is_boundary = np.zeros(n, dtype=bool)
    is_boundary[:len(boundary_idx)] = True
    return Selection(indices, scores, np.ones(n, dtype=np.float32), is_boundary)


class Selector:
    """Base of the score-based selectors: subclasses implement ``score`` (lower = closer to the boundary).

    Capabilities that shape the pipeline, so that it never asks what a selector is: ``pool_stages(cfg)`` (the
    stages that make the pool, for a generative selector; none: the data's pool) and ``during_training(setup)``
    (what it adds to SSAT's training when it re-chooses during training, as the adversarial coresets do; None:
    it chooses once, in the select stage).

    Adaptive selection: with ``reselect_every`` m, a score-based selector re-chooses the budget during SSAT with
    the current model, at epochs ``reselect_warmup`` (default m), then every m epochs (``Reselection``);
    ``relabel`` gives the new selection the current model's labels instead of the intermediate model's.
    """

    def pool_stages(self, cfg) -> list:
        return []

    def during_training(self, setup: TrainingSetup) -> DuringTraining | None:
        """Adaptive selection's callback when ``reselect_every`` is set; else the selection is final."""
        if self.reselect_every is None:
            return None
        from ssat.lightning.reselection import AdaptiveReselection

        reselection = AdaptiveReselection(self, setup, self.reselect_epochs(setup.epochs))
        return DuringTraining(callbacks=(reselection,), summary=reselection.summary)

    def __init__(self, name: str, boundary_fraction: float = 0.0, class_balanced: bool = False,
                 reselect_every: int | None = None, reselect_warmup: int | None = None, relabel: bool = False):
        if not 0 <= boundary_fraction <= 1:
            raise ConfigError(f"selector.boundary_fraction={boundary_fraction} is outside [0, 1]")
        if reselect_every is not None and reselect_every < 1:
            raise ConfigError(f"selector.reselect_every={reselect_every} must be at least 1 (null: choose once)")
        if reselect_warmup is not None and reselect_warmup < 1:
            raise ConfigError(f"selector.reselect_warmup={reselect_warmup} must be at least 1 "
                              f"(null: selector.reselect_every)")
        self.name = name
        self.boundary_fraction = boundary_fraction
        self.class_balanced = class_balanced
        self.reselect_every, self.reselect_warmup, self.relabel = reselect_every, reselect_warmup, relabel

    def reselect_epochs(self, epochs: int) -> list[int]:
        """The SSAT epochs that start on a re-selection: warm-up w (default m), w + m, ... before ``epochs``."""
        if self.reselect_every is None:
            return []
        first = self.reselect_every if self.reselect_warmup is None else self.reselect_warmup
        return list(range(first, epochs, self.reselect_every))

    def check(self, num_candidates: int, has_labels: bool) -> None:
        """Settings that depend on the candidates (their number, whether they are labeled), checked before
        any training: a re-selection re-chooses among pool points."""
        if self.reselect_every is not None and has_labels:
            raise ConfigError(f"selector.reselect_every={self.reselect_every} re-chooses pool points during SSAT; "
                              f"selection.target=labeled has none (use selection.target=pool)")

    def score(self, pool: PoolEmbedding, seed: int) -> np.ndarray | None:
        raise NotImplementedError

    def num_selected(self, budget: float, pool_size: int) -> int:
        return budget_size(budget, pool_size)

    def select(self, pool: PoolEmbedding, budget: float, seed: int) -> Selection:
        return self.choose_n(pool, self.num_selected(budget, len(pool)), seed)

    def choose_n(self, pool: PoolEmbedding, n: int, seed: int) -> Selection:
        """n points by the boundary/random rule on this selector's scores (a re-selection's n is the budget's)."""
        scores = self.score(pool, seed) if self.boundary_fraction > 0 else None
        rng = np.random.default_rng(seed)
        if self.class_balanced:
            return mix_per_class(scores, n, self.boundary_fraction, rng, pool.classes())
        return mix_boundary_random(scores, n, self.boundary_fraction, rng, len(pool))
