"""L-infinity PGD (Madry et al. 2018)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


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


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Back into the eps-ball around x and into the image range [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
               random_start: bool = True) -> torch.Tensor:
    """Adversarial examples maximising cross-entropy; labels -1 are ignored. Parameter gradients are untouched."""
    if eps == 0 or steps == 0:
        return x.detach().clone()
    with attack_mode(model), torch.enable_grad():
        x = x.detach()
        x_adv = x.clone()
        if random_start:
            x_adv = project_linf(x_adv + torch.empty_like(x).uniform_(-eps, eps), x, eps)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y, ignore_index=-1, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = project_linf(x_adv.detach() + alpha * grad.sign(), x, eps)
    return x_adv.detach()
