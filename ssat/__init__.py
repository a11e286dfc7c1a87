"""ssat: efficient semi-supervised adversarial training."""

__version__ = "0.1.0"
