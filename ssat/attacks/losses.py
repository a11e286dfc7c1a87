"""Training losses: standard cross-entropy, TRADES and PGD-AT. Each maps (model, x, y) to (loss, logs).

Labels of -1 mark unlabeled points without a pseudo-label: cross-entropy ignores them, TRADES' KL term
covers every point. Labels may also be distributions (B, K) (ssat.pseudo_labels=soft): cross-entropy is then to
the distribution, -sum_k q_k log p_k, which is the hard loss when every q is one-hot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssat.attacks.pgd import attack_mode, batch_statistics_mode, pgd_attack, project_linf
from ssat.errors import ConfigError


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax in float32 whatever the autocast: in bf16 (CPU autocast keeps log_softmax in bf16) the
    attack's KL lost the small differences its steps follow, and TRADES-10 reached 0.4x the fp32 KL on digits."""
    return F.log_softmax(logits.float(), dim=1)


def labeled_cross_entropy(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the points with a label (zero when none has one, instead of NaN), to the
    distributions when ``y`` holds them; with label smoothing s the target is 1 - s on the label plus s / C on
    every class (PyTorch's, the same as DM-Improves-AT's SmoothCrossEntropyLoss)."""
    if not bool((y >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, y, ignore_index=-1, label_smoothing=label_smoothing)


def point_cross_entropy(log_p: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-point cross-entropy (B,) from log-probabilities: 0 without a label, to the distribution when soft, the
    target smoothed as in ``labeled_cross_entropy``."""
    if not y.is_floating_point() and not label_smoothing:
        return F.nll_loss(log_p, y, ignore_index=-1, reduction="none")
    if y.is_floating_point():
        target = y.to(log_p.dtype)
    else:
        target = F.one_hot(y.clamp_min(0), log_p.shape[1]).to(log_p.dtype) * (y >= 0).unsqueeze(1)
    if label_smoothing:  # rows without a label stay all zero
        target = (1 - label_smoothing) * target + label_smoothing / log_p.shape[1] * target.sum(1, keepdim=True)
    return -(target * log_p.masked_fill(target == 0, 0.0)).sum(1)


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


# The attack's start: x + 0.001 N(0, I) (yaodongyu/TRADES), or uniform in the eps-ball (DM-Improves-AT).
STARTS = ("normal", "uniform")
# The batch-norm statistics the attack's forward passes use: running (eval mode, TRADES's code) or batch (train mode
# with the running statistics frozen, Gowal et al. 2020 and DM-Improves-AT).
ATTACK_BN = {"running": attack_mode, "batch": batch_statistics_mode}


class TradesLoss:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(p(x) || p(x_adv)), x_adv maximising the KL.

    The clean softmax that the attack steps aim away from is computed once per batch, in the attack's mode (the
    original code recomputes it at every step), and the loss reuses one train-mode clean forward for both terms.
    ``label_smoothing`` applies to the natural (cross-entropy) term only, as in DM-Improves-AT; the KL term compares
    the two predictions, not a label.
    """

    def __init__(self, name: str = "trades", eps: float = 0.031, alpha: float = 0.007, steps: int = 10,
                 beta: float = 6.0, label_smoothing: float = 0.0, start: str = "normal", attack_bn: str = "running"):
        _check_attack(eps, alpha, steps)
        if beta < 0:
            raise ConfigError(f"attack.beta={beta} must not be negative")
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"attack.label_smoothing={label_smoothing} is outside [0, 1)")
        if start not in STARTS:
            raise ConfigError(f"attack.start={start!r} is not one of {', '.join(STARTS)}")
        if attack_bn not in ATTACK_BN:
            raise ConfigError(f"attack.attack_bn={attack_bn!r} is not one of {', '.join(ATTACK_BN)}")
        self.name, self.eps, self.alpha, self.steps, self.beta = name, eps, alpha, steps, beta
        self.label_smoothing, self.start, self.attack_bn = label_smoothing, start, attack_bn

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if self.start == "uniform":
            return (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp_(0.0, 1.0)
        # TRADES' start: x + 0.001 N(0, I), projected only after the first step (the noise of pixels at 0 or 1
        # stays in the first step's sum)
        return x + 0.001 * torch.randn_like(x)

    def adversarial_examples(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with ATTACK_BN[self.attack_bn](model):
            with torch.no_grad():
                log_p_clean = log_probs(model(x))
            x_adv = self._start(x)
            with torch.enable_grad():
                for _ in range(self.steps):
                    x_adv.requires_grad_(True)
                    kl = F.kl_div(log_probs(model(x_adv)), log_p_clean, reduction="sum", log_target=True)
                    (grad,) = torch.autograd.grad(kl, x_adv)
                    x_adv = project_linf(x_adv.detach() + self.alpha * grad.sign(), x, self.eps)
        return project_linf(x_adv.detach(), x, self.eps)

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.adversarial_examples(model, x)

    def sample_losses(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Per-point TRADES loss (B,): cross-entropy (0 without a label) plus beta times the point's KL."""
        log_p = log_probs(model(x))
        kl = F.kl_div(log_probs(model(x_adv)), log_p, reduction="none", log_target=True).sum(1)
        return point_cross_entropy(log_p, y, self.label_smoothing) + self.beta * kl

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        x_adv = self.adversarial_examples(model, x)
        logits = model(x)
        logits_adv = model(x_adv)
        natural = labeled_cross_entropy(logits, y, self.label_smoothing)
        robust = F.kl_div(log_probs(logits_adv), log_probs(logits), reduction="batchmean",
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
        return point_cross_entropy(log_probs(model(x_adv)), y)

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
