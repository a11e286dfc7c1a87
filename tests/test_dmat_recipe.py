"""What the experiment=dmat_wrn28_10 preset (Wang et al. 2023, wzekai99/DM-Improves-AT) needs beyond the rest of
ssat: a SiLU WRN with batch-norm momentum 0.01, label smoothing on TRADES' natural term only, the attack's uniform
start and train-mode batch statistics, the one-cycle schedule per epoch, no weight decay on batch norm, and an EMA
that copies the weights through the warm-up. Each is compared with the reference's formula written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssat.attacks import CrossEntropyLoss, TradesLoss
from ssat.errors import ConfigError
from ssat.lightning import EMA, RobustClassifierModule
from ssat.lightning.classifier import build_optimizer
from ssat.models import WideResNet

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR = dict(in_channels=3, num_classes=10, mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])


def tiny_wrn(activation: str = "silu", bn_momentum: float = 0.01) -> WideResNet:
    torch.manual_seed(0)
    return WideResNet(**CIFAR, depth=10, widen_factor=1, activation=activation, bn_momentum=bn_momentum)


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference_forward(model: WideResNet, x: torch.Tensor, act) -> torch.Tensor:
    """The WRN written out (eval mode): pre-activation blocks with ``act`` after every batch norm, the activated
    input feeding the 1x1 shortcut where the width changes, a final batch norm and ``act``, average pool, linear."""
    def bn(layer, h):
        return F.batch_norm(h, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps)

    h = model.conv1((x - model.mean) / model.std)
    for stage in (model.block1, model.block2, model.block3):
        for block in stage:
            pre = act(bn(block.bn1, h))
            out = block.conv2(act(bn(block.bn2, block.conv1(pre))))
            h = out + (block.shortcut(pre) if block.shortcut is not None else h)
    return model.head(act(bn(model.bn, h)).mean((2, 3)))


def test_the_silu_wide_resnet_applies_silu_after_every_batch_norm():
    model = tiny_wrn().eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(model, x, F.silu))
        relu = tiny_wrn("relu").eval()
        relu.load_state_dict(model.state_dict())  # the same parameters and keys: only the activation differs
        torch.testing.assert_close(relu(x), reference_forward(model, x, F.relu))
        assert not torch.allclose(relu(x), model(x))


def test_batch_norm_momentum_is_the_weight_of_the_batch_in_the_running_statistics():
    model = tiny_wrn(bn_momentum=0.01).train()
    x = images()
    stem = model.conv1((x - model.mean) / model.std).detach()
    model(x)
    expected = 0.99 * 0.0 + 0.01 * stem.mean((0, 2, 3))
    torch.testing.assert_close(model.block1[0].bn1.running_mean, expected)


@pytest.mark.parametrize("kwargs, words", [({"activation": "gelu"}, "model activation='gelu'"),
                                           ({"bn_momentum": 0.0}, "model bn_momentum=0.0")])
def test_a_wrong_activation_or_momentum_is_a_config_error(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        WideResNet(**CIFAR, depth=10, widen_factor=1, **kwargs)


def smooth_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """DM-Improves-AT's SmoothCrossEntropyLoss (core/utils/utils.py), on the labeled rows."""
    keep = y >= 0
    logp = F.log_softmax(logits[keep], dim=-1)
    nll = -logp.gather(1, y[keep, None]).squeeze(1)
    return ((1 - smoothing) * nll + smoothing * -logp.mean(-1)).mean()


def confident_wrn() -> WideResNet:
    """Logits far from uniform, where smoothing the target changes the cross-entropy."""
    model = tiny_wrn().eval()
    with torch.no_grad():
        model.head.weight.mul_(50.0)
    return model


def test_label_smoothing_changes_the_natural_term_of_trades_and_not_the_kl():
    model = confident_wrn()
    x, y = images(), torch.tensor([0, 1, 2, 3, -1, 5, -1, 7])
    losses = {}
    for smoothing in (0.0, 0.1):
        torch.manual_seed(1)
        loss, logs = TradesLoss(eps=8 / 255, alpha=2 / 255, steps=2, beta=5.0, label_smoothing=smoothing)(model, x, y)
        losses[smoothing] = logs
        with torch.no_grad():
            natural = smooth_cross_entropy(model(x), y, smoothing)
        torch.testing.assert_close(logs["natural"], natural)
        torch.testing.assert_close(loss.detach(), logs["natural"] + 5.0 * logs["robust"])
    assert abs(losses[0.1]["natural"] - losses[0.0]["natural"]) > 0.01
    torch.testing.assert_close(losses[0.1]["robust"], losses[0.0]["robust"])  # same seed: the same attack


def test_the_per_point_trades_loss_smooths_the_labels_too():
    model = confident_wrn()
    x, y = images(), torch.tensor([0, 1, 2, 3, -1, 5, -1, 7])
    loss = TradesLoss(beta=5.0, label_smoothing=0.1)
    with torch.no_grad():
        per_point = loss.sample_losses(model, x, y, x)  # x_adv = x: the KL is zero, the natural term is left
        logp = F.log_softmax(model(x), dim=-1)
    keep = y >= 0
    expected = 0.9 * -logp[keep].gather(1, y[keep, None]).squeeze(1) + 0.1 * -logp[keep].mean(-1)
    torch.testing.assert_close(per_point[keep], expected)
    assert torch.all(per_point[~keep].abs() < 1e-6)


def test_the_uniform_start_fills_the_ball_and_the_normal_one_stays_at_x():
    model = tiny_wrn().eval()
    x = images(16) * 0.5 + 0.25  # away from 0 and 1, where clipping would shorten the start
    eps = 8 / 255
    torch.manual_seed(0)
    uniform = TradesLoss(eps=eps, steps=0, start="uniform").adversarial_examples(model, x) - x
    normal = TradesLoss(eps=eps, steps=0, start="normal").adversarial_examples(model, x) - x
    assert uniform.abs().max() <= eps + 1e-6 and abs(uniform.abs().mean().item() - eps / 2) < 0.02 * eps
    assert normal.abs().max() < 0.01


def test_the_batch_statistics_attack_normalises_with_the_batch_and_leaves_the_running_statistics():
    model = tiny_wrn().train()
    with torch.no_grad():
        model(images(8, seed=3))  # running statistics away from their start
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    x = images()
    captured = {}

    def grab(module, inputs, output):
        captured.setdefault("logits", output.detach())

    handle = model.head.register_forward_hook(grab)
    loss = TradesLoss(eps=8 / 255, alpha=2 / 255, steps=1, start="uniform", attack_bn="batch")
    loss.adversarial_examples(model, x)
    handle.remove()
    for k, v in running.items():
        assert torch.equal(model.state_dict()[k], v), f"{k} moved during the attack"
    assert model.training and all(m.track_running_stats for m in model.modules() if hasattr(m, "track_running_stats"))
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():  # the attack's clean forward used the batch's statistics: a train-mode forward's logits
        copy = tiny_wrn()
        copy.load_state_dict(model.state_dict())
        torch.testing.assert_close(captured["logits"], copy.train()(x))
        assert not torch.allclose(captured["logits"], copy.eval()(x))


def test_onecycle_warms_up_over_2_5_percent_of_the_epochs_then_anneals_with_the_momentum_cycled():
    """DM-Improves-AT's `cosinew`: OneCycleLR(max_lr=0.2, pct_start=0.025, total_steps=epochs), stepped per epoch."""
    model = tiny_wrn()
    optimizer, scheduler = build_optimizer(model, 400, lr=0.2, nesterov=True, schedule="onecycle")
    lrs, momenta = [], []
    for _ in range(400):
        lrs.append(optimizer.param_groups[0]["lr"])
        momenta.append(optimizer.param_groups[0]["momentum"])
        optimizer.step()
        scheduler.step()
    peak = int(np.argmax(lrs))
    assert math.isclose(lrs[0], 0.2 / 25) and peak == 9 and math.isclose(lrs[peak], 0.2)
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:])) and lrs[-1] < 1e-4
    assert math.isclose(momenta[0], 0.95) and math.isclose(momenta[peak], 0.85) and momenta[-1] > 0.94
    # the cosine half-way through the annealing: lr / 2 (+ the small floor)
    middle = peak + (399 - peak) // 2
    assert abs(lrs[middle] - 0.1) < 0.005


def test_batch_norm_scales_and_shifts_take_no_weight_decay_when_asked():
    model = tiny_wrn()
    norm = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    optimizer, _ = build_optimizer(model, 10, lr=0.1, weight_decay=5e-4, norm_weight_decay=False)
    decayed, exempt = optimizer.param_groups
    assert {id(p) for p in exempt["params"]} == norm and exempt["weight_decay"] == 0.0
    assert not norm & {id(p) for p in decayed["params"]} and decayed["weight_decay"] == 5e-4
    assert len(decayed["params"]) + len(exempt["params"]) == len(list(model.parameters()))
    (single,) = build_optimizer(model, 10, lr=0.1, weight_decay=5e-4)[0].param_groups
    assert single["weight_decay"] == 5e-4 and len(single["params"]) == len(list(model.parameters()))


class Steps:
    """What EMA.on_train_start reads of a trainer."""

    def __init__(self, total: int):
        self.estimated_stepping_batches = total


def test_the_ema_copies_the_weights_for_its_start_share_of_the_steps_then_averages():
    """DM-Improves-AT's ema_update: decay 0 before warmup_steps (2.5% of the steps), then
    min(tau, (1 + t) / (10 + t)) with t counted from there."""
    torch.manual_seed(0)
    module = RobustClassifierModule(tiny_wrn(), CrossEntropyLoss(), {"lr": 0.1}, 1)
    ema = EMA(decay=0.995, warmup=10, start=0.025)
    ema.on_train_start(Steps(400), module)
    assert ema.start_steps == 10
    name = "model.head.weight"
    expected = module.state_dict()[name].clone()
    for step in range(30):
        with torch.no_grad():
            module.model.head.weight.add_(torch.randn_like(module.model.head.weight))
        ema.on_train_batch_end(None, module, None, None, step)
        t = step - 10
        decay = 0.0 if t < 0 else min(0.995, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * module.state_dict()[name]
        torch.testing.assert_close(ema.ema[name], expected)
        if t < 0:
            torch.testing.assert_close(ema.ema[name], module.state_dict()[name])
    assert not torch.allclose(ema.ema[name], module.state_dict()[name])
