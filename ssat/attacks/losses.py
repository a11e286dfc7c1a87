"""Training losses: standard cross-entropy, TRADES and PGD-AT. Each maps (model, x, y) to (loss, logs).

Labels of -1 mark unlabeled points without a pseudo-label: cross-entropy ignores them, TRADES' KL term
covers every point. Labels may also be distributions (B, K) (ssat.pseudo_labels=soft): cross-entropy is then to
the distribution, -sum_k q_k log p_k, which is the hard loss when every q is one-hot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssat.attacks.pgd import attack_mode, pgd_attack, project_linf
from ssat.errors import ConfigError


def labeled_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the points with a label (zero when none has one, instead of NaN); to the
    distributions when ``y`` holds them."""
    if not bool((y >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, y, ignore_index=-1)


def point_cross_entropy(log_p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-point cross-entropy (B,) from log-probabilities: 0 without a label, to the distribution when soft."""
    if y.is_floating_point():
        return -(y * log_p).sum(1)
    return F.nll_loss(log_p, y, ignore_index=-1, reduction="none")


def _check_attack(eps: float, alpha: float, steps: int) -> None:
    for key, value in (("attack.eps", eps), ("attack.alpha", alpha), ("attack.steps", steps)):
        if value < 0:
            raise ConfigError(f"{key}={value} must not be negative")


class CrossEntropyLoss:
    """Standard training: the intermediate model's default."""

    name = "standard"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        logits = model(x)
        loss = labeled_cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "natural": loss.detach()}


class TradesLoss:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(p(x) || p(x_adv)), x_adv maximising the KL.

    The clean softmax that the attack steps aim away from is computed once per batch, in eval mode (the original
    code recomputes it at every step), and the loss reuses one train-mode clean forward for both terms.
    """

    def __init__(self, name: str = "trades", eps: float = 0.031, alpha: float = 0.007, steps: int = 10,
                 beta: float = 6.0):
        _check_attack(eps, alpha, steps)
        if beta < 0:
            raise ConfigError(f"attack.beta={beta} must not be negative")
        self.name, self.eps, self.alpha, self.steps, self.beta = name, eps, alpha, steps, beta

    def adversarial_examples(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with attack_mode(model):
            with torch.no_grad():
                log_p_clean = F.log_softmax(model(x), dim=1)
            # TRADES' start: x + 0.001 N(0, I), projected only after the first step (the noise of pixels at 0 or 1
            # stays in the first step's sum)
            x_adv = x + 0.001 * torch.randn_like(x)
            with torch.enable_grad():
                for _ in range(self.steps):
                    x_adv.requires_grad_(True)
                    kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), log_p_clean, reduction="sum", log_target=True)
                    (grad,) = torch.autograd.grad(kl, x_adv)
                    x_adv = project_linf(x_adv.detach() + self.alpha * grad.sign(), x, self.eps)
        return project_linf(x_adv.detach(), x, self.eps)

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.adversarial_examples(model, x)

    def sample_losses(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Per-point TRADES loss (B,): cross-entropy (0 without a label) plus beta times the point's KL."""
        log_p = F.log_softmax(model(x), dim=1)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), log_p, reduction="none", log_target=True).sum(1)
        return point_cross_entropy(log_p, y) + self.beta * kl

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        x_adv = self.adversarial_examples(model, x)
        logits = model(x)
        logits_adv = model(x_adv)
        natural = labeled_cross_entropy(logits, y)
        robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits, dim=1), reduction="batchmean",
                          log_target=True)
        loss = natural + self.beta * robust
        return loss, {"loss": loss.detach(), "natural": natural.detach(), "robust": robust.detach()}


class PGDATLoss:
    """PGD adversarial training (Madry et al. 2018): cross-entropy at PGD examples with a random start."""

    def __init__(self, name: str = "pgd_at", eps: float = 0.031, alpha: float = 0.007, steps: int = 10):
        _check_attack(eps, alpha, steps)
        self.name, self.eps, self.alpha, self.steps = name, eps, alpha, steps

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd_attack(model, x, y, self.eps, self.alpha, self.steps, random_start=True)

    def sample_losses(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Per-point cross-entropy at the adversarial example (B,), 0 without a label."""
        return point_cross_entropy(F.log_softmax(model(x_adv), dim=1), y)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        x_adv = pgd_attack(model, x, y, self.eps, self.alpha, self.steps, random_start=True)
        loss = labeled_cross_entropy(model(x_adv), y)
        return loss, {"loss": loss.detach(), "robust": loss.detach()}


class WeightedLoss:
    """A coreset's weighted training loss sum(g_j l_j) / sum(g_j) over a batch, l_j the adversarial loss' value at
    point j; called with the batch's weights as a fourth argument."""

    def __init__(self, loss: TradesLoss | PGDATLoss):
        self.loss = loss
        self.name = loss.name

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor):
        losses = self.loss.sample_losses(model, x, y, self.loss.attack(model, x, y))
        loss = (weights * losses).sum() / weights.sum().clamp_min(1e-12)
        return loss, {"loss": loss.detach(), "weighted": loss.detach()}
