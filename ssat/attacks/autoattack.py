"""AutoAttack (Croce & Hein 2020) through `pyautoattack`, the authors' own code as published on PyPI.

"standard" runs APGD-CE, APGD-T (9 target classes, or all C - 1 other classes when there are fewer), FAB-T and
Square (5,000 queries), each on the points that the attacks before it did not fool. APGD-T's targeted DLR loss
needs at least 4 classes (MIN_CLASSES). The warnings of AutoAttack's own checks (zero gradients, a black-box Square
stronger than the white-box attacks, a randomised model) are collected for results.json.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ssat.attacks.pgd import eval_mode
from ssat.choices import AUTOATTACK_VERSIONS as VERSIONS

# The targeted DLR loss of APGD-T reads the four largest logits.
MIN_CLASSES = 4


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().strip()
        if message not in self.messages:
            self.messages.append(message)


class AutoAttack:
    """An attack callable ``(model, x, y) -> x_adv`` like pgd_attack: L-infinity AutoAttack at ``eps``.

    x_adv is the first adversarial example found for each fooled point and x itself elsewhere.
    """

    def __init__(self, eps: float, version: str = "standard", seed: int = 0):
        self.eps, self.version, self.seed = eps, version, seed
        self.warnings: list[str] = []

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from pyautoattack import AutoAttack as _AutoAttack  # imported when used: it is slow to import

        logger = logging.getLogger("auto-attack")
        handler = _Collect(self.warnings)
        logger.addHandler(handler)
        try:
            with eval_mode(model):
                attack = _AutoAttack(model, eps=self.eps, norm="Linf", version=self.version, seed=self.seed,
                                     device=x.device)
                with torch.no_grad():
                    other_classes = model(x[:1]).shape[1] - 1
                attack.apgd_targeted.n_target_classes = min(attack.apgd_targeted.n_target_classes, other_classes)
                attack.fab.n_target_classes = min(attack.fab.n_target_classes, other_classes)
                x_adv, _ = attack.run_standard_evaluation(x.detach(), y, batch_size=len(x))
        finally:
            logger.removeHandler(handler)
        return x_adv.detach()
