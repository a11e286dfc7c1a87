"""The experiment presets of issue 8 compose and run every stage, on real CIFAR-10 images with tiny limits."""

from __future__ import annotations

import numpy as np
import pytest

from cifar_archive import extract_cifar_subset, pixels_and_labels, read_cifar_jpegs, write_cifar10
from conftest import compose, run_in_process, run_ssat


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


def test_dmat_wrn28_10_preset_runs_one_batch_of_each_stage_on_a_two_part_pool(tmp_path):
    """Wang et al. 2023's recipe on a generated pool in two .npz parts (as their 20M file), a selector's budget
    of 0.1 on top; only the sizes shrink (a WRN-10-1, batches of 10, one attack step), the rest is the preset's."""
    jpegs = read_cifar_jpegs(per_class_train=4, per_class_test=1)
    write_cifar10(tmp_path / "data", jpegs)
    pool_x, pool_y = pixels_and_labels(jpegs, "train")
    parts = []
    for number, rows in enumerate((slice(0, 24), slice(24, 40)), start=1):
        parts.append(tmp_path / f"20m_part{number}.npz")
        np.savez(parts[-1], image=pool_x[rows].transpose(0, 2, 3, 1), label=pool_y[rows])
    overrides = ["experiment=dmat_wrn28_10", f"dataset.root={tmp_path / 'data'}",
                 f"pool.paths=[{parts[0]},{parts[1]}]", "model.depth=10", "model.widen_factor=1", "val_size=10",
                 "test_size=4", "intermediate.epochs=1", "ssat.epochs=1", "intermediate.batch_size=10",
                 "ssat.batch_size=10", "ssat.batches_per_epoch=1", "+trainer.limit_train_batches=1",
                 "+trainer.limit_val_batches=1", "eval.batch_size=10", "attack.steps=1", "eval.pgd.steps=1",
                 "eval.val_pgd.steps=1", "eval.sanity.num_points=4", "eval.sanity.noise_samples=1",
                 "eval.autoattack.enabled=false", "selector.nredo=1"]
    cfg = compose(*overrides)
    assert (cfg.model.activation, cfg.model.bn_momentum, cfg.attack.beta, cfg.attack.label_smoothing) == \
        ("silu", 0.01, 5.0, 0.1)
    assert (cfg.ssat.unsup_fraction, cfg.ssat.optim.lr, cfg.ssat.optim.schedule, cfg.ssat.ema.decay) == \
        (0.7, 0.2, "onecycle", 0.995)
    r = run_in_process(*overrides, tmp_path=tmp_path, tiny=False)
    assert r["dataset"] == "cifar10" and r["selector"] == "lcs_km" and r["budget"] == 0.1
    assert r["sizes"]["pool"] == 40 and r["n_selected"] == 4
    assert r["ssat_epochs"] == 1 and 0.0 <= r["robust_acc"] <= r["clean_acc"] <= 1.0
    assert all(not cached for cached in r["cached"].values())
