"""Per-epoch reseeding, so that a training stage resumed from last.ckpt ends bit for bit where an uninterrupted
run does (on CPU).

Training draws from the global RNGs: augmentation on the device, dropout, the attacks' random starts, the DDPM's
timesteps and noise, the validation PGD's random start. A resumed process starts epoch k with other RNG states
than the uninterrupted one had there, so the callback below seeds every global RNG from (seed, epoch, rank) at
the start of each epoch: the draws of an epoch depend on nothing else, resume is exact by construction and the
checkpoint needs no RNG state. The batch samplers draw from their own generators, also seeded by (seed, epoch).
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A 32-bit seed for one epoch on one rank (ranks draw differently, as their shards differ)."""
    return int(np.random.SeedSequence([seed % 2**64, epoch, rank]).generate_state(1)[0])


def seed_global_rngs(seed: int) -> None:
    """Python's, NumPy's and torch's global RNGs (torch.manual_seed seeds every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def loader_generator() -> torch.Generator:
    """A training DataLoader's own generator, for the worker seed it draws each time an iterator starts (its
    workers draw nothing random): from the global RNG, that draw comes after EpochSeed's reseed in an
    uninterrupted epoch (Lightning restarts the iterator there) and not in a resumed one."""
    return torch.Generator()


class EpochSeed(Callback):
    """Reseeds the global RNGs at each training epoch's start. First in the callback list, so that every other
    hook of the epoch already sees the new state."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed_global_rngs(epoch_seed(self.seed, trainer.current_epoch, trainer.global_rank))
