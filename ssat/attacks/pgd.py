"""L-infinity PGD (Madry et al. 2018) with a cross-entropy or Carlini-Wagner margin loss and restarts."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ssat.choices import PGD_LOSSES


@contextmanager
def eval_mode(model: nn.Module):
    """Put the model in eval mode for an attack and restore its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def attack_mode(model: nn.Module):
    """Eval mode with the parameters frozen: the graph of an attack step is built for the input gradient only,
    so no tensor is kept and no kernel runs for a weight gradient, however the step differentiates."""
    params = [p for p in model.parameters() if p.requires_grad]
    with eval_mode(model):
        for p in params:
            p.requires_grad_(False)
        try:
            yield model
        finally:
            for p in params:
                p.requires_grad_(True)


@contextmanager
def batch_statistics_mode(model: nn.Module):
    """Train mode with the parameters and the batch-norm running statistics frozen: the attack's forward passes
    normalise with the batch's own statistics and leave the running ones as they were (Gowal et al. 2020's attack,
    kept by DM-Improves-AT)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.train()
    for m in norms:
        m.track_running_stats = False
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for m in norms:
            m.track_running_stats = True
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Back into the eps-ball around x and into the image range [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def cross_entropy_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, ignore_index=-1, reduction="sum")


def cw_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin: the best other logit minus the true one (positive once misclassified).

    Unlike cross-entropy it does not saturate on confident predictions, which hides some gradient masking.
    """
    keep = y >= 0
    logits, y = logits[keep], y[keep]
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (other - true).sum()


# The attack's objective, by the name used in eval.pgd.loss.
LOSSES = dict(zip(PGD_LOSSES, (cross_entropy_loss, cw_loss), strict=True))


def _pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
         random_start: bool, objective) -> torch.Tensor:
    x_adv = x.clone()
    if random_start:
        x_adv = project_linf(x_adv + torch.empty_like(x).uniform_(-eps, eps), x, eps)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = objective(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = project_linf(x_adv.detach() + alpha * grad.sign(), x, eps)
    return x_adv.detach()


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
               random_start: bool = True, loss: str = "ce", restarts: int = 1) -> torch.Tensor:
    """Adversarial examples maximising ``loss`` ("ce" or "cw"); labels -1 are ignored. Parameter gradients are
    untouched. Each restart attacks again, from a new random start, the points that no earlier one fooled.

    eps = 0 runs the full attack too (it must return x unchanged): the evaluation's sanity check relies on it.
    """
    if steps == 0:
        return x.detach().clone()
    objective = LOSSES[loss]
    with attack_mode(model), torch.enable_grad():
        x = x.detach()
        x_adv = _pgd(model, x, y, eps, alpha, steps, random_start, objective)
        for _ in range(restarts - 1):
            with torch.no_grad():
                todo = model(x_adv).argmax(1) == y
            if not bool(todo.any()):
                break
            x_adv[todo] = _pgd(model, x[todo], y[todo], eps, alpha, steps, random_start, objective)
    return x_adv
