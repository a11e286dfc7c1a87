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

from ssat.data.sampler import SSATBatchSampler
from ssat.data.training_set import LabeledAndSelected
from ssat.selection.coreset import CoresetSchedule, CoresetSelector, last_layer_gradients

log = logging.getLogger("ssat")
HISTORY = "coreset_selections.json"


def candidate_part(train_set: LabeledAndSelected) -> tuple[range, np.ndarray, str]:
    """The training set's indices the coreset is chosen from, their labels, and the sampler's subset attribute:
    the pseudo-labeled pool points, or the labeled points when there are none (selection.target=labeled)."""
    if len(train_set.selection):
        return range(train_set.num_labeled, len(train_set)), train_set.pseudo_labels, "unlabeled_subset"
    return range(train_set.num_labeled), train_set.labeled_labels, "labeled_subset"


class CoresetReselection(Callback):
    """Sets the sampler's subset and batch count and the training set's loss weights at the start of each epoch.

    Epochs are the trainer's (``schedule.trained_epochs`` of them); re-selections and the history are logged by
    the learning-rate schedule's epoch."""

    def __init__(self, selector: CoresetSelector, train_set: LabeledAndSelected, sampler: SSATBatchSampler,
                 train_loss, size: int, schedule: CoresetSchedule, seed: int, out_dir: Path):
        self.selector, self.train_set, self.sampler, self.train_loss = selector, train_set, sampler, train_loss
        self.size, self.schedule, self.seed, self.out_dir = size, schedule, seed, out_dir
        self.candidates, self.labels, self.subset_attribute = candidate_part(train_set)
        self.positions: np.ndarray | None = None
        self.weights: np.ndarray | None = None
        self.history: list[dict] = []
        self.next_epoch = 0  # the trainer's epoch that runs next: its batch count is on the sampler
        self.apply()

    def apply(self) -> None:
        """Weight 1 everywhere, then the coreset's weights on its positions (nothing else is drawn)."""
        weights = np.ones(len(self.train_set), dtype=np.float32)
        subset = None
        if self.positions is not None:
            start = self.candidates.start
            weights[self.candidates.start:self.candidates.stop] = 0.0
            weights[start + self.positions] = self.weights
            subset = torch.from_numpy(np.asarray(self.positions, dtype=np.int64))
        setattr(self.sampler, self.subset_attribute, subset)
        self.sampler.num_batches = self.schedule.batches(self.next_epoch)
        self.train_set.weights = weights

    def reselect(self, model: torch.nn.Module, device: torch.device, epoch: int) -> None:
        started = time.perf_counter()
        step, candidates = self.selector.batch_size, self.candidates
        batches = (self.train_set.__getitems__(candidates[s:s + step])[:2] for s in range(0, len(candidates), step))
        with torch.random.fork_rng():  # the attacks' random starts depend on (seed, epoch) only, on every rank
            torch.manual_seed(self.seed * 1_000_003 + epoch)
            grads = last_layer_gradients(model, self.train_loss, batches, device, self.selector.fc_weights,
                                         self.selector.gradient)
        rng = np.random.default_rng([self.seed, epoch])
        self.positions, self.weights = self.selector.choose(grads, self.labels, self.size, rng)
        seconds = time.perf_counter() - started
        self.history.append({"epoch": epoch, "size": int(len(self.positions)), "seconds": seconds})
        log.info("coreset %s: %d of %d candidates chosen at epoch %d in %.1f s", self.selector.name,
                 len(self.positions), len(candidates), epoch, seconds)
        (self.out_dir / HISTORY).write_text(json.dumps(self.history, indent=2) + "\n")

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
        self.sampler.num_batches = self.schedule.batches(self.next_epoch)

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
        return {"coreset_size": self.size, "reselections": self.history,
                "reselection_seconds": float(sum(h["seconds"] for h in self.history)),
                "coreset_schedule": self.schedule.summary()}
