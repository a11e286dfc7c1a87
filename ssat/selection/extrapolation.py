"""Importance extrapolation (Nieth et al. 2024; METHODS.md section 4): score a small random subset of the
candidates by the dynamic uncertainty of their training, and give every other candidate the mean score of its
nearest scored neighbours in the embed stage's feature space; the lowest-scoring candidates are pruned.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ssat.attacks import eval_mode
from ssat.clustering.kmeans import as_float32, faiss_lib
from ssat.errors import ConfigError
from ssat.lightning import RobustClassifierModule
from ssat.lightning.trainer import build_trainer
from ssat.selection.base import PoolEmbedding, Selector

PROBABILITIES = ("auto", "true_class", "pseudo_label")


def check_epochs(epochs: int, window: int) -> None:
    if epochs <= window:
        raise ConfigError(f"selector.epochs={epochs} must be larger than selector.window={window}: dynamic "
                          f"uncertainty averages the epochs - window windows that start at epochs 0 .. "
                          f"epochs - window - 1")


def dynamic_uncertainty(probabilities: np.ndarray, window: int) -> np.ndarray:
    """DU per point from (K epochs, N) label probabilities, as Nieth et al.'s code computes it
    (core/data/dynamic_uncertainty.py): the mean over the K - J windows of J = ``window`` epochs starting at
    epochs 0 .. K - J - 1 of the probability's sample standard deviation (ddof 1) inside the window."""
    epochs = len(probabilities)
    check_epochs(epochs, window)
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(probabilities, dtype=np.float64), window, axis=0)
    return windows[:epochs - window].std(axis=-1, ddof=1).mean(axis=0)


def extrapolate(features: np.ndarray, scored: np.ndarray, scores: np.ndarray, neighbours: int,
                batch_size: int = 65536) -> np.ndarray:
    """A score for every row: its own for the ``scored`` rows, the mean score of its ``neighbours`` nearest
    scored rows (Euclidean, FAISS exact search, in batches of rows) for the rest."""
    if neighbours > len(scored):
        raise ConfigError(f"selector.neighbours={neighbours} is larger than the {len(scored)} scored points")
    index = faiss_lib().IndexFlatL2(features.shape[1])
    index.add(as_float32(features[scored]))
    out = np.empty(len(features), dtype=np.float64)
    for start in range(0, len(features), batch_size):
        _, nearest = index.search(as_float32(features[start:start + batch_size]), neighbours)
        out[start:start + len(nearest)] = scores[nearest].mean(axis=1)
    out[scored] = scores
    return out


class LabelProbabilities(Callback):
    """After every training epoch, the model's softmax probability of each scored point's label (eval mode)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.history: list[np.ndarray] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        rows = []
        with eval_mode(model), torch.no_grad():
            for s in range(0, len(self.labels), self.batch_size):
                x = self.images[s:s + self.batch_size].to(pl_module.device).float() / 255
                y = self.labels[s:s + self.batch_size].to(pl_module.device)
                rows.append(torch.softmax(model(x), 1).gather(1, y[:, None])[:, 0].cpu().numpy())
        self.history.append(np.concatenate(rows))


class ExtrapolationSelector(Selector):
    """Trains a fresh ``model`` with the adversarial ``loss`` on ``scored_fraction`` of the candidates (true labels
    where the candidates have them, else the selection model's pseudo-labels), scores them by dynamic
    uncertainty over ``window`` epochs and extrapolates to the rest by their ``neighbours`` nearest scored points.
    The score is minus DU, so that the boundary rule (lowest first, boundary_fraction 1) keeps the highest DU.
    """

    def __init__(self, name: str, model: nn.Module, loss, scored_fraction: float = 0.1, epochs: int = 30,
                 window: int = 10, neighbours: int = 12, batch_size: int = 128, optim: dict[str, Any] | None = None,
                 probabilities: str = "auto", trainer: dict[str, Any] | None = None,
                 boundary_fraction: float = 1.0, class_balanced: bool = False):
        super().__init__(name, boundary_fraction, class_balanced)
        if not 0 < scored_fraction <= 1:
            raise ConfigError(f"selector.scored_fraction={scored_fraction} is outside (0, 1]")
        if window < 2:
            raise ConfigError(f"selector.window={window} must be at least 2 epochs for a standard deviation")
        check_epochs(epochs, window)
        if neighbours < 1:
            raise ConfigError(f"selector.neighbours={neighbours} must be at least 1")
        if probabilities not in PROBABILITIES:
            raise ConfigError(f"selector.probabilities={probabilities!r} is not one of {', '.join(PROBABILITIES)}")
        self.model, self.loss, self.scored_fraction, self.epochs = model, loss, scored_fraction, epochs
        self.window, self.neighbours, self.batch_size = window, neighbours, batch_size
        self.probabilities = probabilities
        self.optim = dict(optim or {"lr": 0.05, "schedule": "cosine"})
        self.trainer = dict(trainer or {"accelerator": "cpu"})

    def num_scored(self, num_candidates: int) -> int:
        return max(1, round(self.scored_fraction * num_candidates))

    def check(self, num_candidates: int, has_labels: bool) -> None:
        scored = self.num_scored(num_candidates)
        if self.neighbours > scored:
            raise ConfigError(f"selector.neighbours={self.neighbours} is larger than the scored set: "
                              f"selector.scored_fraction={self.scored_fraction} of {num_candidates} candidates "
                              f"scores {scored}")
        if self.probabilities == "true_class" and not has_labels:
            raise ConfigError("selector.probabilities=true_class needs labels, and the pool has none; use "
                              "probabilities=pseudo_label or selection.target=labeled")

    def labels(self, pool: PoolEmbedding) -> np.ndarray:
        return pool.pseudo_classes() if self.probabilities == "pseudo_label" else pool.classes()

    def score(self, pool: PoolEmbedding, seed: int) -> np.ndarray:
        self.check(len(pool), pool.labels is not None)
        scored = np.sort(np.random.default_rng(seed).choice(len(pool), self.num_scored(len(pool)), replace=False))
        images = torch.from_numpy(np.ascontiguousarray(pool.images[scored]))
        labels = torch.from_numpy(self.labels(pool)[scored])
        self.du_ = dynamic_uncertainty(self.train_and_record(images, labels, seed), self.window)
        self.scored_ = scored
        return -extrapolate(pool.features, scored, self.du_, self.neighbours)

    def train_and_record(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> np.ndarray:
        """(epochs, n) label probabilities of a fresh copy of the model trained on the scored points."""
        L.seed_everything(seed, verbose=False)
        module = RobustClassifierModule(copy.deepcopy(self.model), self.loss, self.optim, self.epochs)
        record = LabelProbabilities(images, labels, self.batch_size)
        loader = DataLoader(TensorDataset(images, labels), batch_size=self.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        trainer = build_trainer(**self.trainer, devices=1, max_epochs=self.epochs, logger=False, callbacks=[record],
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                inference_mode=False, num_sanity_val_steps=0, log_every_n_steps=1)
        trainer.fit(module, loader)
        return np.stack(record.history)
