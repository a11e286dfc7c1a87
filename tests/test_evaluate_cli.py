"""python -m ssat.evaluate on a model file: the evaluate stage alone at RobustBench's setting (AutoAttack standard,
L-infinity 8/255, the whole test set unless told otherwise), its numbers those of the model on the data set's test
split, resumable through the stage cache, and a model card with RobustBench's ModelInfo fields. (On a run
directory: tests/test_walkthrough.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import train_digits_cnn
from ssat import evaluate as cli
from ssat.data.datasets import load_digits
from ssat.stages.evaluate import correct_flags

pytestmark = pytest.mark.usefixtures("one_thread")

# AutoAttack on 10 points and short PGD: the same code paths, in seconds.
CHEAP = ["model.width=8", "eval.pgd.steps=2", "eval.autoattack.num_points=10", "eval.sanity.num_points=20",
         "eval.sanity.noise_samples=1"]


@pytest.fixture(scope="module")
def lab_model(tmp_path_factory):
    """A SmallCNN of width 8 trained on the digits' training split, saved as DDP saves it."""
    data = load_digits()
    model = train_digits_cnn(torch.from_numpy(data.train_images).float() / 255, torch.from_numpy(data.train_labels))
    path = tmp_path_factory.mktemp("lab") / "lab_cnn.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return model, path, data


def test_a_model_file_is_evaluated_as_robustbench_does(lab_model, tmp_path, capsys, robustbench):
    model, path, data = lab_model
    assert cli.main([str(path), *CHEAP, f"cache_dir={tmp_path / 'cache'}"]) == 0
    card = json.loads(path.with_name("lab_cnn.model_card.json").read_text())
    clean = correct_flags(model, data.test_images, data.test_labels, 256)
    assert card["clean_acc"] == str(round(float(clean.mean()) * 100, 2)), "the whole test split, the model's own"
    assert card["ssat"]["num_test"] == len(data.test_labels) == 360
    assert card["eps"] == "8/255" and card["threat_model"] == "Linf" and card["architecture"] == "SmallCNN-8"
    assert card["ssat"]["pgd"]["eps"] == pytest.approx(8 / 255)
    assert card["ssat"]["autoattack_version"] == "standard" and card["ssat"]["autoattack_num_points"] == 10
    # AutoAttack attacks the first 10 test points: never above the model's clean accuracy on those points.
    assert float(card["autoattack_acc"]) <= float(clean[:10].mean()) * 100
    assert card["ssat"]["sanity"]["checks"]["autoattack_not_above_pgd"]["num_points"] == 10
    assert card["additional_data"] is None and card["ssat"]["selector"] is None, "a bare file says nothing of these"
    info = robustbench["ModelInfo"](**{k: v for k, v in card.items() if k not in ("threat_model", "ssat")})
    assert info.clean_acc == card["clean_acc"]
    assert "clean" in capsys.readouterr().out

    flags = sorted((tmp_path / "cache" / "evaluate").glob("*/flags/autoattack/*.npy"))
    assert len(flags) == 1, "per-point flags in chunks under the cache"
    assert cli.main([str(path), *CHEAP, f"cache_dir={tmp_path / 'cache'}", "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["ssat"]["evaluate_dir"] == card["ssat"]["evaluate_dir"] and again["clean_acc"] == card["clean_acc"]


def test_overrides_change_the_setting_and_the_key(lab_model, tmp_path):
    _, path, _ = lab_model
    out = tmp_path / "card.json"
    assert cli.main([str(path), *CHEAP, "eval.pgd.eps=0.1", "eval.autoattack.enabled=false", "test_size=60",
                     f"cache_dir={tmp_path / 'cache'}", "--out", str(out), "--name", "Lab2026Digits",
                     "--additional-data", "false"]) == 0
    card = json.loads(out.read_text())
    assert card["eps"] == "0.1" and card["autoattack_acc"] is None and card["ssat"]["num_test"] == 60
    assert card["name"] == "Lab2026Digits" and card["additional_data"] is False


@pytest.mark.parametrize("argument, message", [("nowhere.pt", "no such run directory or model file"),
                                               ("pickled", "pickled Python objects"),
                                               ("a_folder", "is not the directory of a finished python -m ssat.run")])
def test_what_cannot_be_evaluated_is_one_line_with_exit_code_2(argument, message, tmp_path, capsys):
    import argparse

    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled")
    (tmp_path / "a_folder").mkdir()
    assert cli.main([str(tmp_path / argument), *CHEAP, f"cache_dir={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssat.evaluate: error: ") and message in err[0], err
    assert not (tmp_path / "cache" / "evaluate").exists()
    assert np.all([not p.name.endswith(".model_card.json") for p in tmp_path.iterdir()])
