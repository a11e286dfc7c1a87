"""Stage 5: semi-supervised adversarial training on the labeled set plus the pseudo-labeled selection."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
from torch import nn

from ssat import distributed
from ssat.artifacts import Embedding, PseudoLabels, SelectionFiles
from ssat.config import build
from ssat.data.sampler import SSATBatchSampler
from ssat.data.splits import SemiSupervisedData
from ssat.data.training_set import LabeledAndSelected
from ssat.pipeline.runner import StageContext
from ssat.pipeline.stage import Stage
from ssat.selection.base import PoolView, Selector, TrainingSetup
from ssat.selection.labels import TrainingLabels
from ssat.selection.target import selection_target
from ssat.stages import pseudo_label as pseudo_label_stage  # the module: the two meet through ssat.pipeline
from ssat.stages.training import FitSettings, TrainerFactory, TrainingJob, fit


@dataclass(frozen=True)
class SSATSettings:
    """The SSAT stage's own settings beside ``FitSettings``: the batches (size, unlabeled share, batches an epoch:
    None for one pass) and the seed of their draw."""

    batch_size: int
    unsup_fraction: float
    batches_per_epoch: int | None
    seed: int


def train_ssat(model: nn.Module, data: SemiSupervisedData, selection: np.ndarray, pseudo_labels: np.ndarray,
               selector: Selector, num_selected: int, train_loss: Callable, settings: SSATSettings,
               fit_settings: FitSettings, out_dir: Path, make_trainer: TrainerFactory,
               soft_labels: np.ndarray | None = None, pool: PoolView | None = None) -> dict[str, Any]:
    """Writes checkpoints/{best,last}.ckpt and model.pt (best by validation PGD accuracy, EMA weights if ema).

    ``soft_labels``: the selection's label distributions (ssat.pseudo_labels=soft). A selector that re-chooses
    during training (``Selector.during_training``) gets the training set, its sampler, the budget's
    ``num_selected`` points and the ``pool``'s view, and adds its loss, callbacks and schedule of epochs."""
    train_set = LabeledAndSelected(data.labeled_images, data.labeled_labels, data.pool_images, selection,
                                   pseudo_labels, soft_labels)
    sampler = SSATBatchSampler(train_set.num_labeled, len(selection), settings.batch_size, settings.unsup_fraction,
                               settings.batches_per_epoch, seed=settings.seed, rank=distributed.rank(),
                               world_size=distributed.world_size())
    setup = TrainingSetup(train_set, sampler, train_loss, data.pool_images, num_selected, fit_settings.epochs,
                          settings.seed, out_dir, pool)
    job = TrainingJob("ssat", model, train_loss, train_set, sampler, data.val_images, data.val_labels, out_dir,
                      make_trainer)
    return fit(job, fit_settings, selector.during_training(setup))


def fit_settings(cfg) -> FitSettings:
    """The SSAT stage's training settings from the run's config."""
    ssat_cfg = cfg.ssat
    return FitSettings(ssat_cfg.epochs, dict(ssat_cfg.optim), dict(cfg.dataset.augment), cfg.eval.batch_size,
                       val_pgd=dict(cfg.eval.val_pgd), loader=dict(cfg.loader),
                       ema=dict(ssat_cfg.ema) if ssat_cfg.ema.decay is not None else None,
                       patience=ssat_cfg.early_stopping.patience)


def _training_data(ctx: StageContext):
    target, data = selection_target(ctx.cfg.selection.target), ctx.value("pool")
    return target.training_data(data, SelectionFiles.indices(ctx.path("select")),
                                PseudoLabels.load(ctx.path("pseudo_label")))


def pool_view(ctx: StageContext) -> PoolView | None:
    """The pool as a re-selection sees it (None when the candidates are the labeled set): the intermediate model's
    logits, the labelling rule of the pseudo-label stage, the hidden labels and the embed stage's settings."""
    target, data, cfg = selection_target(ctx.cfg.selection.target), ctx.value("pool"), ctx.cfg
    if target.known_labels(data) is not None:
        return None
    labels = TrainingLabels(cfg.ssat.pseudo_labels, cfg.ssat.pseudo_label_temperature,
                            pseudo_label_stage.given_labels(ctx))
    return PoolView(Embedding.load(ctx.path("embed")).logits, labels, target.hidden_labels(data),
                    cfg.embed.batch_size, cfg.embed.dtype)


def _run(ctx: StageContext, out: Path) -> dict[str, Any]:
    cfg = ctx.cfg
    train_data, selection, labels = _training_data(ctx)
    soft = PseudoLabels.load_soft(ctx.path("pseudo_label")) if len(selection) else None
    settings = SSATSettings(cfg.ssat.batch_size, cfg.ssat.unsup_fraction, cfg.ssat.batches_per_epoch, cfg.seed)
    L.seed_everything(cfg.seed, verbose=False)
    return train_ssat(build(cfg.model), train_data, selection, labels, build(cfg.selector),
                      ctx.inputs["select"].info["selected"], build(cfg.attack), settings, fit_settings(cfg), out,
                      ctx.trainer_factory(), soft, pool_view(ctx))


def _describe(ctx: StageContext) -> str:
    train_data, selection, _ = _training_data(ctx)
    return (f"{ctx.cfg.attack.name} on {len(train_data.labeled_labels)} labeled + {len(selection)} pseudo-labeled, "
            f"{ctx.cfg.ssat.epochs} epochs")


STAGE = Stage("ssat", _run, needs=("pool", "embed", "select", "pseudo_label"), every_rank=True, describe=_describe,
              # 2: TRADES' log-softmaxes in fp32 (bf16 runs change; fp32 runs compute the same)
              # 3: adaptive re-selection by lcs_gmm below 256 dimensions: the select stage's version 3
              version=3,
              code=("ssat.models", "ssat.attacks", "ssat.selection", "ssat.lightning"),
              reads=("model", "ssat", "attack", "selector", "budget", "seed", "trainer", "selection.target",
                     "eval.val_pgd", "eval.batch_size"))
