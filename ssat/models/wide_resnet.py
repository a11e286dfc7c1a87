"""Wide ResNet (Zagoruyko & Komodakis 2016) as in the TRADES/RST code, the backbone of robust self-training.

``activation=silu`` with ``bn_momentum=0.01`` is the WRN-28-10 of Gowal et al. 2020 and Wang et al. 2023
(DM-Improves-AT's `wrn-28-10-swish`), whose stride-2 convolutions pad only the bottom and right edge (TensorFlow's
SAME) where this one pads all four: the same parameters, a one-pixel shift of the sampling grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ssat.errors import ConfigError
from ssat.models.base import Classifier
from ssat.models.layout import KeyLayout


ACTIVATIONS = {"relu": F.relu, "silu": F.silu}


class WideBasicBlock(nn.Module):
    """Pre-activation block; when the width changes, the pre-activated input also feeds the 1x1 shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float, activation: str = "relu",
                 bn_momentum: float = 0.1):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.bn1 = nn.BatchNorm2d(in_planes, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = (
            nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)
            if in_planes != out_planes
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(x))
        if self.shortcut is not None:
            x = out
        out = self.act(self.bn2(self.conv1(out)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (self.shortcut(x) if self.shortcut is not None else x)


class WideResNet(Classifier):
    """WRN-depth-widen_factor: 3x3 stem, three stages of (depth-4)/6 blocks (16k-32k-64k wide), final BN and
    activation (ReLU, or SiLU as in the generated-data state of the art).

    RobustBench's ``WideResNet`` (from the TRADES code) computes the same function with ReLU; its input is in [0, 1]
    and its normalising variants (``Rice2020OverfittingNet``) hold the statistics as ``mu`` and ``sigma``."""

    robustbench = KeyLayout(
        renames=(("block{g}.{i}.shortcut.", "block{g}.layer.{i}.convShortcut."),
                 ("block{g}.{i}.", "block{g}.layer.{i}."), ("bn.", "bn1."), ("head.", "fc."), ("mean", "mu"),
                 ("std", "sigma")),
        definition="robustbench.model_zoo.architectures.wide_resnet.WideResNet(depth={depth}, "
                   "widen_factor={widen_factor}, num_classes={num_classes})")

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        activation: str = "relu",
        bn_momentum: float = 0.1,
    ):
        super().__init__(mean, std)
        self._check_channels(in_channels)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(f"model depth={depth} is not a Wide ResNet depth; use 6n+4 with n >= 1 (e.g. 28 or 34)")
        if widen_factor < 1:
            raise ConfigError(f"model widen_factor={widen_factor} must be a positive integer (e.g. 10)")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model dropout={dropout} must be in [0, 1)")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"model activation={activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if not 0.0 < bn_momentum <= 1.0:
            raise ConfigError(f"model bn_momentum={bn_momentum} must be in (0, 1] (PyTorch's: the weight of the "
                              f"batch's statistics in the running ones)")
        self.act = ACTIVATIONS[activation]
        if activation != "relu":  # RobustBench's SiLU WRN (DMWideResNet) pads its strided convolutions otherwise
            self.robustbench = None
        n = (depth - 4) // 6
        self.depth, self.widen_factor = depth, widen_factor
        self.architecture = f"WideResNet-{depth}-{widen_factor}"
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        stages = []
        for in_planes, out_planes, stride in zip(widths[:-1], widths[1:], (1, 2, 2)):
            blocks = [WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropout,
                                     activation, bn_momentum) for i in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(widths[3], momentum=bn_momentum)
        self.feature_dim = widths[3]
        self.head = nn.Linear(self.feature_dim, num_classes)
        self._init_weights()

    def definition_args(self) -> dict[str, int]:
        return {**super().definition_args(), "depth": self.depth, "widen_factor": self.widen_factor}

    def _init_weights(self) -> None:
        """He init (fan-out) for convs and zero linear bias, as in the TRADES/RST reference code."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def body(self, x_normalized: Tensor) -> Tensor:
        out = self.conv1(x_normalized)
        out = self.block3(self.block2(self.block1(out)))
        out = self.act(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)
