"""Adversarial coreset selection (Dolatabadi et al., ACS; METHODS.md section 4): CRAIG and GradMatch on the
last-layer gradients of the adversarial training loss at the current model's adversarial examples.

The coreset changes during training, so the select stage passes every candidate on and the SSAT stage chooses
(and every ``select_every`` epochs re-chooses) a weighted subset of them with ``choose``. Memory stays linear in
the number of candidates: gradients are (N, d), CRAIG's greedy works on blocks of candidate rows, GradMatch keeps
one correlation vector.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import nnls
from torch import nn

from ssat.attacks import eval_mode
from ssat.errors import ConfigError
from ssat.selection.base import DuringTraining, PoolEmbedding, Selection, Selector, TrainingSetup, class_shares


# How the gradients of a loss that reads several logit vectors (TRADES: clean and adversarial) are combined:
# "sum" adds them, the gradient with respect to the last layer's bias (and weights) that both forward passes share,
# as ACS does; "concat" keeps one block per logit vector (ssat's earlier variant: it tells apart points whose clean
# and adversarial gradients cancel in the sum).
COMBINE = ("sum", "concat")


def last_layer_gradients(model: nn.Module, loss, batches: Iterable, device: torch.device | str = "cpu",
                         fc_weights: bool = False, combine: str = "sum") -> np.ndarray:
    """Per-point gradients (N, d) of ``loss.sample_losses`` at ``loss.attack``'s adversarial examples with respect
    to every logit vector the loss reads (TRADES: clean and adversarial, PGD-AT: adversarial), and with
    ``fc_weights`` also to the last layer's weights (outer products with the features), combined over the logit
    vectors as ``combine`` says. ``batches`` yields (uint8 images, labels) a batch at a time; the model is in eval
    mode."""
    if combine not in COMBINE:
        raise ConfigError(f"selector.gradient={combine!r} is not one of {', '.join(COMBINE)}")
    rows = []
    with eval_mode(model), torch.enable_grad():
        for images, labels in batches:
            x = torch.as_tensor(np.asarray(images)).to(device).float() / 255
            y = torch.as_tensor(np.asarray(labels)).to(device)
            y = y if y.is_floating_point() else y.long()  # label distributions (soft pseudo-labels) as they are
            x_adv = loss.attack(model, x, y)
            seen: list[tuple[torch.Tensor, torch.Tensor]] = []
            hook = model.head.register_forward_hook(lambda module, inputs, out: seen.append((inputs[0], out)))
            try:
                losses = loss.sample_losses(model, x, y, x_adv)
            finally:
                hook.remove()
            grads = torch.autograd.grad(losses.sum(), [out for _, out in seen], allow_unused=True)
            parts = []
            for (features, out), grad in zip(seen, grads):
                grad = torch.zeros_like(out) if grad is None else grad
                if fc_weights:
                    grad = torch.cat([grad, torch.einsum("bk,bd->bkd", grad, features.detach()).flatten(1)], dim=1)
                parts.append(grad)
            combined = torch.stack(parts).sum(0) if combine == "sum" else torch.cat(parts, dim=1)
            rows.append(combined.float().cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)


# CRAIG's distance between gradients: "squared" Euclidean as ACS's code computes it (its CRAIGStrategy.distance),
# or "euclidean", the norm |g_i - g_j| of the CRAIG paper's bound (Mirzasoleiman et al. 2020).
DISTANCES = ("squared", "euclidean")


class Craig:
    """CRAIG: greedy facility location on gradient distances, maximising sum_i max_{j in S} (C - d(g_i, g_j)) with
    C above every distance; a centre's weight is the number of candidates nearest to it, so the weights sum to the
    candidate count.

    Stochastic greedy (Mirzasoleiman et al. 2015): each step evaluates a random sample of
    (N / k) log(1 / epsilon) candidates against every point, in blocks of ``block`` rows, so a step costs
    O(N log(1/epsilon) d / k) time and O(block N) memory, never N x N. ``epsilon=None`` evaluates every remaining
    candidate: the exact greedy that ACS runs (apricot's lazy greedy gives the same set).
    """

    def __init__(self, epsilon: float | None = 0.01, distance: str = "squared", block: int = 1024):
        if epsilon is not None and not 0 < epsilon < 1:
            raise ConfigError(f"selector.algorithm.epsilon={epsilon} is outside (0, 1) (null: exact greedy)")
        if distance not in DISTANCES:
            raise ConfigError(f"selector.algorithm.distance={distance!r} is not one of {', '.join(DISTANCES)}")
        self.epsilon, self.distance, self.block = epsilon, distance, block

    def distances(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(a, b)
        return d * d if self.distance == "squared" else d

    def __call__(self, grads: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        g = torch.from_numpy(np.ascontiguousarray(grads, dtype=np.float32))
        n = len(g)
        k = min(k, n)
        radius = float(torch.cdist(g, g.mean(0, keepdim=True)).max())
        # C: above every distance (|g_i - g_j| <= 2 r); the greedy's choices do not depend on C beyond that
        scale = (4 * radius ** 2 if self.distance == "squared" else 2 * radius) + 1e-12
        best = torch.zeros(n)  # similarity of each point to its nearest chosen centre (0: none yet)
        chosen: list[int] = []
        available = np.ones(n, dtype=bool)
        sample = n if self.epsilon is None else min(n, max(1, math.ceil(n / k * math.log(1 / self.epsilon))))
        for _ in range(k):
            pool = np.flatnonzero(available)
            trial = rng.choice(pool, size=min(sample, len(pool)), replace=False)
            gains = torch.cat([(scale - self.distances(g[trial[s:s + self.block]], g) - best).clamp_min(0).sum(1)
                               for s in range(0, len(trial), self.block)])
            j = int(trial[int(torch.argmax(gains))])
            chosen.append(j)
            available[j] = False
            best = torch.maximum(best, scale - self.distances(g[j:j + 1], g)[0])
        indices = np.asarray(chosen, dtype=np.int64)
        return indices, self.weights(g, indices)

    def weights(self, g: torch.Tensor, indices: np.ndarray) -> np.ndarray:
        """How many candidates have each centre as their nearest (ties to the first), in blocks of rows."""
        centres = g[torch.from_numpy(indices)]
        nearest = torch.cat([torch.cdist(g[s:s + self.block], centres).argmin(1) for s in range(0, len(g), self.block)])
        return np.bincount(nearest.numpy(), minlength=len(indices)).astype(np.float32)


class GradMatch:
    """GradMatch: orthogonal matching pursuit of the full gradient sum b = sum_i g_i with non-negative weights, as
    GRAD-MATCH's OrthogonalMP_REG (which ACS calls): each step adds the candidate most correlated with the
    residual (stopping when that one is already chosen or the residual is below ``tol`` |b|) and refits the
    weights of the chosen set A by non-negative least squares on the regularised normal equations,
    min_{w >= 0} |(A A^T + lam I) w - A b|.

    Points whose weight came out 0 are dropped, and the coreset is topped up to k points drawn at random with
    weight 1, as ACS does. ``lam`` 0 is ACS's (its configs, and its CPU path fixes it); lam > 0 shrinks the weights.
    """

    def __init__(self, lam: float = 0.0, tol: float = 1e-6):
        if lam < 0:
            raise ConfigError(f"selector.algorithm.lam={lam} must not be negative")
        self.lam, self.tol = lam, tol

    def __call__(self, grads: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        g = np.asarray(grads, dtype=np.float64)
        k = min(k, len(g))
        target = g.sum(0)
        residual = target.copy()
        chosen: list[int] = []
        weights = np.zeros(0)
        while len(chosen) < k and np.linalg.norm(residual) > self.tol * np.linalg.norm(target):
            j = int(np.argmax(g @ residual))
            if j in chosen:
                break
            chosen.append(j)
            a = g[chosen]
            weights, _ = nnls(a @ a.T + self.lam * np.eye(len(chosen)), a @ target)
            residual = target - a.T @ weights
        kept = np.asarray(chosen, dtype=np.int64)[weights > 0]
        weights = weights[weights > 0]
        rest = np.setdiff1d(np.arange(len(g)), kept)
        fill = rng.choice(rest, size=k - len(kept), replace=False)
        indices = np.concatenate([kept, fill.astype(np.int64)])
        return indices, np.concatenate([weights, np.ones(len(fill))]).astype(np.float32)


@dataclass(frozen=True)
class CoresetSchedule:
    """ACS's epochs (its robust_train scripts): the first ``warm`` = round(c floor(kappa E)) epochs train on every
    candidate, the schedule then skips to epoch ``start`` = floor(kappa E), and every later epoch trains on the
    coreset, a share c of the batches of a full epoch. The learning-rate schedule counts the skipped epochs, the
    trainer does not run them: it trains ``warm + epochs - start`` epochs."""

    epochs: int
    warm: int
    start: int
    full_batches: int
    coreset_batches: int

    @property
    def skipped(self) -> int:
        return self.start - self.warm

    @property
    def trained_epochs(self) -> int:
        return self.warm + self.epochs - self.start

    def schedule_epoch(self, trained_epoch: int) -> int:
        """The learning-rate schedule's epoch of the trainer's ``trained_epoch``."""
        return trained_epoch if trained_epoch < self.warm else trained_epoch + self.skipped

    def batches(self, trained_epoch: int) -> int:
        return self.full_batches if trained_epoch < self.warm else self.coreset_batches

    def summary(self) -> dict:
        return {"warm_start_epochs": self.warm, "skipped_epochs": self.skipped, "first_coreset_epoch": self.start,
                "trained_epochs": self.trained_epochs, "batches_per_full_epoch": self.full_batches,
                "batches_per_coreset_epoch": self.coreset_batches}


class CoresetSelector(Selector):
    """An adaptive selector: ``select`` hands every candidate to the SSAT stage, which trains on a weighted
    coreset of ``num_selected`` of them, chosen by ``algorithm`` (Craig or GradMatch) from the current model's
    adversarial gradients (combined over the logit vectors as ``gradient`` says) on ACS's schedule
    (``schedule``): re-chosen every ``select_every`` epochs from epoch floor(kappa E) on.

    ``per_batch``: the per-batch variant (mini-batches of that many candidates are the units chosen, each by its
    summed gradient); ``per_class``: the coreset keeps each (pseudo-)class's share, as in ACS.
    """

    def __init__(self, name: str, algorithm: Craig | GradMatch, select_every: int = 20, kappa: float = 0.6,
                 per_batch: int | None = None, per_class: bool = True, fc_weights: bool = False,
                 batch_size: int = 256, gradient: str = "sum"):
        super().__init__(name, boundary_fraction=0.0)
        if select_every < 1:
            raise ConfigError(f"selector.select_every={select_every} must be at least 1 (epochs between selections)")
        if not 0 <= kappa <= 1:
            raise ConfigError(f"selector.kappa={kappa} is outside [0, 1] (the warm-start share of the epochs)")
        if per_batch is not None and per_batch < 1:
            raise ConfigError(f"selector.per_batch={per_batch} must be at least 1 (null: single points)")
        if gradient not in COMBINE:
            raise ConfigError(f"selector.gradient={gradient!r} is not one of {', '.join(COMBINE)}")
        self.algorithm, self.select_every, self.kappa = algorithm, select_every, kappa
        self.per_batch, self.per_class, self.fc_weights, self.batch_size = per_batch, per_class, fc_weights, batch_size
        self.gradient = gradient

    def select(self, pool: PoolEmbedding, budget: float, seed: int) -> Selection:
        return Selection.everything(len(pool))

    def during_training(self, setup: TrainingSetup) -> DuringTraining:
        """A weighted loss and the callback that (re)chooses the coreset, on ACS's schedule of epochs: whatever an
        epoch is (``batches_per_epoch`` batches or one pass), coreset epochs are a share c = size / candidates of
        the batches of a full epoch."""
        from ssat.attacks.losses import WeightedLoss
        from ssat.lightning.coreset import CoresetReselection

        schedule = self.schedule(setup.epochs, setup.size / len(setup.candidates), len(setup.sampler))
        reselection = CoresetReselection(self, setup, schedule)
        return DuringTraining(WeightedLoss(setup.train_loss), (reselection,), schedule.trained_epochs,
                              reselection.summary)

    def schedule(self, epochs: int, fraction: float, full_batches: int) -> CoresetSchedule:
        """ACS's schedule for ``epochs`` epochs of ``full_batches`` batches, the coreset a ``fraction`` c of the
        candidates: whatever an epoch is (one pass or a fixed number of batches), a coreset epoch has
        max(1, round(c full_batches)) batches."""
        start = math.floor(self.kappa * epochs + 1e-9)  # ACS: int(kappa * num_epochs)
        return CoresetSchedule(epochs, round(fraction * start), start, full_batches,
                               max(1, round(fraction * full_batches)))

    def selects_at(self, epoch: int, start: int) -> bool:
        """Whether the coreset is (re)chosen at the schedule's ``epoch``: at ``start`` and every select_every
        epochs after it."""
        return epoch >= start and (epoch - start) % self.select_every == 0

    def choose(self, grads: np.ndarray, classes: np.ndarray, size: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Coreset positions (into the candidates) and their weights, normalised to mean 1 so that a coreset
        point stands for the candidates it represents at the rate uniform sampling would give them."""
        groups, takes = [np.arange(len(grads))], [size]
        if self.per_class:
            values, takes = class_shares(classes, size)
            groups = [np.flatnonzero(classes == value) for value in values]
        indices, weights = [], []
        for members, take in zip(groups, takes):
            if take == 0:
                continue
            idx, w = self.choose_in(grads[members], int(take), rng)
            indices.append(members[idx])
            weights.append(w)
        indices, weights = np.concatenate(indices), np.concatenate(weights).astype(np.float64)
        total = weights.sum()
        weights = weights * len(weights) / total if total > 0 else np.ones(len(weights))
        return indices, weights.astype(np.float32)

    def choose_in(self, grads: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One group: single points, or (per_batch) random mini-batches chosen by their summed gradients."""
        if self.per_batch is None:
            return self.algorithm(grads, size, rng)
        order = rng.permutation(len(grads))
        batches = [order[s:s + self.per_batch] for s in range(0, len(order), self.per_batch)]
        summed = np.stack([grads[b].sum(0) for b in batches])
        chosen, w = self.algorithm(summed, max(1, round(size / self.per_batch)), rng)
        members = [batches[i] for i in chosen]
        return np.concatenate(members), np.concatenate([np.full(len(m), wi) for m, wi in zip(members, w)])
