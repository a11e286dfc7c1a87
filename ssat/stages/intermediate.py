"""Stage 1: the intermediate model, trained on the labeled set only; it embeds, scores and labels the pool.
With ``intermediate.checkpoint=<file>`` the model is the file's instead (ssat/stages/model_file.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import lightning as L
from torch import nn

from ssat import distributed
from ssat.attacks import CrossEntropyLoss, PGDATLoss
from ssat.config import build
from ssat.data.sampler import SSATBatchSampler
from ssat.data.splits import SemiSupervisedData
from ssat.data.training_set import LabeledAndSelected
from ssat.pipeline.runner import StageContext
from ssat.pipeline.stage import Stage, When
from ssat.stages.model_file import file_stage, saved_stage
from ssat.stages.training import FitSettings, TrainerFactory, TrainingJob, fit


def train_intermediate(model: nn.Module, data: SemiSupervisedData, train_loss: Callable, batch_size: int,
                       seed: int, settings: FitSettings, out_dir: Path, make_trainer: TrainerFactory) -> dict[str, Any]:
    """Writes checkpoints/{best,last}.ckpt and model.pt (the best weights by validation accuracy)."""
    sampler = SSATBatchSampler(len(data.labeled_labels), 0, batch_size, 0.0, seed=seed, rank=distributed.rank(),
                               world_size=distributed.world_size())
    train_set = LabeledAndSelected(data.labeled_images, data.labeled_labels)
    job = TrainingJob("intermediate", model, train_loss, train_set, sampler, data.val_images, data.val_labels,
                      out_dir, make_trainer)
    return fit(job, settings)


def _run(ctx: StageContext, out: Path) -> dict[str, Any]:
    cfg = ctx.cfg
    attack = cfg.attack if cfg.intermediate.adversarial else None
    loss = PGDATLoss(eps=attack.eps, alpha=attack.alpha, steps=attack.steps) if attack else CrossEntropyLoss()
    settings = FitSettings(cfg.intermediate.epochs, dict(cfg.intermediate.optim), dict(cfg.dataset.augment),
                           cfg.eval.batch_size, loader=dict(cfg.loader))
    L.seed_everything(cfg.seed, verbose=False)
    return train_intermediate(build(cfg.model), ctx.value("data"), loss, cfg.intermediate.batch_size, cfg.seed,
                              settings, out, ctx.trainer_factory())


def _describe(ctx: StageContext) -> str:
    return (f"{ctx.cfg.model._target_.rsplit('.', 1)[-1]} on {len(ctx.value('data').labeled_labels)} labeled "
            f"images, {ctx.cfg.intermediate.epochs} epochs")


STAGE = Stage("intermediate", _run, needs=("data",), every_rank=True, describe=_describe,
              code=("ssat.models", "ssat.lightning"),
              reads=("model", "intermediate", "seed", "trainer", "eval.batch_size",
                     When("intermediate.adversarial", "attack")), unkeyed=("intermediate.checkpoint",))

CHECKPOINT = file_stage("intermediate_checkpoint", "intermediate.checkpoint")
FROM_CHECKPOINT = saved_stage("intermediate", CHECKPOINT)


def checkpoint_stages(cfg) -> list[Stage]:
    """The stage that reads ``intermediate.checkpoint``, when one is given: first in the plan, so that a file that
    does not fit fails before any work."""
    return [CHECKPOINT] if cfg.intermediate.checkpoint is not None else []


def stage(cfg) -> Stage:
    """The intermediate model: trained, or the weights of ``intermediate.checkpoint``."""
    return FROM_CHECKPOINT if cfg.intermediate.checkpoint is not None else STAGE
