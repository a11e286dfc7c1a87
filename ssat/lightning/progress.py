"""Lightning's progress in a log file: Lightning's own bar redraws itself at every batch, and in a file every
redraw stays (the default digits run wrote 1,400 lines of them). This bar writes one line per epoch with the
metrics the live bar shows, and one at most every ``interval`` seconds within a long epoch."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

from ssat.progress import INTERVAL

log = logging.getLogger("ssat")


def format_metrics(metrics: dict[str, Any]) -> str:
    """``key=value`` pairs, numbers to 4 significant digits."""
    def value(v: Any) -> str:
        v = v.item() if hasattr(v, "item") else v
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k}={value(v)}" for k, v in metrics.items())


class LineProgressBar(ProgressBar):
    """One log line per training epoch (``<stage> epoch e/E: <metrics>``) and, within an epoch, one whenever
    ``interval`` seconds of the injectable ``clock`` have passed since the last line."""

    def __init__(self, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval, self.clock = interval, clock
        self.enabled = True
        self._epoch_start = self._last = 0.0
        self._batches = 0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: the same on every line
        return metrics

    def _stage(self, trainer: L.Trainer) -> str:
        return trainer.logger.name if trainer.logger is not None and trainer.logger.name else "training"

    def _epochs(self, trainer: L.Trainer) -> str:
        total = trainer.max_epochs
        return f"{trainer.current_epoch + 1}/{total}" if total is not None and total > 0 else str(
            trainer.current_epoch + 1)

    def _line(self, trainer: L.Trainer, pl_module: L.LightningModule, where: str, now: float) -> None:
        self._last = now
        metrics = format_metrics(self.get_metrics(trainer, pl_module))
        log.info("%s epoch %s, %s, %.1f s%s", self._stage(trainer), self._epochs(trainer), where,
                 now - self._epoch_start, f": {metrics}" if metrics else "")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._last = self.clock()
        self._batches = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batches += 1
        now = self.clock()
        total = self.total_train_batches
        last = math.isfinite(total) and batch_idx + 1 >= total  # the epoch's own line follows
        if self.enabled and not last and now - self._last >= self.interval:
            of = f"/{int(total)}" if math.isfinite(total) else ""
            self._line(trainer, pl_module, f"batch {batch_idx + 1}{of}", now)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            self._line(trainer, pl_module, f"{self._batches} batches", self.clock())
