"""What the two training stages share: loaders over uint8 tensors, checkpoints, resume, best weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ssat.data.sampler import SSATBatchSampler
from ssat.data.training_set import LabeledAndSelected, batch_as_is
from ssat.lightning import EMA, RobustClassifierModule

# make_trainer(stage, out_dir, max_epochs, callbacks, batches_per_epoch) -> lightning.Trainer
TrainerFactory = Callable[..., L.Trainer]


def eval_loader(images: np.ndarray, labels: np.ndarray, batch_size: int) -> DataLoader:
    dataset = TensorDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def fit(model: nn.Module, train_loss: Callable, train_set: LabeledAndSelected,
        sampler: SSATBatchSampler, val_images: np.ndarray, val_labels: np.ndarray, out_dir: Path,
        make_trainer: TrainerFactory, stage: str, epochs: int, optim: dict[str, Any], augment: dict[str, Any],
        eval_batch_size: int, val_pgd: dict[str, Any] | None, ema: dict[str, Any] | None = None,
        patience: int | None = None, callbacks: tuple = ()) -> dict[str, Any]:
    """Train, keep best.ckpt (by validation robust accuracy if val_pgd, else clean) and last.ckpt,
    resume from last.ckpt when an earlier attempt left one, and save the best weights as model.pt.

    With ``ema`` ({decay, warmup}) validation and model.pt use the averaged weights; with ``patience`` training
    stops once the monitored validation accuracy has not improved for that many epochs.
    """
    module = RobustClassifierModule(model, train_loss, optim, epochs, augment, val_pgd)
    monitor = "val/robust_acc" if val_pgd else "val/acc"
    ckpt_dir = out_dir / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="max", save_last=True,
                                 auto_insert_metric_name=False)
    callbacks = [checkpoint, *callbacks]
    if ema:
        callbacks.append(EMA(**ema))
    if patience:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=patience))
    trainer = make_trainer(stage, out_dir, epochs, callbacks, len(sampler))
    train_loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=batch_as_is)
    val_loader = eval_loader(val_images, val_labels, eval_batch_size)
    last = ckpt_dir / "last.ckpt"
    trainer.fit(module, train_loader, val_loader, ckpt_path=last if last.exists() else None)
    best = torch.load(checkpoint.best_model_path or last, map_location="cpu", weights_only=False)
    weights = EMA.weights_in(best) if ema else best["state_dict"]
    state = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    torch.save(state, out_dir / "model.pt")
    score = checkpoint.best_model_score
    return {
        "epochs": int(trainer.current_epoch),
        "best_epoch": int(best["epoch"]),
        # Epochs trained until the best validation score: what "trained to convergence" costs.
        "epochs_to_convergence": int(best["epoch"]) + 1,
        "early_stopped": int(trainer.current_epoch) < epochs,
        "ema": bool(ema),
        "monitor": monitor,
        "best_val": float(score) if score is not None else None,
        "num_labeled": train_set.num_labeled,
        "num_unlabeled": len(train_set) - train_set.num_labeled,
    }
