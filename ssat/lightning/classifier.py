"""One LightningModule for both training stages: the intermediate model and the SSAT model.

They differ only in the training loss (cross-entropy, TRADES or PGD-AT) and the batches they are given.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch import nn

from ssat.attacks import pgd_attack
from ssat.choices import SCHEDULES
from ssat.data.augment import augment
from ssat.errors import ConfigError, TrainingDiverged

# onecycle's share of the epochs spent raising the learning rate (DM-Improves-AT's `cosinew` schedule).
ONECYCLE_WARMUP = 0.025
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(model: nn.Module, weight_decay: float, norm_weight_decay: bool) -> list[dict[str, Any]]:
    """One group, or two when the normalisation layers' scales and shifts take no weight decay (DM-Improves-AT:
    decaying them only shrinks the scale the next layer undoes)."""
    if norm_weight_decay:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    norm = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    params = list(model.parameters())
    return [{"params": [p for p in params if id(p) not in norm], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in norm], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, epochs: int, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                    nesterov: bool = False, schedule: str = "multistep", milestones=(), gamma: float = 0.1,
                    norm_weight_decay: bool = True):
    """SGD with a per-epoch learning-rate schedule.

    onecycle is torch's OneCycleLR over the epochs as DM-Improves-AT's `cosinew`: from lr / 25 up to lr in the
    first 2.5% of them, then a cosine down to lr / 250,000, and the momentum cycling 0.95 -> 0.85 -> 0.95 against
    it (OneCycleLR's default, kept there; ``momentum`` is then not used).
    """
    optimizer = torch.optim.SGD(parameter_groups(model, weight_decay, norm_weight_decay), lr=lr, momentum=momentum,
                                nesterov=nesterov)
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    elif schedule == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    elif schedule == "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    elif schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, epochs),
                                                        pct_start=ONECYCLE_WARMUP)
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
        optimizer, scheduler = build_optimizer(self.model, self.epochs, **self.optim)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
