"""What the stages leave in their folders: each artifact type owns its file names and how it is saved and loaded,
so no other module spells them. (The cache checks every file of a committed folder against its record.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssat.choices import EMBED_DTYPES
from ssat.selection.types import PoolEmbedding, Selection


class ModelWeights:
    """A training stage's chosen weights (model.pt, a plain state dict) and its Lightning checkpoints."""

    FILE = "model.pt"
    CHECKPOINTS = "checkpoints"
    BEST, LAST = "best.ckpt", "last.ckpt"

    @classmethod
    def save(cls, folder: Path, state_dict: dict) -> None:
        torch.save(state_dict, Path(folder) / cls.FILE)

    @classmethod
    def load_into(cls, model: nn.Module, folder: Path) -> nn.Module:
        model.load_state_dict(torch.load(Path(folder) / cls.FILE, map_location="cpu", weights_only=True))
        return model

    @classmethod
    def checkpoint_dir(cls, folder: Path) -> Path:
        return Path(folder) / cls.CHECKPOINTS


class Embedding:
    """Penultimate features (N, D) in ``dtype`` and logits (N, K) float32 of the candidates, as .npy memory maps."""

    FEATURES, LOGITS = "features.npy", "logits.npy"
    DTYPES = {name: getattr(np, name) for name in EMBED_DTYPES}

    @classmethod
    def paths(cls, folder: Path) -> tuple[Path, Path]:
        return Path(folder) / cls.FEATURES, Path(folder) / cls.LOGITS

    @classmethod
    def load(cls, folder: Path) -> PoolEmbedding:
        """Memory-mapped read-only: a pool of millions stays on disk."""
        features, logits = cls.paths(folder)
        return PoolEmbedding(np.load(features, mmap_mode="r"), np.load(logits, mmap_mode="r"))


class SelectionFiles:
    """The chosen indices (boundary part first), every candidate's score, the weights and boundary flags."""

    INDICES, SCORES, WEIGHTS, IS_BOUNDARY = "selection.npy", "scores.npy", "weights.npy", "is_boundary.npy"

    @classmethod
    def save(cls, folder: Path, selection: Selection) -> None:
        for name, array in ((cls.INDICES, selection.indices), (cls.SCORES, selection.scores),
                            (cls.WEIGHTS, selection.weights), (cls.IS_BOUNDARY, selection.is_boundary)):
            np.save(Path(folder) / name, array)

    @classmethod
    def indices(cls, folder: Path) -> np.ndarray:
        return np.load(Path(folder) / cls.INDICES)

    @classmethod
    def load(cls, folder: Path) -> Selection:
        folder = Path(folder)
        return Selection(*(np.load(folder / name) for name in (cls.INDICES, cls.SCORES, cls.WEIGHTS,
                                                                cls.IS_BOUNDARY)))


class PseudoLabels:
    """The training label of each selected point, aligned with the selection, and with ssat.pseudo_labels=soft
    the probabilities (S, K) it trains towards (pseudo_probs.npy; absent when hard)."""

    FILE, SOFT = "pseudo_labels.npy", "pseudo_probs.npy"

    @classmethod
    def save(cls, folder: Path, labels: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        np.save(Path(folder) / cls.FILE, labels)
        if probabilities is not None:
            np.save(Path(folder) / cls.SOFT, probabilities)

    @classmethod
    def load(cls, folder: Path) -> np.ndarray:
        return np.load(Path(folder) / cls.FILE)

    @classmethod
    def load_soft(cls, folder: Path) -> np.ndarray | None:
        path = Path(folder) / cls.SOFT
        return np.load(path) if path.exists() else None


class Reselections:
    """Each re-selection of an adaptive selector during SSAT: the chosen pool indices (boundary part first) by the
    epoch they start, in reselections/epoch_<e>.npy of the SSAT stage's folder."""

    FOLDER = "reselections"

    @classmethod
    def save(cls, folder: Path, epoch: int, indices: np.ndarray) -> None:
        target = Path(folder) / cls.FOLDER
        target.mkdir(exist_ok=True)
        np.save(target / f"epoch_{epoch:05d}.npy", indices)

    @classmethod
    def load(cls, folder: Path) -> dict[int, np.ndarray]:
        files = sorted((Path(folder) / cls.FOLDER).glob("epoch_*.npy"))
        return {int(f.stem.split("_")[1]): np.load(f) for f in files}


class GeneratedImages:
    """Sampled images, uint8 (N, C, H, W), a memory map written batch by batch; and the DDPM they came from."""

    FILE = "images.npy"
    UNET = "unet"

    @classmethod
    def path(cls, folder: Path) -> Path:
        return Path(folder) / cls.FILE

    @classmethod
    def unet_dir(cls, folder: Path) -> Path:
        return Path(folder) / cls.UNET
