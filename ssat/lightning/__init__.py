"""LightningModules of the training stages."""

from ssat.lightning.classifier import RobustClassifierModule

__all__ = ["RobustClassifierModule"]
