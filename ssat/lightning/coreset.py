"""The adaptive coreset during SSAT on ACS's schedule (Dolatabadi et al., ``CoresetSchedule``): round(c kappa E)
full epochs on every candidate, a skip to epoch kappa E of the learning-rate schedule, then epochs of a share c
of the batches on a weighted coreset re-chosen from the current model's adversarial gradients every
``select_every`` epochs.

The trainer runs only the epochs that train; the callback sets each epoch's batch count on the sampler (the
trainer re-reads the loader's length every epoch) and steps the learning-rate schedule over the skipped epochs.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from ssat.selection.base import TrainingSetup
from ssat.selection.coreset import CoresetSchedule, CoresetSelector, last_layer_gradients

log = logging.getLogger("ssat")
HISTORY = "coreset_selections.json"


class CoresetReselection(Callback):
    """Sets the sampler's subset and batch count and the training set's loss weights at the start of each epoch.

    Epochs are the trainer's (``schedule.trained_epochs`` of them); re-selections and the history are logged by
    the learning-rate schedule's epoch."""

    def __init__(self, selector: CoresetSelector, setup: TrainingSetup, schedule: CoresetSchedule):
        self.selector, self.training, self.schedule = selector, setup, schedule
        self.positions: np.ndarray | None = None
        self.weights: np.ndarray | None = None
        self.history: list[dict] = []
        self.next_epoch = 0  # the trainer's epoch that runs next: its batch count is on the sampler
        self.apply()

    def apply(self) -> None:
        """Weight 1 everywhere, then the coreset's weights on its positions (nothing else is drawn)."""
        self.training.train_on(self.positions, self.weights, weighted=True)
        self.training.sampler.num_batches = self.schedule.batches(self.next_epoch)

    def reselect(self, model: torch.nn.Module, device: torch.device, epoch: int) -> None:
        started = time.perf_counter()
        setup, step = self.training, self.selector.batch_size
        candidates = setup.candidates
        batches = (setup.train_set.__getitems__(candidates[s:s + step])[:2] for s in range(0, len(candidates), step))
        with torch.random.fork_rng():  # the attacks' random starts depend on (seed, epoch) only, on every rank
            torch.manual_seed(setup.seed * 1_000_003 + epoch)
            grads = last_layer_gradients(model, setup.train_loss, batches, device, self.selector.fc_weights,
                                         self.selector.gradient)
        rng = np.random.default_rng([setup.seed, epoch])
        self.positions, self.weights = self.selector.choose(grads, setup.candidate_labels, setup.size, rng)
        seconds = time.perf_counter() - started
        self.history.append({"epoch": epoch, "size": int(len(self.positions)), "seconds": seconds})
        log.info("coreset %s: %d of %d candidates chosen at epoch %d in %.1f s", self.selector.name,
                 len(self.positions), len(candidates), epoch, seconds)
        (setup.out_dir / HISTORY).write_text(json.dumps(self.history, indent=2) + "\n")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trainer.reload_dataloaders_every_n_epochs = 1  # the epochs' lengths differ: the trainer re-reads them

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch == self.schedule.warm and self.schedule.skipped:
            with warnings.catch_warnings():  # without a warm start no optimizer step precedes these
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(self.schedule.skipped):
                    trainer.lr_scheduler_configs[0].scheduler.step()
        scheduled = self.schedule.schedule_epoch(epoch)
        if self.selector.selects_at(scheduled, self.schedule.start):
            self.reselect(pl_module.model, pl_module.device, scheduled)
        self.apply()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Before last.ckpt is written (checkpoints save after the other callbacks), so that it resumes with the
        next epoch's length."""
        self.next_epoch = trainer.current_epoch + 1
        self.training.sampler.num_batches = self.schedule.batches(self.next_epoch)

    def state_dict(self) -> dict:
        """Plain lists, so that a resumed run (last.ckpt) trains on the same coreset without unpickling arrays."""
        chosen = self.positions is not None
        return {"positions": self.positions.tolist() if chosen else None,
                "weights": self.weights.tolist() if chosen else None, "history": self.history,
                "next_epoch": self.next_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        chosen = state_dict["positions"] is not None
        self.positions = np.asarray(state_dict["positions"], dtype=np.int64) if chosen else None
        self.weights = np.asarray(state_dict["weights"], dtype=np.float32) if chosen else None
        self.history = list(state_dict["history"])
        self.next_epoch = state_dict["next_epoch"]
        self.apply()

    def summary(self) -> dict:
        return {"coreset_size": self.training.size, "reselections": self.history,
                "coreset_schedule": self.schedule.summary()}
