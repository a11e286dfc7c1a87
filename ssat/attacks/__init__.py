"""Attacks and adversarial training losses. Inputs are in [0, 1]; attacks run the model in eval mode."""

from ssat.attacks.losses import CrossEntropyLoss, PGDATLoss, TradesLoss
from ssat.attacks.pgd import attack_mode, eval_mode, pgd_attack, project_linf

__all__ = ["CrossEntropyLoss", "PGDATLoss", "TradesLoss", "attack_mode", "eval_mode", "pgd_attack", "project_linf"]
