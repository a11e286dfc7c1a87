"""python -m ssat.export: the SSAT model's state dict loads strictly into RobustBench's own definition of the
architecture (robustbench from PyPI, the `robustbench` extra) and gives the same logits on the same inputs in
[0, 1], with and without normalisation; models RobustBench does not define, or inputs of another shape, are one
line."""

from __future__ import annotations

import pytest
import torch

from ssat import export
from ssat.export import robustbench_state
from ssat.errors import ConfigError
from ssat.models import PreActResNet18, SmallCNN, WideResNet

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR = ([0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616])
IDENTITY = ([0.0] * 3, [1.0] * 3)


def trained_looking(model):
    """Random weights and BN statistics (a fresh model's are 0 and 1, which would hide a lost buffer)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def theirs(rb, model, stats):
    """RobustBench's definition of ``model``: the plain class, or its normalising one (mu, sigma)."""
    normalising = stats is CIFAR
    if isinstance(model, WideResNet):
        if normalising:
            return rb["cifar10"].Rice2020OverfittingNet(depth=model.depth, widen_factor=model.widen_factor)
        return rb["wide_resnet"].WideResNet(depth=model.depth, widen_factor=model.widen_factor, num_classes=10)
    if normalising:
        return rb["cifar10"].Rice2020OverfittingNetL2()
    return rb["resnet"].PreActResNet(rb["resnet"].PreActBlockV2, [2, 2, 2, 2], num_classes=10, bn_before_fc=True)


CASES = {
    "wrn-10-2-cifar-normalised": (lambda s: WideResNet(3, 10, *s, depth=10, widen_factor=2), CIFAR),
    "wrn-16-1-unnormalised": (lambda s: WideResNet(3, 10, *s, depth=16, widen_factor=1), IDENTITY),
    "preact18-cifar-normalised": (lambda s: PreActResNet18(3, 10, *s), CIFAR),
    "preact18-unnormalised": (lambda s: PreActResNet18(3, 10, *s), IDENTITY),
}


@pytest.mark.parametrize("make, stats", CASES.values(), ids=CASES.keys())
def test_the_export_gives_robustbench_the_same_logits(make, stats, robustbench):
    ours = trained_looking(make(stats))
    state = robustbench_state(ours, 32)
    assert ("mu" in state) == (stats is CIFAR)
    model = theirs(robustbench, ours, stats)
    model.load_state_dict(state, strict=True)
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ours(x), rtol=1e-5, atol=1e-5)


def test_robustbench_preactresnet18_is_another_network(robustbench):
    """RobustBench's PreActResNet18() has no final BN and its shortcuts take the un-activated input: the export
    names the definition that is ssat's (PreActBlockV2, bn_before_fc=True), and it does not load into that one."""
    state = robustbench_state(PreActResNet18(3, 10, *IDENTITY), 32)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        robustbench["resnet"].PreActResNet18().load_state_dict(state, strict=True)


def test_what_robustbench_does_not_define_is_one_line():
    with pytest.raises(ConfigError, match="RobustBench has no definition that computes this SmallCNN-32"):
        robustbench_state(SmallCNN(3, 10, *IDENTITY), 32)
    silu = WideResNet(3, 10, *IDENTITY, depth=10, widen_factor=1, activation="silu")
    with pytest.raises(ConfigError, match="computes this WideResNet-10-1: .*model.activation=relu"):
        robustbench_state(silu, 32)
    with pytest.raises(ConfigError, match="takes 3x32x32 images; this model was trained on 1-channel 8x8"):
        robustbench_state(WideResNet(1, 10, [0.3], [0.4], depth=10, widen_factor=1), 8)


def test_export_of_a_model_file_on_the_command_line(robustbench, tmp_path, capsys):
    """The command on a file of the user's (saved as DDP does) with the overrides that build its model."""
    ours = trained_looking(WideResNet(3, 10, [0.3] * 3, [0.4] * 3, depth=10, widen_factor=1))
    torch.save({"state_dict": {f"module.{k}": v for k, v in ours.state_dict().items()}}, tmp_path / "lab.pt")
    assert export.main([str(tmp_path / "lab.pt"), "dataset=digits32", "model=wrn28_10", "model.depth=10",
                        "model.widen_factor=1"]) == 0
    assert "lab.robustbench.pt" in capsys.readouterr().out
    model = robustbench["cifar10"].Rice2020OverfittingNet(depth=10, widen_factor=1)
    model.load_state_dict(torch.load(tmp_path / "lab.robustbench.pt", weights_only=True), strict=True)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ours(x), rtol=1e-5, atol=1e-5)
    torch.save(WideResNet(1, 10, [0.3], [0.4], depth=10, widen_factor=1).state_dict(), tmp_path / "grey.pt")
    assert export.main([str(tmp_path / "grey.pt"), "model=wrn28_10", "model.depth=10", "model.widen_factor=1"]) == 2
    assert "takes 3x32x32 images; this model was trained on 1-channel 8x8" in capsys.readouterr().err
    assert not (tmp_path / "grey.robustbench.pt").exists()
