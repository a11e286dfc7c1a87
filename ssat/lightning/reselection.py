"""Adaptive selection: a score-based selector re-chooses its budget of the pool during SSAT with the current model.

At the end of the epoch before each scheduled one, the whole pool is embedded with the current network (the EMA's
averaged weights when the EMA is on, in eval mode), streamed to memory maps by the embed stage's own code (so a pool
of millions never sits in RAM, and under DDP every rank embeds its share), scored and re-selected with the select
stage's boundary/random rule; the new points replace the training set's selected ones with the intermediate model's
labels, or the current model's (``relabel``). The re-selection runs before last.ckpt is written, which holds the
current selection and the history, so a resumed run trains on the same points and continues the same schedule.
"""

from __future__ import annotations

import logging
import shutil
import time

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from ssat import distributed
from ssat.artifacts import Embedding, Reselections
from ssat.lightning.ema import evaluated_model
from ssat.selection.base import Selection, Selector, TrainingSetup

log = logging.getLogger("ssat")
WORK = "reselect"  # the stage folder's scratch space for one re-selection's embedding, removed after it
CHOSEN = "chosen.npz"


class AdaptiveReselection(Callback):
    """Re-chooses the budget with the current model before each epoch of ``epochs``."""

    def __init__(self, selector: Selector, setup: TrainingSetup, epochs: list[int]):
        self.selector, self.training, self.epochs = selector, setup, list(epochs)
        self.history: list[dict] = []
        self.current: dict[str, np.ndarray] | None = None  # the last re-selection: indices, labels, soft labels

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Runs before last.ckpt is saved (the trainer calls checkpoint callbacks last), so it holds the result."""
        epoch = trainer.current_epoch + 1
        if trainer.should_stop:  # early stopping: no epoch follows
            return
        if epoch in self.epochs and all(entry["epoch"] != epoch for entry in self.history):
            self.reselect(evaluated_model(trainer, pl_module), pl_module.device, epoch)

    def reselect(self, model: torch.nn.Module, device: torch.device, epoch: int) -> None:
        from ssat.stages.embed import embed_pool

        started = time.perf_counter()
        setup, pool = self.training, self.training.pool
        work = setup.out_dir / WORK
        if distributed.rank() == 0:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
        distributed.barrier()
        embed_pool(model, setup.pool_images, work, pool.embed_batch_size, device, pool.embed_dtype)
        if distributed.rank() == 0:
            self._choose(work, epoch)
        distributed.barrier()
        chosen = np.load(work / CHOSEN)
        self.current = {name: chosen[name] for name in chosen.files}
        distributed.barrier()
        if distributed.rank() == 0:
            shutil.rmtree(work, ignore_errors=True)
        previous = set(setup.train_set.selection.tolist())
        self.apply()
        entry = {"epoch": epoch, "size": int(len(self.current["indices"])),
                 "boundary": int(self.current["num_boundary"]),
                 "new": int(len(set(self.current["indices"].tolist()) - previous)),
                 "relabelled": bool(self.selector.relabel), "seconds": time.perf_counter() - started}
        if pool.hidden_labels is not None:
            entry["pseudo_label_acc"] = float((self.current["labels"] == pool.hidden_labels[
                self.current["indices"]]).mean())
        self.history.append(entry)
        log.info("reselect %s: %d of %d pool points re-chosen with the current model for epoch %d (%d new) in "
                 "%.1f s", self.selector.name, entry["size"], len(setup.pool_images), epoch, entry["new"],
                 entry["seconds"])

    def _choose(self, work, epoch: int) -> None:
        """Rank 0: score the fresh embedding, choose the budget, label it, and leave the result for every rank."""
        setup, pool = self.training, self.training.pool
        embedding = Embedding.load(work)
        seed = (setup.seed * 1_000_003 + epoch) % 2**31
        selection: Selection = self.selector.choose_n(embedding, setup.size, seed)
        logits = embedding.logits if self.selector.relabel else pool.intermediate_logits
        labels, soft = pool.labels.of(logits, selection.indices)
        Reselections.save(setup.out_dir, epoch, selection.indices)
        arrays = {"indices": selection.indices, "labels": labels, "num_boundary": np.int64(selection.num_boundary)}
        np.savez(work / CHOSEN, **arrays, **({} if soft is None else {"soft": soft}))

    def apply(self) -> None:
        if self.current is not None:
            self.training.train_set.replace_selection(self.current["indices"], self.current["labels"],
                                                      self.current.get("soft"))

    def state_dict(self) -> dict:
        """Tensors and plain values (a resumed run loads last.ckpt without unpickling arrays)."""
        current = None if self.current is None else {k: torch.from_numpy(np.asarray(v))
                                                      for k, v in self.current.items()}
        return {"history": self.history, "current": current}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])
        current = state_dict["current"]
        self.current = None if current is None else {k: v.numpy() for k, v in current.items()}
        self.apply()

    def summary(self) -> dict:
        return {"reselections": self.history, "reselect_epochs": self.epochs,
                "reselect_relabel": bool(self.selector.relabel)}
