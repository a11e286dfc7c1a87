"""One LightningModule for both training stages: the intermediate model and the SSAT model.

They differ only in the training loss (cross-entropy, TRADES or PGD-AT) and the batches they are given.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch import nn

from ssat.attacks import pgd_attack
from ssat.data.augment import augment
from ssat.errors import ConfigError, TrainingDiverged

SCHEDULES = ("cosine", "multistep", "constant")


def build_optimizer(parameters, epochs: int, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                    nesterov: bool = False, schedule: str = "multistep", milestones=(), gamma: float = 0.1):
    """SGD with a per-epoch learning-rate schedule."""
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                nesterov=nesterov)
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    elif schedule == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    elif schedule == "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    else:
        raise ConfigError(f"optim.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    return optimizer, scheduler


class RobustClassifierModule(L.LightningModule):
    """Trains ``model`` with ``train_loss``; validates clean and (optionally) PGD accuracy.

    Batches arrive as uint8 images and are scaled to [0, 1] and augmented on the device.
    """

    def __init__(self, model: nn.Module, train_loss: Callable, optim: dict[str, Any], epochs: int,
                 augment: dict[str, Any] | None = None, val_pgd: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.train_loss = train_loss
        self.optim = dict(optim)
        self.epochs = epochs
        self.augment = dict(augment or {})
        self.val_pgd = dict(val_pgd) if val_pgd else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y, *weights = batch  # weights: a coreset's per-point loss weights
        x = x.float().div_(255.0)
        if self.trainer is not None and self.trainer.training:
            x = augment(x, **self.augment)
        return x, y, *weights

    def training_step(self, batch, batch_idx: int):
        x, y, *weights = batch
        loss, logs = self.train_loss(self.model, x, y, *weights)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the training loss became {loss.item()} at epoch {self.current_epoch}, "
                                   f"batch {batch_idx}; lower the learning rate")
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=True, batch_size=len(x))
        return loss

    def validation_step(self, batch, batch_idx: int):
        x, y = batch
        with torch.no_grad():
            acc = (self.model(x).argmax(1) == y).float().mean()
        self.log("val/acc", acc, prog_bar=True, batch_size=len(x), sync_dist=True)
        if self.val_pgd:
            x_adv = pgd_attack(self.model, x, y, **self.val_pgd)
            with torch.no_grad():
                robust = (self.model(x_adv).argmax(1) == y).float().mean()
            self.log("val/robust_acc", robust, prog_bar=True, batch_size=len(x), sync_dist=True)

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.model.parameters(), self.epochs, **self.optim)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
