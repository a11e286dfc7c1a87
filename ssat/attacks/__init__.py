"""Attacks and adversarial training losses. Inputs are in [0, 1]; attacks run the model in eval mode."""

from ssat.attacks.autoattack import AutoAttack
from ssat.attacks.losses import CrossEntropyLoss, PGDATLoss, TradesLoss
from ssat.attacks.pgd import LOSSES, attack_mode, eval_mode, pgd_attack, project_linf

__all__ = ["AutoAttack", "CrossEntropyLoss", "LOSSES", "PGDATLoss", "TradesLoss", "attack_mode", "eval_mode",
           "pgd_attack", "project_linf"]
