"""PGD, the TRADES and PGD-AT losses on a small trained digits model, and the batched augmentations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from conftest import train_digits_cnn
from ssat.attacks import PGDATLoss, TradesLoss, pgd_attack
from ssat.data.augment import augment, random_crop, random_hflip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    """sklearn digits in [0, 1], shape (N, 1, 8, 8): the first 1400 to train, the rest to attack."""
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target, dtype=torch.int64)
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.fixture(scope="module")
def trained(digits):
    """A SmallCNN trained for 300 Adam steps: well above chance on held-out digits."""
    x, y, _, _ = digits
    return train_digits_cnn(x, y)


@pytest.fixture
def model(trained):
    """A fresh copy per test, without gradients, in eval mode."""
    m = copy.deepcopy(trained)
    m.zero_grad(set_to_none=True)
    return m.eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def no_param_grads(model) -> bool:
    return all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- PGD


def test_model_is_well_above_chance(model, digits):
    _, _, x, y = digits
    assert accuracy(model, x, y) > 0.85


def test_pgd_with_zero_eps_returns_x_and_clean_accuracy(model, digits):
    """eps = 0: the attack returns x exactly, so robust accuracy equals clean accuracy."""
    _, _, x, y = digits
    x_adv = pgd_attack(model, x, y, eps=0.0, alpha=0.01, steps=10, random_start=True)
    assert torch.equal(x_adv, x)
    assert accuracy(model, x_adv, y) == accuracy(model, x, y)


def test_pgd_stays_in_the_ball_and_image_range_and_hurts(model, digits):
    """eps > 0: ||x_adv - x||_inf <= eps, x_adv in [0, 1], and accuracy drops well below clean."""
    _, _, x, y = digits
    eps = 0.1
    x_adv = pgd_attack(model, x, y, eps=eps, alpha=0.025, steps=10, random_start=True)
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert (x_adv != x).any()
    clean, robust = accuracy(model, x, y), accuracy(model, x_adv, y)
    assert robust < clean - 0.2


@pytest.mark.parametrize("training", [True, False])
def test_pgd_restores_mode_and_leaves_bn_stats_and_grads(model, digits, training):
    """The attack runs in eval mode: the starting mode is restored, BN running stats and .grad untouched."""
    _, _, x, y = digits
    model.train(training)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    pgd_attack(model, x[:64], y[:64], eps=0.05, alpha=0.01, steps=3)
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k
    assert no_param_grads(model)


def test_pgd_ignores_unlabeled_rows(model, digits):
    """Rows labelled -1 get no gradient: without random start they come back unchanged."""
    _, _, x, y = digits
    y = y[:32].clone()
    y[::2] = -1
    x_adv = pgd_attack(model, x[:32], y, eps=0.1, alpha=0.02, steps=3, random_start=False)
    assert torch.equal(x_adv[::2], x[:32][::2])
    assert (x_adv[1::2] != x[:32][1::2]).any()


# ---------------------------------------------------------------- TRADES and PGD-AT


def test_trades_zero_eps_has_zero_robust_term(model, digits):
    """eps = 0 with the model in train mode (BatchNorm): x_adv = x, so the KL term is exactly zero."""
    _, _, x, y = digits
    model.train()
    loss, logs = TradesLoss(eps=0.0, alpha=0.007, steps=3, beta=6.0)(model, x[:64], y[:64])
    assert logs["robust"].item() == 0.0
    assert torch.isclose(loss, logs["natural"], atol=1e-5)
    assert model.training


def test_trades_positive_eps_has_positive_robust_term(model, digits):
    _, _, x, y = digits
    model.train()
    trades = TradesLoss(eps=0.1, alpha=0.025, steps=5, beta=6.0)
    loss, logs = trades(model, x[:64], y[:64])
    assert logs["robust"].item() > 1e-3
    assert torch.isclose(loss, logs["natural"] + 6.0 * logs["robust"], rtol=1e-5)


def test_trades_adversarial_examples_in_ball_and_leave_mode_and_grads(model, digits):
    _, _, x, _ = digits
    model.train()
    x_adv = TradesLoss(eps=0.05, alpha=0.02, steps=4).adversarial_examples(model, x[:64])
    assert (x_adv - x[:64]).abs().max().item() <= 0.05 + 1e-6
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1
    assert model.training
    assert no_param_grads(model)


def test_trades_matches_manual_computation_with_unlabeled_rows(model, digits):
    """loss = CE over rows with labels >= 0 + beta * KL(p(x) || p(x_adv)) averaged over ALL rows."""
    _, _, x, y = digits
    x, y = x[:40], y[:40].clone()
    y[::3] = -1
    gen = torch.Generator().manual_seed(0)
    x_adv = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    beta = 3.0
    trades = TradesLoss(eps=0.05, alpha=0.01, steps=2, beta=beta)
    trades.adversarial_examples = lambda m, inp: x_adv  # a fixed x_adv for both computations
    model.train()
    loss, logs = trades(model, x, y)

    logits, logits_adv = model(x), model(x_adv)
    mask = y >= 0
    ce = F.cross_entropy(logits[mask], y[mask])
    p = F.softmax(logits, dim=1)
    kl_rows = (p * (torch.log(p) - F.log_softmax(logits_adv, dim=1))).sum(1)
    expected = ce + beta * kl_rows.mean()
    assert torch.allclose(logs["natural"], ce, atol=1e-6)
    assert torch.allclose(logs["robust"], kl_rows.mean(), atol=1e-6)
    assert torch.allclose(loss, expected, atol=1e-5)
    # CE over all rows with the -1 rows counted would differ
    assert not torch.isclose(ce, F.cross_entropy(logits, y.clamp(min=0)), atol=1e-4)


def test_trades_all_unlabeled_gives_zero_natural_not_nan(model, digits):
    _, _, x, _ = digits
    model.train()
    y = torch.full((32,), -1)
    loss, logs = TradesLoss(eps=0.05, alpha=0.02, steps=2, beta=6.0)(model, x[:32], y)
    assert logs["natural"].item() == 0.0
    assert torch.isfinite(loss)
    assert logs["robust"].item() > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_pgd_at_loss_is_finite_and_reaches_parameters(model, digits):
    _, _, x, y = digits
    model.train()
    loss, logs = PGDATLoss(eps=0.05, alpha=0.02, steps=2)(model, x[:32], y[:32])
    assert torch.isfinite(loss) and loss.item() > 0
    assert model.training
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_pgd_at_adversarial_loss_exceeds_clean_loss(model, digits):
    """The PGD-AT loss is measured at adversarial points: higher than the clean cross-entropy."""
    _, _, x, y = digits
    torch.manual_seed(0)
    loss, _ = PGDATLoss(eps=0.1, alpha=0.025, steps=5)(model.eval(), x[:64], y[:64])
    with torch.no_grad():
        clean = F.cross_entropy(model(x[:64]), y[:64])
    assert loss.item() > clean.item() + 0.1


# ---------------------------------------------------------------- augmentation


def _shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., r, c] = img[..., r + dy, c + dx] inside the image, 0 outside."""
    _, h, w = img.shape
    out = torch.zeros_like(img)
    rs, re = max(0, -dy), min(h, h - dy)
    cs, ce = max(0, -dx), min(w, w - dx)
    out[:, rs:re, cs:ce] = img[:, rs + dy:re + dy, cs + dx:ce + dx]
    return out


@pytest.mark.parametrize("padding", [1, 2, 4])
def test_random_crop_is_a_zero_filled_shift(padding):
    """Each output image is its input shifted by one (dy, dx) in [-p, p]^2 (all channels alike), zeros elsewhere."""
    torch.manual_seed(1)
    x = 0.1 + 0.9 * torch.rand(200, 3, 8, 8)  # strictly positive, so every shift is distinguishable
    out = random_crop(x, padding)
    assert out.shape == x.shape
    shifts = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(-padding, padding + 1) for dx in range(-padding, padding + 1)
                   if torch.equal(out[i], _shift(x[i], dy, dx))]
        assert len(matches) == 1, i
        shifts |= set(matches)
    assert len(shifts) > min(10, (2 * padding + 1) ** 2 // 2)  # offsets vary between images


def test_random_crop_padding_zero_is_identity():
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(random_crop(x, 0), x)
    assert torch.equal(augment(x, crop_padding=0, hflip=False), x)


def test_random_hflip_mirrors_some_images_and_keeps_the_others():
    torch.manual_seed(2)
    x = torch.rand(100, 3, 8, 8)
    out = random_hflip(x)
    assert out.shape == x.shape
    same = np.array([torch.equal(out[i], x[i]) for i in range(100)])
    mirrored = np.array([torch.equal(out[i], x[i].flip(-1)) for i in range(100)])
    assert (same ^ mirrored).all()
    assert 20 < mirrored.sum() < 80


# ---------------------------------------------------------------- speed: attacks without parameter gradients


@pytest.mark.parametrize("attack", ["pgd", "trades"])
def test_attack_steps_build_no_graph_to_the_parameters(model, digits, attack):
    """Inside an attack every forward pass sees frozen parameters (the graph reaches the input only); afterwards
    the parameters require gradients again and the TRADES loss still reaches them."""
    _, _, x, y = digits
    model.train()
    seen = []
    handle = model.register_forward_hook(lambda m, i, o: seen.append((m.training, o.requires_grad,
                                                                       any(p.requires_grad for p in m.parameters()))))
    if attack == "pgd":
        pgd_attack(model, x[:32], y[:32], eps=0.05, alpha=0.01, steps=3)
        attack_calls = seen
    else:
        loss, _ = TradesLoss(eps=0.05, alpha=0.02, steps=3)(model, x[:32], y[:32])
        attack_calls = [s for s in seen if not s[0]]  # eval mode: the clean target and the three steps
        assert len(attack_calls) == 4 and [s[0] for s in seen].count(True) == 2  # loss: clean + adversarial
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
    handle.remove()
    assert attack_calls and all(not training and not params_grad for training, _, params_grad in attack_calls)
    assert all(p.requires_grad for p in model.parameters())
