"""Stage 6: clean and PGD accuracy on the test set, model in eval mode, inputs in [0, 1]."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ssat.attacks import eval_mode, pgd_attack


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int,
             device: torch.device | str = "cpu", pgd: dict[str, Any] | None = None, desc: str = "eval") -> float:
    """Fraction of points classified correctly, under a PGD attack when ``pgd`` is given."""
    model = model.to(device)
    correct = 0
    with eval_mode(model):
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device).float() / 255
            y = torch.from_numpy(labels[start:start + batch_size].astype(np.int64)).to(device)
            if pgd:
                x = pgd_attack(model, x, y, **pgd)
            with torch.no_grad():
                correct += int((model(x).argmax(1) == y).sum())
    return correct / len(images)


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int, pgd: dict[str, Any],
             device: torch.device | str = "cpu") -> dict[str, Any]:
    return {
        "clean_acc": accuracy(model, images, labels, batch_size, device, desc="clean"),
        "robust_acc": accuracy(model, images, labels, batch_size, device, pgd=pgd, desc="pgd"),
        "num_test": int(len(labels)),
    }
