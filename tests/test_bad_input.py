"""Bad input stops before any training with one line naming the bad value, and exit code 2.

A few cases go through the command line (`python -m ssat.run`: one line on stderr, exit code 2); the bad config
values run in this process through the same checks, on the real config tree, since a process start costs
seconds each.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

from cifar_archive import extract_cifar_subset
from conftest import run_ssat
from ssat.config import check_group_choices
from ssat.errors import SsatError
from ssat.pipeline import run_pipeline


def assert_one_line_error(run, *fragments: str) -> None:
    assert run.proc.returncode == 2, run.proc.stdout[-2000:] + run.proc.stderr[-2000:]
    lines = [line for line in run.proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]] and lines[-1].startswith("ssat: error: "), run.proc.stderr
    assert "Traceback" not in run.proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    assert not (run.run_dir / "results.json").exists()


@pytest.mark.parametrize("overrides, fragments", [
    (["selector=foo"], ["unknown selector 'foo'", "lcs_km", "lcs_gmm", "pcs", "random", "full"]),
    (["-m", "selector=random,nope"], ["unknown selector 'nope'"]),
    (["budget=1.5"], ["budget=1.5", "(0, 1]"]),
])
def test_bad_input_on_the_command_line(overrides, fragments, tmp_path):
    run = run_ssat(*overrides, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", check=False)
    assert_one_line_error(run, *fragments)
    assert not (tmp_path / "cache" / "intermediate").exists(), "nothing may be trained after bad input"


def config_error(overrides: list[str], tmp_path) -> str:
    """The message `python -m ssat.run` would print after 'ssat: error: ' for these overrides."""
    with pytest.raises(SsatError) as err:
        check_group_choices(overrides)
        with initialize_config_module(config_module="ssat.conf", version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"cache_dir={tmp_path / 'cache'}"])
        run_pipeline(cfg, tmp_path / "run")
    return str(err.value)


@pytest.mark.parametrize("overrides, fragments", [
    (["dataset=mnist"], ["unknown dataset 'mnist'", "digits", "cifar10", "image_folder"]),
    (["model=resnet50"], ["unknown model 'resnet50'", "small_cnn", "wrn28_10"]),
    (["budget=0"], ["budget=0", "(0, 1]"]),
    (["budget=-0.1"], ["budget=-0.1"]),
    (["selector=lcs_km", "selector.boundary_fraction=1.5"], ["selector.boundary_fraction=1.5", "[0, 1]"]),
    (["selector=pcs", "selector.boundary_fraction=-1"], ["selector.boundary_fraction=-1"]),
    (["selector=lcs_gmm", "selector.score=median"], ["selector.score='median'", "posterior_gap"]),
    (["pool.num_unlabeled=5000"], ["pool.num_unlabeled=5000", "leave 987"]),
    (["pool.num_labeled=2000"], ["pool.num_labeled=2000"]),
    (["dataset=image_folder"], ["dataset.root must be set", "dataset.root=<value>"]),
    (["selector=lcg_km", "generation.lam=-1"], ["generation.lam=-1"]),
    (["selector=lcg_gmm", "generation.num_images=0"], ["generation.num_images=0"]),
    (["selector=pcg", "generation.pretrain.images=train"], ["generation.pretrain.images='train' is not one of"]),
    (["selector=pcg", "selector.guidance.sign=minus"], ["selector.guidance.sign='minus'", "paper, release"]),
    (["selector=extrapolation", "selector.epochs=10"], ["selector.epochs=10", "selector.window=10"]),
    (["eval.pgd.loss=hinge"], ["eval.pgd.loss='hinge'", "ce, cw"]),
    (["eval.val_pgd.restarts=3", "eval.val_pgd.random_start=false"], ["eval.val_pgd.restarts=3", "random_start"]),
    (["ssat.ema.decay=1.5"], ["ssat.ema.decay=1.5", "[0, 1)"]),
    (["ssat.early_stopping.patience=0"], ["ssat.early_stopping.patience=0"]),
    (["eval.autoattack.version=fast"], ["eval.autoattack.version='fast'", "standard"]),
])
def test_bad_config_value(overrides, fragments, tmp_path):
    message = config_error(overrides, tmp_path)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "cache" / "intermediate").exists(), "nothing may be trained after bad input"
    assert not (tmp_path / "run" / "results.json").exists()


def test_image_folder_root_that_does_not_exist(tmp_path):
    missing = tmp_path / "no_such_dir"
    run = run_ssat("dataset=image_folder", f"dataset.root={missing}", run_dir=tmp_path / "run",
                   cache_dir=tmp_path / "cache", check=False)
    assert_one_line_error(run, str(missing))


def test_image_folder_without_images(tmp_path):
    root = tmp_path / "empty"
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
    run = run_ssat("dataset=image_folder", f"dataset.root={root}", run_dir=tmp_path / "run",
                   cache_dir=tmp_path / "cache", check=False)
    assert_one_line_error(run, "no images")


def test_torchvision_dataset_offline_says_how_to_get_it(tmp_path):
    run = run_ssat("dataset=cifar10", "model=preact_resnet18", f"dataset.root={tmp_path / 'data'}",
                   run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", check=False)
    assert_one_line_error(run, "cifar10", "dataset.download=true")


def test_pool_larger_than_training_set_on_image_folder(tmp_path):
    root = extract_cifar_subset(tmp_path / "cifar", per_class_train=4, per_class_test=2,
                                classes=["cat", "dog"])
    run = run_ssat("dataset=image_folder", f"dataset.root={root}", "val_size=2", "pool.num_labeled=2",
                   "pool.num_unlabeled=100", run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", check=False)
    assert_one_line_error(run, "pool.num_unlabeled=100", "leave 4")
