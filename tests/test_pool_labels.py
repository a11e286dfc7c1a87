"""pool.labels for .npz pools: the selected images train on the files' labels (the release, TrustMLRG/EfficientSSAT
datasets.py: ``selected_targets = labels[low_confidence_indices]`` of the DDPM .npz) or on the intermediate
model's pseudo-labels; on a real small .npz pool made from digits, through the command line."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY, Run, compose
from ssat.data.datasets import load_digits
from ssat.data.splits import split_pool


@pytest.fixture(scope="module")
def digits_pool(tmp_path_factory):
    """The digits pool as an .npz whose labels are shifted by one class, so that they are not what the
    intermediate model predicts; and the same images without labels."""
    data = split_pool(load_digits(test_fraction=0.2, split_seed=0), val_size=150, num_labeled=300,
                      num_unlabeled=None, split_seed=0)
    folder = tmp_path_factory.mktemp("npz")
    shifted = (data.pool_hidden_labels + 1) % 10
    np.savez(folder / "labelled.npz", image=data.pool_images[:, 0], label=shifted)
    np.savez(folder / "unlabelled.npz", image=data.pool_images[:, 0])
    return folder, shifted


# The labels' test needs a trained intermediate model (FAST's 10 epochs), not a trained SSAT model.
PLUMBING = [*TINY, "intermediate.epochs=10", "ssat.batches_per_epoch=2"]


def in_process(*overrides: str, run_dir, cache_dir) -> Run:
    """The pipeline in this process on the composed config (the labels are results, not command-line output)."""
    from ssat.pipeline import run_pipeline

    run_pipeline(compose(*PLUMBING, *overrides, f"cache_dir={cache_dir}"), run_dir)
    return Run(None, run_dir)


def training_labels(run, cache) -> np.ndarray:
    return np.load(cache / "pseudo_label" / run.results["stage_keys"]["pseudo_label"] / "pseudo_labels.npy")


@pytest.mark.slow
def test_file_labels_train_by_default_and_intermediate_is_the_option(digits_pool, tmp_path):
    folder, shifted = digits_pool
    common = ["pool=npz", f"pool.paths={folder / 'labelled.npz'}", "selector=random", "budget=0.2"]
    cache = tmp_path / "cache"
    default = in_process(*common, run_dir=tmp_path / "file", cache_dir=cache)
    option = in_process(*common, "pool.labels=intermediate", run_dir=tmp_path / "intermediate", cache_dir=cache)
    np.testing.assert_array_equal(default.selection, option.selection)
    assert default.results["pool_labels"] == "file" and option.results["pool_labels"] == "intermediate"
    np.testing.assert_array_equal(training_labels(default, cache), shifted[default.selection])
    pseudo = training_labels(option, cache)
    assert (pseudo != shifted[option.selection]).mean() > 0.5, "the intermediate model does not predict the shift"
    # pseudo_label_acc: the intermediate model's argmax against the files' labels, whichever labels train
    assert default.results["pseudo_label_acc"] == option.results["pseudo_label_acc"] == \
        pytest.approx((pseudo == shifted[option.selection]).mean())
    keys = [run.results["stage_keys"] for run in (default, option)]
    assert keys[0]["embed"] == keys[1]["embed"] and keys[0]["pseudo_label"] != keys[1]["pseudo_label"]
    assert keys[0]["ssat"] != keys[1]["ssat"]


@pytest.mark.slow
def test_intermediate_labels_need_no_labels_in_the_file(digits_pool, tmp_path):
    folder, _ = digits_pool
    run = in_process("pool=npz", f"pool.paths={folder / 'unlabelled.npz'}", "pool.labels=intermediate",
                     "selector=random", "budget=0.1", run_dir=tmp_path / "run", cache_dir=tmp_path / "cache")
    assert run.results["pool_labels"] == "intermediate" and run.results["pseudo_label_acc"] is None
