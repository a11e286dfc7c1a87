"""Common base for all classifiers: normalisation lives inside the model so attacks work in [0, 1] pixel space."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssat.errors import ConfigError
from ssat.models.layout import KeyLayout


class Classifier(nn.Module):
    """Image classifier with normalisation inside the model (inputs in [0, 1]) and a penultimate-feature read-out.

    Keeping the normalisation in the model lets attacks clip to [0, 1] and measure epsilon in pixel units,
    and `features` gives the embedding used to find boundary data.
    """

    feature_dim: int
    head: nn.Linear
    architecture: str  # the name model cards give it (RobustBench's: WideResNet-28-10, PreActResNet-18)
    robustbench: KeyLayout | None = None  # RobustBench's keys for it, where RobustBench defines it

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape:
            raise ConfigError(
                f"model mean {list(mean)} and std {list(std)} must be flat lists of equal length, one value per channel"
            )
        if not bool((std_t > 0).all()):
            raise ConfigError(f"model std {list(std)} must be positive in every channel")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def _check_channels(self, in_channels: int) -> None:
        """Fail early when the per-channel statistics do not match the input channels."""
        if self.mean.shape[1] != in_channels:
            raise ConfigError(
                f"model in_channels={in_channels} but mean/std have {self.mean.shape[1]} values; give one per channel"
            )

    def definition_args(self) -> dict[str, int]:
        """What another code base's definition of the architecture needs to build it (``robustbench.definition``)."""
        return {"num_classes": self.head.out_features, "in_channels": self.mean.shape[1]}

    def normalize(self, x: Tensor) -> Tensor:
        """Map inputs in [0, 1] to the standardised scale the layers were built for."""
        return (x - self.mean) / self.std

    def body(self, x_normalized: Tensor) -> Tensor:
        """Penultimate features (N, feature_dim) after global pooling; implemented by subclasses."""
        raise NotImplementedError

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features of inputs in [0, 1], shape (N, feature_dim)."""
        return self.body(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits of inputs in [0, 1], shape (N, num_classes)."""
        return self.head(self.features(x))
