"""LightningModules of the training stages and their callbacks."""

from ssat.lightning.classifier import RobustClassifierModule
from ssat.lightning.ema import EMA

__all__ = ["EMA", "RobustClassifierModule"]
