"""A model of the user's own in place of a trained one: ``intermediate.checkpoint=<file>`` and
``generation.classifier=<file>``. Every usual way of saving weights loads (tensors only) with the same logits,
the stage key holds the file's content and not its path, and the model from the file is the one the stages use.
(The files that are refused, with their one line and exit code 2, are cases of tests/test_bad_input.py.)"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import run_in_process
from ssat.checkpoints import load_weights, model_file, read_tensors
from ssat.errors import ConfigError
from ssat.models import PreActResNet18, SmallCNN, WideResNet

pytestmark = pytest.mark.usefixtures("one_thread")

GENERATION = ["generation.pretrain.epochs=1", "generation.finetune.epochs=1", "generation.num_images=32",
              "generation.sampler.num_inference_steps=2", "generation.unet.block_out_channels=[8,16]",
              "generation.unet.norm_num_groups=4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits run that trained its intermediate model: its results and its cache."""
    tmp = tmp_path_factory.mktemp("trained")
    return run_in_process("selector=random", tmp_path=tmp), tmp / "cache"


def intermediate_dir(results) -> Path:
    return Path(results["stage_dirs"]["intermediate"])


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


STATS = ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
MODELS = {"SmallCNN": lambda: SmallCNN(3, 10, *STATS, width=8),
          "WideResNet": lambda: WideResNet(3, 10, *STATS, depth=10, widen_factor=1),
          "PreActResNet18": lambda: PreActResNet18(3, 10, *STATS)}


def two(make):
    """Two models of one architecture with different weights: the one saved, and the one loaded into."""
    torch.manual_seed(0)
    source = perturbed_statistics(make())
    torch.manual_seed(1)
    return source, make()


def perturbed_statistics(model):
    """Random BN statistics, so that a reading that lost them would show in the logits."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return model


SAVES = {
    "state_dict": lambda m, path: torch.save(m.state_dict(), path),
    "lightning": lambda m, path: torch.save({"epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.6.6",
                                             "state_dict": {f"model.{k}": v for k, v in m.state_dict().items()},
                                             "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}]},
                                            path),
    "ddp": lambda m, path: torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, path),
    "compiled_in_ddp": lambda m, path: torch.save({f"module._orig_mod.{k}": v for k, v in m.state_dict().items()},
                                                  path),
    "safetensors": lambda m, path: save_file(m.state_dict(), str(path)),
}


@pytest.mark.parametrize("save", SAVES.values(), ids=SAVES.keys())
def test_each_way_of_saving_loads_with_the_same_logits(save, tmp_path):
    x = torch.rand(4, 3, 32, 32)
    for name, make in MODELS.items():
        source, fresh = two(make)
        path = tmp_path / f"{name}.{'safetensors' if save is SAVES['safetensors'] else 'pt'}"
        save(source, path)
        loaded = model_file(fresh, str(path), "intermediate.checkpoint")
        assert torch.equal(logits(loaded.model, x), logits(source, x)), name


def test_robustbench_layout_loads_back_into_ssat_models():
    """An exported file (RobustBench's key names, mu/sigma for the normalisation) reads back as it was."""
    x = torch.rand(4, 3, 32, 32)
    for name in ("WideResNet", "PreActResNet18"):
        source, fresh = two(MODELS[name])
        theirs = source.robustbench.to_theirs(source.state_dict())
        assert "mu" in theirs and "mean" not in theirs and not any(k.startswith("head.") for k in theirs)
        assert torch.equal(logits(load_weights(fresh, theirs, "file"), x), logits(source, x)), name


def test_a_file_without_the_normalisation_keeps_the_configs_and_says_so(caplog):
    source, fresh = SmallCNN(1, 10, [0.3], [0.4], width=8), SmallCNN(1, 10, [0.1], [0.2], width=8)
    state = {k: v for k, v in source.state_dict().items() if k not in ("mean", "std")}
    with caplog.at_level(logging.WARNING, logger="ssat"):
        load_weights(fresh, state, "intermediate.checkpoint=lab.pt")
    assert fresh.mean.flatten().tolist() == pytest.approx([0.1])
    assert fresh.std.flatten().tolist() == pytest.approx([0.2])
    assert "intermediate.checkpoint=lab.pt has no input normalisation" in caplog.text
    assert torch.equal(fresh.layers[0].weight, source.layers[0].weight)


def test_the_conversion_the_refusal_gives_makes_a_file_that_loads(tmp_path, monkeypatch):
    """The one-line refusal of a pickled checkpoint holds a command; run as given, it makes a file that loads."""
    import argparse

    source = SmallCNN(1, 10, [0.3], [0.4], width=8)
    torch.save({"state_dict": source.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "lab.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as refused:
        read_tensors("lab.pt", "intermediate.checkpoint")
    command = re.search(r'python -c "(.+?)"', str(refused.value)).group(1)
    exec(command, {})
    loaded = model_file(SmallCNN(1, 10, [0.3], [0.4], width=8), "weights.pt", "intermediate.checkpoint")
    assert torch.equal(loaded.model.layers[0].weight, source.layers[0].weight)


@pytest.mark.slow
def test_a_checkpoint_is_the_intermediate_model_and_its_key_is_its_content(trained, tmp_path):
    """The run's own Lightning checkpoint as intermediate.checkpoint: nothing trains, the embedding and selection
    are those of the run that trained it; a moved copy keeps the key, changed weights get another."""
    results, _ = trained
    ckpt = tmp_path / "lab" / "best.ckpt"
    ckpt.parent.mkdir()
    shutil.copyfile(intermediate_dir(results) / "checkpoints" / "best.ckpt", ckpt)
    loaded = run_in_process("selector=random", f"intermediate.checkpoint={ckpt}", tmp_path=tmp_path / "a")
    assert loaded["selection_sha256"] == results["selection_sha256"]
    assert loaded["intermediate_val_acc"] == pytest.approx(results["intermediate_val_acc"])
    assert loaded["checkpoints"]["intermediate_checkpoint"]["path"] == str(ckpt)
    assert not (tmp_path / "a" / "run" / "logs" / "intermediate").exists(), "nothing was trained"

    moved = tmp_path / "elsewhere.ckpt"
    shutil.move(ckpt, moved)
    again = run_in_process("selector=random", f"intermediate.checkpoint={moved}", tmp_path=tmp_path / "a")
    assert again["stage_keys"] == loaded["stage_keys"] and all(again["cached"].values())

    state = torch.load(moved, weights_only=True)
    state["state_dict"]["model.head.bias"] += 1.0
    torch.save(state, moved)
    changed = run_in_process("selector=random", f"intermediate.checkpoint={moved}", tmp_path=tmp_path / "a")
    assert changed["stage_keys"]["intermediate"] != loaded["stage_keys"]["intermediate"]
    assert not changed["cached"]["intermediate"]


@pytest.mark.slow
def test_the_guidance_classifier_from_a_file_is_the_one_that_guides(trained, tmp_path):
    """generation.classifier=<the intermediate model's own weights> fine-tunes the DDPM exactly as the default
    (the probe losses before and after agree), under its own key; another file's model guides differently."""
    results, _ = trained
    weights = intermediate_dir(results) / "model.pt"
    default = run_in_process("selector=pcg", *GENERATION, tmp_path=tmp_path)
    own = run_in_process("selector=pcg", *GENERATION, f"generation.classifier={weights}", tmp_path=tmp_path)
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.save(SmallCNN(1, 10, [0.3], [0.4]).state_dict(), other)
    third = run_in_process("selector=pcg", *GENERATION, f"generation.classifier={other}", tmp_path=tmp_path)

    def finetune(run):
        return json.loads((Path(run["stage_dirs"]["ddpm_finetune"]) / "record.json").read_text())["info"]

    assert list(own["checkpoints"]) == ["guidance_classifier"]
    assert own["checkpoints"]["guidance_classifier"]["path"] == str(weights)
    assert own["stage_keys"]["ddpm_finetune"] != default["stage_keys"]["ddpm_finetune"]
    probes = [k for k in finetune(default) if k.startswith("probe_")]
    assert probes and all(finetune(own)[k] == pytest.approx(finetune(default)[k], rel=1e-6) for k in probes)
    assert finetune(third)["probe_reg_before"] != pytest.approx(finetune(default)["probe_reg_before"])
    assert own["stage_keys"]["ddpm_pretrain"] == default["stage_keys"]["ddpm_pretrain"]
    assert np.isfinite(third["robust_acc"])
