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

import numpy as np
import torch
from scipy.optimize import nnls
from torch import nn

from ssat.attacks import eval_mode
from ssat.errors import ConfigError
from ssat.selection.base import PoolEmbedding, Selection, Selector, class_shares


def last_layer_gradients(model: nn.Module, loss, batches: Iterable, device: torch.device | str = "cpu",
                         fc_weights: bool = False) -> np.ndarray:
    """Per-point gradients (N, d) of ``loss.sample_losses`` at ``loss.attack``'s adversarial examples with respect
    to every logit vector the loss reads (TRADES: clean and adversarial, PGD-AT: adversarial), and with
    ``fc_weights`` also to the last layer's weights (outer products with the features). ``batches`` yields
    (uint8 images, labels) a batch at a time; the model is in eval mode."""
    rows = []
    with eval_mode(model), torch.enable_grad():
        for images, labels in batches:
            x = torch.as_tensor(np.asarray(images)).to(device).float() / 255
            y = torch.as_tensor(np.asarray(labels, dtype=np.int64)).to(device)
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
                parts.append(grad)
                if fc_weights:
                    parts.append(torch.einsum("bk,bd->bkd", grad, features.detach()).flatten(1))
            rows.append(torch.cat(parts, dim=1).float().cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)


class Craig:
    """CRAIG: greedy facility location on gradient distances, maximising sum_i max_{j in S} (C - |g_i - g_j|);
    a centre's weight is the number of candidates nearest to it, so the weights sum to the candidate count.

    Stochastic greedy (Mirzasoleiman et al. 2015): each step evaluates a random sample of
    (N / k) log(1 / epsilon) candidates against every point, in blocks of ``block`` rows, so a step costs
    O(N log(1/epsilon) d / k) time and O(block N) memory, never N x N.
    """

    def __init__(self, epsilon: float = 0.01, block: int = 1024):
        if not 0 < epsilon < 1:
            raise ConfigError(f"selector.algorithm.epsilon={epsilon} is outside (0, 1)")
        self.epsilon, self.block = epsilon, block

    def __call__(self, grads: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        g = torch.from_numpy(np.ascontiguousarray(grads, dtype=np.float32))
        n = len(g)
        k = min(k, n)
        scale = float(torch.cdist(g, g.mean(0, keepdim=True)).max()) * 2 + 1e-12  # C: above every distance
        best = torch.zeros(n)  # similarity of each point to its nearest chosen centre (0: none yet)
        chosen: list[int] = []
        available = np.ones(n, dtype=bool)
        sample = min(n, max(1, math.ceil(n / k * math.log(1 / self.epsilon))))
        for _ in range(k):
            pool = np.flatnonzero(available)
            trial = rng.choice(pool, size=min(sample, len(pool)), replace=False)
            gains = torch.cat([(scale - torch.cdist(g[trial[s:s + self.block]], g) - best).clamp_min(0).sum(1)
                               for s in range(0, len(trial), self.block)])
            j = int(trial[int(torch.argmax(gains))])
            chosen.append(j)
            available[j] = False
            best = torch.maximum(best, scale - torch.cdist(g[j:j + 1], g)[0])
        indices = np.asarray(chosen, dtype=np.int64)
        return indices, self.weights(g, indices)

    def weights(self, g: torch.Tensor, indices: np.ndarray) -> np.ndarray:
        """How many candidates have each centre as their nearest (ties to the first), in blocks of rows."""
        centres = g[torch.from_numpy(indices)]
        nearest = torch.cat([torch.cdist(g[s:s + self.block], centres).argmin(1) for s in range(0, len(g), self.block)])
        return np.bincount(nearest.numpy(), minlength=len(indices)).astype(np.float32)


class GradMatch:
    """GradMatch: non-negative orthogonal matching pursuit of the full gradient sum b = sum_i g_i, each step adding
    the candidate most correlated with the residual and refitting min |A w - b|^2 + lam |w|^2, w >= 0.

    When the residual has no positive correlation left before k points are chosen, the rest are drawn at random
    with weight 1, as GRAD-MATCH's reference code does.
    """

    def __init__(self, lam: float = 0.5, tol: float = 1e-6):
        if lam < 0:
            raise ConfigError(f"selector.algorithm.lam={lam} must not be negative")
        self.lam, self.tol = lam, tol

    def __call__(self, grads: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        g = np.asarray(grads, dtype=np.float64)
        n, d = g.shape
        k = min(k, n)
        target = g.sum(0)
        residual = target.copy()
        chosen: list[int] = []
        weights = np.zeros(0)
        available = np.ones(n, dtype=bool)
        while len(chosen) < k:
            correlation = np.where(available, g @ residual, -np.inf)
            j = int(np.argmax(correlation))
            if correlation[j] <= self.tol * max(1.0, np.linalg.norm(residual)):
                break
            chosen.append(j)
            available[j] = False
            a = g[chosen].T
            if self.lam > 0:
                a = np.vstack([a, math.sqrt(self.lam) * np.eye(len(chosen))])
            weights, _ = nnls(a, np.concatenate([target, np.zeros(len(a) - d)]))
            residual = target - g[chosen].T @ weights
        fill = rng.choice(np.flatnonzero(available), size=k - len(chosen), replace=False)
        indices = np.concatenate([np.asarray(chosen, dtype=np.int64), fill.astype(np.int64)])
        return indices, np.concatenate([weights, np.ones(len(fill))]).astype(np.float32)


class CoresetSelector(Selector):
    """An adaptive selector: ``select`` hands every candidate to the SSAT stage, which trains on a weighted
    coreset of ``num_selected`` of them, chosen by ``algorithm`` (Craig or GradMatch) from the current model's
    adversarial gradients and re-chosen every ``select_every`` epochs after a warm start of kappa * epochs.

    ``per_batch``: the per-batch variant (mini-batches of that many candidates are the units chosen, each by its
    summed gradient); ``per_class``: the coreset keeps each (pseudo-)class's share, as in ACS.
    """

    chooses_during_training = True

    def __init__(self, name: str, algorithm: Craig | GradMatch, select_every: int = 20, kappa: float = 0.6,
                 per_batch: int | None = None, per_class: bool = True, fc_weights: bool = False,
                 batch_size: int = 256):
        super().__init__(name, boundary_fraction=0.0)
        if select_every < 1:
            raise ConfigError(f"selector.select_every={select_every} must be at least 1 (epochs between selections)")
        if not 0 <= kappa <= 1:
            raise ConfigError(f"selector.kappa={kappa} is outside [0, 1] (the warm-start share of the epochs)")
        if per_batch is not None and per_batch < 1:
            raise ConfigError(f"selector.per_batch={per_batch} must be at least 1 (null: single points)")
        self.algorithm, self.select_every, self.kappa = algorithm, select_every, kappa
        self.per_batch, self.per_class, self.fc_weights, self.batch_size = per_batch, per_class, fc_weights, batch_size

    def select(self, pool: PoolEmbedding, budget: float, seed: int) -> Selection:
        n = len(pool)
        return Selection(np.arange(n, dtype=np.int64), np.full(n, np.nan), np.ones(n, dtype=np.float32),
                         np.zeros(n, dtype=bool))

    def warm_epochs(self, epochs: int) -> int:
        return round(self.kappa * epochs)

    def selects_at(self, epoch: int, epochs: int) -> bool:
        warm = self.warm_epochs(epochs)
        return epoch >= warm and (epoch - warm) % self.select_every == 0

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
