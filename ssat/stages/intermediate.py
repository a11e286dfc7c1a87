"""Stage 1: the intermediate model, trained on the labeled set only; it embeds, scores and labels the pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from ssat.data.sampler import SSATBatchSampler
from ssat.data.splits import SemiSupervisedData
from ssat.data.training_set import LabeledAndSelected
from ssat.stages.training import TrainerFactory, fit


def train_intermediate(model: nn.Module, data: SemiSupervisedData, out_dir: Path, make_trainer: TrainerFactory,
                       train_loss: Callable, epochs: int, batch_size: int, optim: dict[str, Any],
                       augment: dict[str, Any], eval_batch_size: int, seed: int, rank: int = 0,
                       world_size: int = 1, loader: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes checkpoints/{best,last}.ckpt and model.pt (the best weights by validation accuracy)."""
    sampler = SSATBatchSampler(len(data.labeled_labels), 0, batch_size, 0.0, seed=seed, rank=rank,
                               world_size=world_size)
    train_set = LabeledAndSelected(data.labeled_images, data.labeled_labels)
    return fit(model, train_loss, train_set, sampler,
               data.val_images, data.val_labels, out_dir, make_trainer, "intermediate", epochs, optim, augment,
               eval_batch_size, val_pgd=None, loader=loader)
