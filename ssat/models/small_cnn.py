"""A small VGG-style CNN that trains quickly on CPU, sized for 8x8 digits and upward."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ssat.models.base import Classifier


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(Classifier):
    """Five 3x3 conv layers with two 2x downsamplings, so even 8x8 inputs keep a 2x2 map before global pooling."""

    def __init__(
        self, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float], width: int = 32
    ):
        super().__init__(mean, std)
        self._check_channels(in_channels)
        w = width
        self.architecture = f"SmallCNN-{width}"
        self.layers = nn.Sequential(
            *_conv_bn_relu(in_channels, w),
            *_conv_bn_relu(w, w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w, 2 * w),
            *_conv_bn_relu(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim = 4 * w
        self.head = nn.Linear(self.feature_dim, num_classes)

    def body(self, x_normalized: Tensor) -> Tensor:
        return self.layers(x_normalized)
