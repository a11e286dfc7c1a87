"""Shape, feature read-out, in-model normalisation and batch independence of every classifier."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ssat.errors import ConfigError
from ssat.models import Classifier, PreActResNet18, SmallCNN, WideResNet

CONF = Path(__file__).resolve().parents[1] / "ssat" / "conf"
RGB = dict(in_channels=3, num_classes=10, mean=[0.4914, 0.4822, 0.4465], std=[0.2471, 0.2435, 0.2616])
GRAY = dict(in_channels=1, num_classes=10, mean=[0.3], std=[0.4])

# (constructor, kwargs, input shape (C, H, W), expected feature_dim, parameter count of the reference
# implementation where there is one: Rice et al. 2020 PreAct ResNet-18, TRADES WRN-28-10)
CASES = {
    "small_cnn_digits": (SmallCNN, GRAY, (1, 8, 8), 128, None),
    "small_cnn_rgb": (SmallCNN, dict(RGB, width=8), (3, 32, 32), 32, None),
    "preact_resnet18": (PreActResNet18, RGB, (3, 32, 32), 512, 11_172_170),
    "wrn28_10": (WideResNet, dict(RGB, depth=28, widen_factor=10), (3, 32, 32), 640, 36_479_194),
    "wrn10_2_dropout": (WideResNet, dict(RGB, depth=10, widen_factor=2, dropout=0.3), (3, 32, 32), 128, None),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request):
    cls, kwargs, shape, feature_dim, params = CASES[request.param]
    torch.manual_seed(0)
    model = cls(**kwargs).eval()
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1))
    return cls, kwargs, model, x, feature_dim, params


@torch.no_grad()
def test_logits_and_features_shapes(case):
    _, kwargs, model, x, feature_dim, params = case
    assert isinstance(model, Classifier)
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) == params
    assert model.feature_dim == feature_dim
    assert model(x).shape == (2, kwargs["num_classes"])
    assert model.features(x).shape == (2, feature_dim)


@torch.no_grad()
def test_normalisation_is_inside_the_model(case):
    cls, kwargs, model, x, _, _ = case
    plain = cls(**dict(kwargs, mean=[0.0] * len(kwargs["mean"]), std=[1.0] * len(kwargs["std"]))).eval()
    weights = {k: v for k, v in model.state_dict().items() if k not in ("mean", "std")}
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["mean", "std"] and not unexpected
    mean = torch.tensor(kwargs["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(kwargs["std"]).view(1, -1, 1, 1)
    torch.testing.assert_close(model(x), plain((x - mean) / std), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_eval_output_does_not_depend_on_batch(case):
    _, _, model, x, _, _ = case
    torch.testing.assert_close(model(x[:1])[0], model(x)[0], atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training_mode():
    model = WideResNet(**RGB, depth=10, widen_factor=1, dropout=0.5)
    x = torch.rand(2, 3, 16, 16)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_small_cnn_backpropagates_to_input():
    model = SmallCNN(**GRAY, width=4)
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(RGB, in_channels=1), "in_channels=1"),
        (dict(RGB, std=[0.2, 0.0, 0.2]), "std"),
        (dict(RGB, mean=[0.5, 0.5]), "equal length"),
    ],
)
def test_bad_statistics_are_config_errors(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        SmallCNN(**kwargs, width=4)


@pytest.mark.parametrize("kwargs, words", [(dict(depth=20), "depth=20"), (dict(widen_factor=0), "widen_factor=0")])
def test_bad_wide_resnet_shape_is_config_error(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        WideResNet(**RGB, **kwargs)


@pytest.mark.parametrize(
    "name, cls, feature_dim",
    [("small_cnn", SmallCNN, 128), ("preact_resnet18", PreActResNet18, 512), ("wrn28_10", WideResNet, 640),
     ("wrn34_10", WideResNet, 640)],
)
def test_model_configs_instantiate(name, cls, feature_dim):
    from hydra.utils import instantiate

    dataset = OmegaConf.create({"dataset": dict(channels=3, num_classes=10, mean=RGB["mean"], std=RGB["std"])})
    cfg = OmegaConf.merge(dataset, {"model": OmegaConf.load(CONF / "model" / f"{name}.yaml")})
    model = instantiate(cfg.model)
    assert type(model) is cls and model.feature_dim == feature_dim and model.head.out_features == 10
