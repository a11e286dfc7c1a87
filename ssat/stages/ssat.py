"""Stage 5: semi-supervised adversarial training on the labeled set plus the pseudo-labeled selection."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
from torch import nn

from ssat import distributed
from ssat.artifacts import PseudoLabels, SelectionFiles
from ssat.attacks.losses import WeightedLoss
from ssat.config import build
from ssat.data.sampler import SSATBatchSampler
from ssat.data.splits import SemiSupervisedData
from ssat.data.training_set import LabeledAndSelected
from ssat.lightning.coreset import CoresetReselection
from ssat.pipeline.runner import StageContext
from ssat.pipeline.stage import Stage
from ssat.selection.coreset import CoresetSelector
from ssat.selection.target import selection_target
from ssat.stages.training import TrainerFactory, fit


def train_ssat(model: nn.Module, data: SemiSupervisedData, selection: np.ndarray, pseudo_labels: np.ndarray,
               out_dir: Path, make_trainer: TrainerFactory, train_loss: Callable, epochs: int, batch_size: int,
               unsup_fraction: float, batches_per_epoch: int | None, optim: dict[str, Any],
               augment: dict[str, Any], eval_batch_size: int, val_pgd: dict[str, Any], seed: int,
               rank: int = 0, world_size: int = 1, loader: dict[str, Any] | None = None,
               ema: dict[str, Any] | None = None, patience: int | None = None,
               coreset: CoresetSelector | None = None, coreset_size: int = 0) -> dict[str, Any]:
    """Writes checkpoints/{best,last}.ckpt and model.pt (best by validation PGD accuracy, EMA weights if ema).

    With a ``coreset`` selector the selection is its candidates: training draws from a weighted coreset of
    ``coreset_size`` of them, re-chosen during training, on ACS's schedule of epochs (``CoresetSchedule``: a warm
    start on every candidate, skipped epochs, coreset epochs a share c = coreset_size / candidates of the batches
    of a full epoch, whether an epoch is ``batches_per_epoch`` batches or one pass)."""
    train_set = LabeledAndSelected(data.labeled_images, data.labeled_labels, data.pool_images, selection,
                                   pseudo_labels)
    sampler = SSATBatchSampler(train_set.num_labeled, len(selection), batch_size, unsup_fraction,
                               batches_per_epoch, seed=seed, rank=rank, world_size=world_size)
    if coreset is None:
        return fit(model, train_loss, train_set, sampler, data.val_images, data.val_labels, out_dir, make_trainer,
                   "ssat", epochs, optim, augment, eval_batch_size, val_pgd, loader, ema, patience)
    candidates = len(selection) or train_set.num_labeled
    schedule = coreset.schedule(epochs, coreset_size / candidates, len(sampler))
    reselection = CoresetReselection(coreset, train_set, sampler, train_loss, coreset_size, schedule, seed, out_dir)
    info = fit(model, WeightedLoss(train_loss), train_set, sampler, data.val_images, data.val_labels, out_dir,
               make_trainer, "ssat", epochs, optim, augment, eval_batch_size, val_pgd, loader, ema, patience,
               callbacks=(reselection,), trained_epochs=schedule.trained_epochs)
    return {**info, **reselection.summary()}


def _training_data(ctx: StageContext):
    target, data = selection_target(ctx.cfg.selection.target), ctx.value("pool")
    return target.training_data(data, SelectionFiles.indices(ctx.path("select")),
                                PseudoLabels.load(ctx.path("pseudo_label")))


def _run(ctx: StageContext, out: Path) -> dict[str, Any]:
    cfg, ssat_cfg = ctx.cfg, ctx.cfg.ssat
    selector = build(cfg.selector)
    train_data, selection, labels = _training_data(ctx)
    L.seed_everything(cfg.seed, verbose=False)
    return train_ssat(build(cfg.model), train_data, selection, labels, out, ctx.trainer_factory(), build(cfg.attack),
                      ssat_cfg.epochs, ssat_cfg.batch_size, ssat_cfg.unsup_fraction, ssat_cfg.batches_per_epoch,
                      ssat_cfg.optim, cfg.dataset.augment, cfg.eval.batch_size, dict(cfg.eval.val_pgd), cfg.seed,
                      distributed.rank(), distributed.world_size(), dict(cfg.loader),
                      ema=dict(ssat_cfg.ema) if ssat_cfg.ema.decay is not None else None,
                      patience=ssat_cfg.early_stopping.patience,
                      coreset=selector if selector.chooses_during_training else None,
                      coreset_size=ctx.inputs["select"].info["selected"])


def _describe(ctx: StageContext) -> str:
    train_data, selection, _ = _training_data(ctx)
    return (f"{ctx.cfg.attack.name} on {len(train_data.labeled_labels)} labeled + {len(selection)} pseudo-labeled, "
            f"{ctx.cfg.ssat.epochs} epochs")


STAGE = Stage("ssat", _run, needs=("pool", "select", "pseudo_label"), every_rank=True, describe=_describe,
              code=("ssat.models", "ssat.attacks", "ssat.selection", "ssat.lightning"),
              reads=("model", "ssat", "attack", "selector", "budget", "seed", "trainer", "selection.target",
                     "eval.val_pgd", "eval.batch_size"))
