"""Image classifiers that take inputs in [0, 1], normalise internally and expose penultimate features."""

from ssat.models.base import Classifier
from ssat.models.preact_resnet import PreActResNet18
from ssat.models.small_cnn import SmallCNN
from ssat.models.wide_resnet import WideResNet

__all__ = ["Classifier", "PreActResNet18", "SmallCNN", "WideResNet"]
