"""PreAct ResNet-18 (He et al. 2016) with the CIFAR stem, the usual backbone of robust training (Rice et al. 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ssat.models.base import Classifier
from ssat.models.layout import KeyLayout


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; a 1x1 projection on the pre-activated input when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
            if stride != 1 or in_planes != planes
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(Classifier):
    """PreAct ResNet-18: 3x3 stem without max pool, four stages of two blocks (64-128-256-512), final BN-ReLU.

    Rice et al. 2020's network: RobustBench defines it as ``PreActResNet(PreActBlockV2, [2, 2, 2, 2],
    bn_before_fc=True)`` (its ``Rice2020OverfittingNetL2``, with ``mu`` and ``sigma``). RobustBench's
    ``PreActResNet18()`` is another network: its shortcuts take the block's input before the BN-ReLU, and it has no
    final BN-ReLU."""

    robustbench = KeyLayout(
        renames=(("layer{l}.{i}.shortcut.", "layer{l}.{i}.shortcut.0."), ("head.", "linear."), ("mean", "mu"),
                 ("std", "sigma")),
        definition="robustbench.model_zoo.architectures.resnet.PreActResNet(PreActBlockV2, [2, 2, 2, 2], "
                   "num_classes={num_classes}, bn_before_fc=True)")
    architecture = "PreActResNet-18"

    def __init__(self, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__(mean, std)
        self._check_channels(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        stages = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(512)
        self.feature_dim = 512
        self.head = nn.Linear(self.feature_dim, num_classes)

    def body(self, x_normalized: Tensor) -> Tensor:
        out = self.conv1(x_normalized)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)
