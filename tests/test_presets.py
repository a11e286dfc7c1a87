"""The experiment presets of issue 8 compose and run every stage, on real CIFAR-10 images with tiny limits."""

from __future__ import annotations

import numpy as np
import pytest

from cifar_archive import extract_cifar_subset, pixels_and_labels, read_cifar_jpegs, write_cifar10
from conftest import run_ssat


@pytest.mark.slow
def test_cifar10_paper_preset_runs_one_batch_of_each_stage(tmp_path):
    """WRN-28-10, the official CIFAR-10 files and an npz pool as the paper's 1M-DDPM set, one batch per stage.

    The limits shrink the data, the batches and the attack steps; the model, the data formats, TRADES and the
    evaluation's PGD and sanity checks are the preset's. (AutoAttack on WRN-28-10 costs minutes per point on a
    CPU; its wrapper is tested in test_evaluate.py.)
    """
    jpegs = read_cifar_jpegs(per_class_train=4, per_class_test=1)
    write_cifar10(tmp_path / "data", jpegs)
    pool_x, pool_y = pixels_and_labels(jpegs, "train")
    pool = tmp_path / "ddpm_pool.npz"
    np.savez(pool, image=pool_x.transpose(0, 2, 3, 1)[:16], label=pool_y[:16])  # N x H x W x C as the 1M set
    limits = ["val_size=10", "test_size=4", "intermediate.epochs=1", "ssat.epochs=1", "intermediate.batch_size=4",
              "ssat.batch_size=4", "ssat.batches_per_epoch=1", "+trainer.limit_train_batches=1",
              "+trainer.limit_val_batches=1", "eval.batch_size=4", "attack.steps=1", "eval.pgd.steps=1",
              "eval.val_pgd.steps=1", "eval.sanity.num_points=4", "eval.sanity.noise_samples=1",
              "eval.autoattack.enabled=false", "selector.nredo=1"]
    run = run_ssat("experiment=cifar10_paper", f"dataset.root={tmp_path / 'data'}", f"pool.paths={pool}", *limits,
                   run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", fast=False)
    r = run.results
    assert r["dataset"] == "cifar10" and r["selector"] == "lcs_km"
    assert r["sizes"]["labeled"] == 40 - 10 and r["sizes"]["pool"] == 16 and r["sizes"]["test"] == 4
    assert r["n_selected"] == round(0.2 * 16)
    assert r["ssat_epochs"] == 1 and all(not cached for cached in r["cached"].values())
    record = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    for setting in ("_target_: ssat.models.WideResNet", "depth: 28", "widen_factor: 10", "beta: 6.0",
                    "_target_: ssat.data.pools.npz_pool", "_target_: ssat.data.datasets.load_cifar10"):
        assert setting in record


@pytest.mark.slow
def test_cifar10_small_preset_runs_on_the_image_folder(tmp_path):
    """The laptop-scale comparison's preset on an ImageFolder subset of the archive, with its sizes shrunk."""
    root = extract_cifar_subset(tmp_path / "cifar10", per_class_train=12, per_class_test=2)
    run = run_ssat("experiment=cifar10_small", f"dataset.root={root}", "pool.num_labeled=40",
                   "pool.num_unlabeled=60", "val_size=20", "test_size=20", "intermediate.epochs=1", "ssat.epochs=2",
                   "eval.sanity.num_points=20", "selector=lcs_gmm", "selector.pca_dim=8", "budget=0.1",
                   run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", fast=False)
    r = run.results
    assert r["dataset"] == "cifar10_jpeg" and r["selector"] == "lcs_gmm"
    assert [r["sizes"][part] for part in ("labeled", "val", "pool", "test")] == [40, 20, 60, 20]
    assert r["n_selected"] == 6 and len(run.selection) == 6
    assert r["ssat_epochs"] == 2 and r["ssat_epochs_to_convergence"] in (1, 2)
