"""The trainer group's target: a lightning.Trainer with atomic checkpoints and the speed options that Lightning
has no flag for.

bf16 autocast is Lightning's ``precision: bf16-mixed``; channels_last and torch.compile are applied by the
Accelerate callback when training starts, so checkpoints keep the plain model's state-dict keys. Where stdout is
not a terminal (a SLURM log, CI, a file), Lightning's redrawn bar gives way to a line per epoch.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.plugins import TorchCheckpointIO

from ssat import distributed
from ssat.lightning.progress import LineProgressBar
from ssat.progress import interactive

log = logging.getLogger("ssat")


class Accelerate(Callback):
    """channels_last memory format (CUDA only: on CPU it is no faster) and in-place torch.compile of the
    LightningModule's sub-networks (``nn.Module.compile``: the parameters and state-dict keys stay the same)."""

    def __init__(self, channels_last: bool = False, compile: bool | dict[str, Any] = False):
        self.channels_last = channels_last
        self.compile = compile

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.channels_last and pl_module.device.type == "cuda":
            pl_module.to(memory_format=torch.channels_last)
        if self.compile:
            options = self.compile if isinstance(self.compile, dict) else {}
            for child in pl_module.children():
                child.compile(**options)
            log.info("torch.compile: %s", ", ".join(type(c).__name__ for c in pl_module.children()))


class AtomicCheckpointIO(TorchCheckpointIO):
    """A checkpoint is written and synced under a temporary name beside its final one, then renamed over it: a
    kill or a full disk at any moment leaves the previous checkpoint whole. (Lightning's own transaction writes
    the temporary file in /tmp and moves it, a copy when the checkpoints live on another file system.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        buffer = io.BytesIO()  # torch.save into a file turns a full disk's OSError into an opaque RuntimeError
        torch.save(checkpoint, buffer)
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def build_trainer(channels_last: bool = False, compile: bool | dict[str, Any] = False,
                  callbacks: list | None = None, **trainer_kwargs) -> L.Trainer:
    """``lightning.Trainer(**trainer_kwargs)`` with atomic checkpoints, the Accelerate callback when a speed
    option is on, and progress lines instead of Lightning's bar (which writes to stdout) off a terminal. Under DDP
    in a SLURM job of several tasks, the devices and nodes are the job's."""
    callbacks = list(callbacks or [])
    if distributed.is_ddp(trainer_kwargs):
        trainer_kwargs.update(distributed.placement(trainer_kwargs.get("devices", "auto"),
                                                    trainer_kwargs.get("num_nodes", 1)))
    if channels_last or compile:
        callbacks.append(Accelerate(channels_last, compile))
    if (trainer_kwargs.get("enable_progress_bar", True) and not interactive(sys.stdout)
            and not any(isinstance(c, ProgressBar) for c in callbacks)):
        callbacks.append(LineProgressBar())
    return L.Trainer(callbacks=callbacks, plugins=[AtomicCheckpointIO()], **trainer_kwargs)
