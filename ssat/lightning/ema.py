"""Exponential moving average of the weights (Polyak averaging) as a Lightning callback.

Robust training gains a point or more of robust accuracy from evaluating an EMA of the weights (Rebuffi et al.
2021, "Data augmentation can improve robustness"). The average lives in the callback, so the checkpoint keeps
the live weights in its state_dict (for resuming) and the average under ``callbacks["EMA"]``.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ssat.errors import ConfigError


class EMA(Callback):
    """Averages the parameters after every training batch and validates with the average.

    decay_t = min(decay, (1 + t) / (warmup + t)) after t updates, so the first updates follow the weights
    closely instead of dragging in the random initialisation. With ``start`` > 0 the average copies the weights for
    that share of the training's optimizer steps and t counts from there (DM-Improves-AT: 2.5%, the learning
    rate's warm-up, up to one step). Buffers (batch-norm running statistics, counters)
    are copied, not averaged: they must describe the averaged network's activations, and the live ones are the
    closest estimate.
    """

    def __init__(self, decay: float = 0.999, warmup: int = 10, start: float = 0.0):
        if not 0 <= decay < 1:
            raise ConfigError(f"ssat.ema.decay={decay} is outside [0, 1) (null turns the EMA off)")
        if warmup < 1:
            raise ConfigError(f"ssat.ema.warmup={warmup} must be at least 1")
        if not 0 <= start < 1:
            raise ConfigError(f"ssat.ema.start={start} is outside [0, 1)")
        self.decay, self.warmup, self.start = decay, warmup, start
        self.start_steps = 0
        self.updates = 0
        self.ema: dict[str, torch.Tensor] | None = None
        self._live: dict[str, torch.Tensor] | None = None
        self._params: set[str] = set()

    def current_decay(self) -> float:
        t = self.updates - self.start_steps
        return 0.0 if t < 0 else min(self.decay, (1 + t) / (self.warmup + t))

    def _ready(self, pl_module: L.LightningModule) -> None:
        state = pl_module.state_dict()
        self._params = {name for name, _ in pl_module.named_parameters()}
        if self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in state.items()}
        else:
            self.ema = {k: v.to(state[k].device) for k, v in self.ema.items()}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_steps = round(self.start * trainer.estimated_stepping_batches) if self.start else 0
        self._ready(pl_module)

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        decay = self.current_decay()
        for name, value in pl_module.state_dict().items():
            if name in self._params and value.is_floating_point():
                self.ema[name].lerp_(value, 1.0 - decay)
            else:
                self.ema[name].copy_(value)
        self.updates += 1

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ready(pl_module)
        self._live = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        pl_module.load_state_dict(self.ema)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs before ModelCheckpoint's hook (Lightning calls checkpoint callbacks last), so checkpoints keep the
        # live weights in their state_dict.
        self._restore(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore(pl_module)

    def _restore(self, pl_module: L.LightningModule) -> None:
        if self._live is not None:
            pl_module.load_state_dict(self._live)
            self._live = None

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "ema": self.ema}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = state_dict["updates"]
        self.ema = state_dict["ema"]

    @classmethod
    def weights_in(cls, checkpoint: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The averaged LightningModule state_dict of a checkpoint written with this callback, else None."""
        state = checkpoint.get("callbacks", {}).get(cls.__qualname__)
        return state["ema"] if state else None


def evaluated_model(trainer: L.Trainer, pl_module: L.LightningModule) -> torch.nn.Module:
    """The network validation sees: a copy holding the EMA's averaged weights when an EMA callback averages
    them, else the module's own network."""
    ema = next((cb.ema for cb in trainer.callbacks if isinstance(cb, EMA) and cb.ema is not None), None)
    if ema is None:
        return pl_module.model
    model = copy.deepcopy(pl_module.model)
    model.load_state_dict({k[len("model."):]: v for k, v in ema.items() if k.startswith("model.")})
    return model
