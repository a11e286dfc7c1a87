"""What the two training stages share: loaders over uint8 tensors, checkpoints, resume, best weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ssat.artifacts import ModelWeights
from ssat.data.sampler import SSATBatchSampler
from ssat.data.training_set import LabeledAndSelected, batch_as_is
from ssat.errors import TrainingDiverged
from ssat.lightning import EMA, RobustClassifierModule
from ssat.lightning.seeding import EpochSeed, loader_generator
from ssat.selection.base import DuringTraining

# make_trainer(stage, out_dir, max_epochs, callbacks, batches_per_epoch) -> lightning.Trainer
TrainerFactory = Callable[..., L.Trainer]


def eval_loader(images: np.ndarray, labels: np.ndarray, batch_size: int) -> DataLoader:
    dataset = TensorDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def train_loader(train_set: LabeledAndSelected, sampler: SSATBatchSampler, num_workers: int = 0,
                 pin_memory: bool = True, changing: bool = False) -> DataLoader:
    """uint8 batches read whole (one __getitems__ per batch) by ``num_workers`` processes ahead of the model;
    pinned when a GPU is present so that the copy to it overlaps compute. The workers draw nothing random.
    ``changing``: a selector changes the training set between epochs, so the workers are started afresh each
    epoch (with a copy of it as it then is) instead of kept."""
    return DataLoader(train_set, batch_sampler=sampler, collate_fn=batch_as_is, num_workers=num_workers,
                      pin_memory=pin_memory and torch.cuda.is_available(),
                      persistent_workers=num_workers > 0 and not changing,
                      prefetch_factor=4 if num_workers > 0 else None, generator=loader_generator())


@dataclass(frozen=True)
class FitSettings:
    """How a classifier stage trains, read once from its config block: the schedule, the optimizer, the
    augmentation, validation (``val_pgd``: by PGD accuracy, else clean), loaders, EMA and early stopping."""

    epochs: int
    optim: dict[str, Any]
    augment: dict[str, Any]
    eval_batch_size: int
    val_pgd: dict[str, Any] | None = None
    loader: dict[str, Any] | None = None
    ema: dict[str, Any] | None = None
    patience: int | None = None


@dataclass
class TrainingJob:
    """What one training run trains and where it writes: the stage's name, the model and its loss, the training
    set and its batch sampler, the validation set, the stage's folder and the trainer factory."""

    stage: str
    model: nn.Module
    train_loss: Callable
    train_set: LabeledAndSelected
    sampler: SSATBatchSampler
    val_images: np.ndarray
    val_labels: np.ndarray
    out_dir: Path
    make_trainer: TrainerFactory


def fit(job: TrainingJob, settings: FitSettings, during: DuringTraining | None = None) -> dict[str, Any]:
    """Train, keep best.ckpt (by validation robust accuracy if val_pgd, else clean) and last.ckpt,
    resume from last.ckpt when an earlier attempt left one, and save the best weights as model.pt.

    last.ckpt is written at the end of every epoch (whole or not at all: AtomicCheckpointIO), so a run
    killed at any moment resumes from its last finished epoch with the model, optimizer, scheduler, callback
    states (EMA, a selector's, early stopping) and epoch counter; the batch sampler's draw depends only on
    (seed, epoch) and EpochSeed reseeds the global RNGs from (seed, epoch) too, so on CPU the resumed run ends with
    the same weights, bit for bit, as an uninterrupted one. With ``ema`` ({decay, warmup}) validation and model.pt
    use the averaged weights; with ``patience`` training stops once the monitored validation accuracy has not
    improved for that many epochs. ``during``: what a selector that re-chooses during training adds (its loss,
    callbacks, and the number of epochs the trainer runs when it skips some of the schedule's).
    """
    during = during or DuringTraining()
    epochs = settings.epochs
    trained_epochs = epochs if during.trained_epochs is None else during.trained_epochs
    train_loss = during.loss or job.train_loss
    out_dir, sampler, train_set = job.out_dir, job.sampler, job.train_set
    ema, patience, val_pgd = settings.ema, settings.patience, settings.val_pgd
    module = RobustClassifierModule(job.model, train_loss, settings.optim, epochs, settings.augment, val_pgd)
    monitor = "val/robust_acc" if val_pgd else "val/acc"
    ckpt_dir = ModelWeights.checkpoint_dir(out_dir)
    # No version counter: a best.ckpt left by a killed attempt is overwritten, not joined by best-v1.ckpt.
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="max",
                                 auto_insert_metric_name=False, enable_version_counter=False)
    # Not save_last=True: Lightning then rewrites last.ckpt only in the epochs that improve best.ckpt.
    # Saved at the end of the training epoch, after every other callback's on_train_epoch_end (the trainer calls
    # checkpoint callbacks last), so that it holds what a selector re-chose there.
    every_epoch = ModelCheckpoint(dirpath=ckpt_dir, filename="last", enable_version_counter=False,
                                  save_on_train_epoch_end=True)
    # the sampler holds the stage seed
    callbacks = [EpochSeed(sampler.seed), checkpoint, every_epoch, *during.callbacks]
    if ema:
        callbacks.append(EMA(**ema))
    if patience:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=patience))
    trainer = job.make_trainer(job.stage, out_dir, trained_epochs, callbacks, len(sampler))
    val_loader = eval_loader(job.val_images, job.val_labels, settings.eval_batch_size)
    last = ckpt_dir / ModelWeights.LAST
    try:
        loader = train_loader(train_set, sampler, **(settings.loader or {}), changing=bool(during.callbacks))
        trainer.fit(module, loader, val_loader, ckpt_path=last if last.exists() else None)
    except TrainingDiverged as err:
        kept = f"the last good checkpoint is kept: {last}" if last.exists() else "no epoch had finished"
        raise TrainingDiverged(f"{job.stage}: {err}; {kept}") from None
    if not trainer.is_global_zero:  # rank 0 writes the stage's artifacts and record
        return {}
    best = torch.load(checkpoint.best_model_path or last, map_location="cpu", weights_only=False)
    weights = EMA.weights_in(best) if ema else best["state_dict"]
    state = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    ModelWeights.save(out_dir, state)
    score = checkpoint.best_model_score
    return {
        "epochs": int(trainer.current_epoch),
        "best_epoch": int(best["epoch"]),
        # Epochs trained until the best validation score: what "trained to convergence" costs.
        "epochs_to_convergence": int(best["epoch"]) + 1,
        "early_stopped": int(trainer.current_epoch) < trained_epochs,
        "ema": bool(ema),
        "monitor": monitor,
        "best_val": float(score) if score is not None else None,
        "num_labeled": train_set.num_labeled,
        "num_unlabeled": len(train_set) - train_set.num_labeled,
        "world_size": int(trainer.world_size),
        "steps": int(trainer.global_step),
        **during.summary(),
    }
