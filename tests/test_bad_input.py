"""Bad input stops before any work with one line naming the bad value, exit code 2, and nothing left behind.

One table of cases runs through the command line's own entry (``ssat.run.cli``) in this process, on the real
config tree: each must exit with code 2, print exactly one line ``ssat: error: ...`` holding the given fragments,
and leave the cache and the working directory (where ``outputs/`` would go) as they were. A few cases run
through a real ``python -m ssat.run`` process (marked slow), as a user would.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_archive import extract_cifar_subset
from conftest import run_ssat
from ssat import run as ssat_run
from ssat.config import check_command_line
from ssat.models import SmallCNN, WideResNet

TOO_LONG = "x" * 300  # longer than the file-name limit (255)


def images(root: Path, sizes: dict[str, list[int]]) -> Path:
    """root/train/<class>/*.png and root/test/<class>/*.png, grey, one image per listed size."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, side_list in sizes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, side in enumerate(side_list):
                Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def pool_images(n: int = 40, dtype=np.uint8, shape=(8, 8)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 17, (n, *shape)).astype(dtype)


def labels_100_to_109(path: Path) -> Path:
    return npz(path, image=pool_images(10), label=np.arange(100, 110))


def truncated(path: Path) -> Path:
    npz(path, image=pool_images(400))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def not_a_zip_member(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("image.npy", b"not an array")
    return path


def pickled_checkpoint(tmp: Path) -> Path:
    """A checkpoint that stores its training arguments as a Namespace, as many training scripts do."""
    torch.save({"state_dict": SmallCNN(1, 10, [0.3], [0.4]).state_dict(), "args": argparse.Namespace(lr=0.1)},
               tmp / "pickled.pt")
    return tmp / "pickled.pt"


def wrn_weights(tmp: Path) -> Path:
    torch.save(WideResNet(1, 10, [0.3], [0.4], depth=10, widen_factor=1).state_dict(), tmp / "wrn.pt")
    return tmp / "wrn.pt"


def cifar(tmp: Path, per_class_train: int, per_class_test: int, *classes: str) -> Path:
    """A few real CIFAR-10 JPEGs of the given classes in ImageFolder layout."""
    return extract_cifar_subset(tmp / "cifar", per_class_train=per_class_train, per_class_test=per_class_test,
                                classes=list(classes))


def symlink_loop(tmp: Path) -> Path:
    (tmp / "loop").symlink_to(tmp / "loop")
    return tmp / "loop"


def a_file(tmp: Path) -> Path:
    (tmp / "file").write_text("")
    return tmp / "file"


# (id, a function of a scratch folder giving the command line's overrides, fragments of the error line)
CASES = [
    # unknown options and keys
    ("unknown-selector", lambda t: ["selector=foo"], ["unknown selector 'foo'", "lcs_km", "pcs", "random"]),
    ("unknown-dataset", lambda t: ["dataset=mnist"], ["unknown dataset 'mnist'", "digits", "image_folder"]),
    ("unknown-model", lambda t: ["model=resnet50"], ["unknown model 'resnet50'", "small_cnn", "wrn28_10"]),
    ("unknown-in-sweep", lambda t: ["-m", "selector=random,nope"], ["unknown selector 'nope'"]),
    ("unknown-in-choice", lambda t: ["-m", "selector=choice(random,nope)"], ["unknown selector 'nope'"]),
    ("misspelled-key", lambda t: ["budgett=0.2"], ["budgett is not a config key", "did you mean budget?"]),
    ("misspelled-nested-key", lambda t: ["selector.boundry_fraction=0.5"],
     ["selector.boundry_fraction", "did you mean selector.boundary_fraction?"]),
    ("misspelled-group", lambda t: ["selectr=pcs"], ["selectr is not a config key", "did you mean selector?"]),
    ("added-unknown-key", lambda t: ["+eval.foo=1"], ["eval.foo is not a config key"]),
    ("sweep-without-m", lambda t: ["selector=random,pcs"], ["selector=random,pcs", "--multirun"]),
    ("unparsable", lambda t: ["budget=[0.2"], ["budget=[0.2"]),
    # wrong types
    ("seed-float", lambda t: ["seed=1.5"], ["seed=1.5 must be an integer"]),
    ("seed-null", lambda t: ["seed=null"], ["seed=null must be an integer"]),
    ("budget-string", lambda t: ["budget=abc"], ["budget='abc' must be a number"]),
    ("epochs-float", lambda t: ["intermediate.epochs=2.5"], ["intermediate.epochs=2.5 must be an integer"]),
    ("bool-string", lambda t: ["loader.pin_memory=maybe"], ["loader.pin_memory='maybe' must be true or false"]),
    ("block-scalar", lambda t: ["eval.pgd=3"], ["eval.pgd=3 must be a block of keys"]),
    ("list-item", lambda t: ["intermediate.optim.milestones=[a]"], ["intermediate.optim.milestones[0]='a'"]),
    ("optional-int", lambda t: ["ssat.batches_per_epoch=many"], ["ssat.batches_per_epoch='many' must be an integer"]),
    ("wrong-type-in-sweep", lambda t: ["-m", "seed=0,1.5"], ["seed=1.5 must be an integer"]),
    # out-of-range values and bad choices
    ("budget-above-1", lambda t: ["budget=1.5"], ["budget=1.5", "(0, 1]"]),
    ("budget-0", lambda t: ["budget=0"], ["budget=0", "(0, 1]"]),
    ("budget-negative", lambda t: ["budget=-0.1"], ["budget=-0.1"]),
    ("budget-in-glob-sweep", lambda t: ["-m", "selector=glob(lcs_*)", "budget=0.2,7"], ["budget=7"]),
    ("seed-negative", lambda t: ["seed=-1"], ["seed=-1", "[0, 4294967295]"]),
    ("val-size-0", lambda t: ["val_size=0"], ["val_size=0 must be at least 1"]),
    ("test-size-0", lambda t: ["test_size=0"], ["test_size=0 must be at least 1"]),
    ("unsup-fraction-1", lambda t: ["ssat.unsup_fraction=1"], ["ssat.unsup_fraction=1", "[0, 1)"]),
    ("boundary-fraction", lambda t: ["selector=lcs_km", "selector.boundary_fraction=1.5"],
     ["selector.boundary_fraction=1.5", "[0, 1]"]),
    ("boundary-negative", lambda t: ["selector=pcs", "selector.boundary_fraction=-1"],
     ["selector.boundary_fraction=-1"]),
    ("gmm-score", lambda t: ["selector=lcs_gmm", "selector.score=median"], ["selector.score='median'",
                                                                              "posterior_gap"]),
    ("guidance-components", lambda t: ["selector=lcg_gmm", "selector.guidance.components=1"],
     ["selector.guidance.components=1"]),
    ("guidance-sign", lambda t: ["selector=pcg", "selector.guidance.sign=minus"],
     ["selector.guidance.sign='minus'", "paper, release"]),
    ("extrapolation-epochs", lambda t: ["selector=extrapolation", "selector.epochs=10"],
     ["selector.epochs=10", "selector.window=10"]),
    ("pool-too-large", lambda t: ["pool.num_unlabeled=5000"], ["pool.num_unlabeled=5000", "leave 987"]),
    ("labeled-too-large", lambda t: ["pool.num_labeled=2000"], ["pool.num_labeled=2000"]),
    ("lambda-negative", lambda t: ["selector=lcg_km", "generation.lam=-1"], ["generation.lam=-1"]),
    ("num-images-0", lambda t: ["selector=lcg_gmm", "generation.num_images=0"], ["generation.num_images=0"]),
    ("pretrain-images", lambda t: ["selector=pcg", "generation.pretrain.images=train"],
     ["generation.pretrain.images='train' is not one of"]),
    ("pgd-loss", lambda t: ["eval.pgd.loss=hinge"], ["eval.pgd.loss='hinge'", "ce, cw"]),
    ("restarts-without-start", lambda t: ["eval.val_pgd.restarts=3", "eval.val_pgd.random_start=false"],
     ["eval.val_pgd.restarts=3", "random_start"]),
    ("ema-decay", lambda t: ["ssat.ema.decay=1.5"], ["ssat.ema.decay=1.5", "[0, 1)"]),
    ("patience-0", lambda t: ["ssat.early_stopping.patience=0"], ["ssat.early_stopping.patience=0"]),
    ("pseudo-labels", lambda t: ["ssat.pseudo_labels=medium"], ["ssat.pseudo_labels='medium'", "hard, soft"]),
    ("pseudo-label-temperature", lambda t: ["ssat.pseudo_label_temperature=0"],
     ["ssat.pseudo_label_temperature=0", "greater than 0"]),
    ("reselect-every-0", lambda t: ["selector.reselect_every=0"], ["selector.reselect_every=0", "at least 1"]),
    ("reselect-warmup-0", lambda t: ["selector.reselect_every=2", "selector.reselect_warmup=0"],
     ["selector.reselect_warmup=0"]),
    ("reselect-labeled-target", lambda t: ["selector.reselect_every=2", "selection.target=labeled"],
     ["selector.reselect_every=2", "selection.target=labeled"]),
    ("autoattack-version", lambda t: ["eval.autoattack.version=fast"], ["eval.autoattack.version='fast'",
                                                                         "standard"]),
    ("selection-target", lambda t: ["selection.target=unlabeled"], ["selection.target='unlabeled'", "pool"]),
    ("embed-dtype", lambda t: ["embed.dtype=int8"], ["embed.dtype='int8'", "float32"]),
    ("eps-scales", lambda t: ["eval.sanity.eps_scales=[1,1]"], ["eval.sanity.eps_scales=[1, 1]", "distinct"]),
    ("unresolvable", lambda t: ["budget=${nope}"], ["budget cannot be resolved", "nope"]),
    # data reduction beside LCS (METHODS.md section 4)
    ("coreset-select-every-0", lambda t: ["selector=coreset_craig", "selector.select_every=0"],
     ["selector.select_every=0", "at least 1"]),
    ("coreset-kappa", lambda t: ["selector=coreset_gradmatch", "selector.kappa=1.5"], ["selector.kappa=1.5", "[0, 1]"]),
    ("extrapolation-neighbours", lambda t: ["selector=extrapolation", "selector.neighbours=200"],
     ["selector.neighbours=200", "scored set", "scores 99"]),
    ("extrapolation-true-class", lambda t: ["selector=extrapolation", "selector.probabilities=true_class"],
     ["true_class needs labels"]),
    ("target-unknown", lambda t: ["selection.target=everything"], ["selection.target='everything'", "pool, labeled"]),
    ("target-of-generation", lambda t: ["selector=lcg_km", "selection.target=labeled"],
     ["selection.target=labeled does not apply"]),
    # missing, empty and malformed data sets and pools
    ("root-missing", lambda t: ["dataset=image_folder"], ["dataset.root must be set", "dataset.root=<value>"]),
    ("root-not-there", lambda t: ["dataset=image_folder", f"dataset.root={t / 'nowhere'}"], ["nowhere"]),
    ("root-symlink-loop", lambda t: ["dataset=image_folder", f"dataset.root={symlink_loop(t)}"],
     ["dataset.root=", "symbolic links"]),
    ("root-name-too-long", lambda t: ["dataset=image_folder", f"dataset.root={t / TOO_LONG}"],
     ["dataset.root=", "File name too long"]),
    ("folder-without-images",
     lambda t: ["dataset=image_folder", f"dataset.root={images(t / 'd', {'a': [], 'b': [8]})}"],
     ["no images"]),
    ("folder-mixed-sizes", lambda t: ["dataset=image_folder", "dataset.channels=1", "dataset.mean=[0.5]",
                                      "dataset.std=[0.5]", f"dataset.root={images(t / 'd', {'a': [8, 9], 'b': [8]})}"],
     ["9x9", "dataset.image_size"]),
    ("folder-one-class", lambda t: ["dataset=image_folder", "dataset.channels=1", "dataset.mean=[0.5]",
                                    "dataset.std=[0.5]", "val_size=4", "pool.num_labeled=8",
                                    f"dataset.root={images(t / 'd', {'a': [8] * 20})}"],
     ["1 class"]),
    ("folder-pool-too-large", lambda t: ["dataset=image_folder", f"dataset.root={cifar(t, 4, 2, 'cat', 'dog')}",
                                         "val_size=2", "pool.num_labeled=2", "pool.num_unlabeled=100"],
     ["pool.num_unlabeled=100", "leave 4"]),
    ("autoattack-three-classes", lambda t: ["dataset=image_folder", f"dataset.root={cifar(t, 10, 2, 'airplane', 'cat', 'ship')}",
                                            "val_size=6", "pool.num_labeled=12"],
     ["eval.autoattack.enabled=true needs at least 4 classes (APGD-T's targeted DLR loss); the data set has 3: set "
      "eval.autoattack.enabled=false"]),
    ("torchvision-offline", lambda t: ["dataset=cifar10", "model=preact_resnet18", f"dataset.root={t / 'data'}"],
     ["cifar10", "dataset.download=true"]),
    ("npz-missing", lambda t: ["pool=npz", f"pool.paths={t / 'none.npz'}"], ["none.npz", "not found"]),
    ("npz-paths-empty", lambda t: ["pool=npz", "pool.paths=[]"], ["pool.paths is empty"]),
    ("npz-truncated", lambda t: ["pool=npz", f"pool.paths={truncated(t / 'p.npz')}"], ["p.npz", "truncated"]),
    ("npz-corrupt-member", lambda t: ["pool=npz", f"pool.paths={not_a_zip_member(t / 'p.npz')}"], ["p.npz"]),
    ("npz-wrong-dtype", lambda t: ["pool=npz", f"pool.paths={npz(t / 'p.npz', image=pool_images(dtype=np.float32))}"],
     ["p.npz", "float32", "uint8"]),
    ("npz-empty", lambda t: ["pool=npz", f"pool.paths={npz(t / 'p.npz', image=pool_images(0))}"],
     ["p.npz", "holds no images"]),
    ("npz-wrong-shape", lambda t: ["pool=npz", f"pool.paths={npz(t / 'p.npz', image=pool_images(shape=(5, 5)))}"],
     ["p.npz", "(1, 5, 5)", "(1, 8, 8)"]),
    ("npz-wrong-key", lambda t: ["pool=npz", f"pool.paths={npz(t / 'p.npz', x=pool_images())}"],
     ["p.npz", "no 'image' array", "keys: x"]),
    ("npz-file-labels-missing", lambda t: ["pool=npz", f"pool.paths={npz(t / 'unlabelled.npz', image=pool_images())}"],
     ["pool.labels=file", "unlabelled.npz", "no 'label' array", "pool.labels=intermediate"]),
    ("pool-labels-unknown", lambda t: ["pool=npz", f"pool.paths={npz(t / 'p.npz', image=pool_images())}",
                                       "pool.labels=model"], ["pool.labels='model'", "intermediate, file"]),
    ("npz-labels-outside-classes", lambda t: ["pool=npz", f"pool.paths={labels_100_to_109(t / 'p.npz')}"],
     ["labels 100..109", "10 classes"]),
    ("bad-pool-in-a-sweep", lambda t: ["-m", "pool=npz", f"pool.paths={labels_100_to_109(t / 'p.npz')}", "seed=0,1"],
     ["labels 100..109"]),
    # model files that cannot be read as tensors, or do not fit the model
    ("checkpoint-missing", lambda t: [f"intermediate.checkpoint={t / 'none.pt'}"],
     ["intermediate.checkpoint=", "none.pt: no such file"]),
    ("checkpoint-not-torch", lambda t: [f"intermediate.checkpoint={a_file(t)}"],
     ["intermediate.checkpoint=", "is not a file torch.load can read"]),
    ("checkpoint-pickled", lambda t: [f"intermediate.checkpoint={pickled_checkpoint(t)}"],
     ["intermediate.checkpoint=", "pickled.pt holds pickled Python objects", "weights_only=False", "weights.pt"]),
    ("checkpoint-other-architecture", lambda t: [f"intermediate.checkpoint={wrn_weights(t)}"],
     ["wrn.pt does not fit the configured model SmallCNN-32", "keys missing (layers.0.weight",
      "unexpected keys (conv1.weight", "model="]),
    ("classifier-other-architecture", lambda t: ["selector=pcg", f"generation.classifier={wrn_weights(t)}"],
     ["generation.classifier=", "wrn.pt does not fit the configured model SmallCNN-32"]),
    # outputs that cannot be written
    ("run-dir-forbidden", lambda t: ["hydra.run.dir=/sys/ssat-test/run"], ["hydra.run.dir=/sys/ssat-test/run"]),
    ("run-dir-under-file", lambda t: [f"hydra.run.dir={a_file(t)}/run"], ["hydra.run.dir=", "is a file"]),
    ("sweep-dir-under-file", lambda t: ["-m", f"hydra.sweep.dir={a_file(t)}/sweep", "seed=0,1"],
     ["hydra.sweep.dir=", "is a file"]),
    ("cache-dir-under-file", lambda t: [f"cache_dir={a_file(t)}/cache"], ["cache_dir=", "Not a directory"]),
    ("cache-dir-forbidden", lambda t: ["cache_dir=/sys/ssat-test/cache"], ["cache_dir=/sys/ssat-test/cache"]),
]


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# Cases found only once the data is read: the decoded image folder or the converted pool stays in the cache (valid
# data, reused by the corrected run); nothing else may be there.
DATA_READ_FIRST = {"folder-pool-too-large": {"image_folder"}, "autoattack-three-classes": {"image_folder"},
                   "npz-file-labels-missing": {"pools"}}


@pytest.mark.parametrize("case, make_overrides, fragments", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_with_exit_code_2_and_leaves_nothing(case, make_overrides, fragments, tmp_path,
                                                                    monkeypatch, capsys):
    scratch, work, cache = tmp_path / "scratch", tmp_path / "work", tmp_path / "cache"
    for folder in (scratch, work):
        folder.mkdir()
    overrides = make_overrides(scratch)
    if not any(o.startswith("cache_dir=") for o in overrides):
        overrides.append(f"cache_dir={cache}")
    monkeypatch.chdir(work)  # where Hydra's outputs/ and multirun/ would go
    monkeypatch.setattr(sys, "argv", ["ssat.run", *overrides])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        ssat_run.cli()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "img/s" not in line]  # progress bars may stay
    assert exited.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("ssat: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert tree(work) == [], "a run that fails before any work leaves no run directory"
    kept = DATA_READ_FIRST.get(case, set())
    assert [p for p in tree(cache) if p.split("/")[0] not in kept] == [], "nothing may be computed or converted"


# Runs `python -m ssat.run <command line>` for each command line in one process, then says which heavy packages
# that process imported: a bad command line must fail without them (about 2 s instead of 9).
CHECK_WITHOUT_HEAVY_IMPORTS = """
import json, runpy, sys
codes = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["ssat.run", *argv]
    try:
        runpy.run_module("ssat.run", run_name="__main__", alter_sys=True)
    except SystemExit as exited:
        codes.append(exited.code)
print(json.dumps({"codes": codes, "imported": sorted(m for m in sys.modules if m.split(".")[0] in
                                                     ("torch", "lightning", "diffusers", "ssat"))}))
"""


def test_bad_command_line_fails_before_torch_and_lightning_are_imported(tmp_path):
    """The command line's checks import only what they need: the pipeline, torch and Lightning come after them."""
    command_lines = [["budget=2"], ["selector=foo"], ["budgett=0.2"], ["eval.pgd.loss=xx"],
                     ["-m", "selector=choice(random,pcs)", "budget=1.5"],
                     ["-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2"]]
    proc = subprocess.run([sys.executable, "-c", CHECK_WITHOUT_HEAVY_IMPORTS, json.dumps(command_lines)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ssat: error: ")]
    assert len(errors) == len(command_lines), proc.stderr[-3000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    assert found["codes"] == [2] * len(command_lines), proc.stderr[-3000:]
    assert {"ssat.config", "ssat.schema"} <= set(found["imported"])  # the checks did run in this process
    heavy = [m for m in found["imported"] if m.split(".")[0] in ("torch", "lightning", "diffusers")]
    assert heavy == [], f"the checks of a bad command line imported {heavy[:5]}"
    assert not any(m.startswith(("ssat.pipeline", "ssat.tracking", "ssat.stages")) for m in found["imported"])
    assert list(tmp_path.iterdir()) == [], "a bad command line leaves no outputs folder"


def test_hydra_sweep_grammar_expands_to_the_jobs_hydra_runs():
    """choice(...), glob(...) and range(...) are Hydra's own sweep grammar: every job is composed and passes."""
    check_command_line(["-m", "selector=choice(random,pcs)", "budget=0.1,0.2"])
    check_command_line(["-m", "selector=glob(lcs_*)", "seed=range(0,3)"])
    check_command_line(["selector=random", "budget=0.3"])


def assert_one_line_error(run, *fragments: str) -> None:
    assert run.proc.returncode == 2, run.proc.stdout[-2000:] + run.proc.stderr[-2000:]
    lines = [line for line in run.proc.stderr.splitlines() if line.strip() and "img/s" not in line]
    assert len(lines) == 1 and lines[0].startswith("ssat: error: "), run.proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not run.run_dir.exists(), "a run that fails before any work leaves no run directory"


@pytest.mark.slow
@pytest.mark.parametrize("overrides, fragments", [
    (["selector=foo"], ["unknown selector 'foo'", "lcs_km", "lcs_gmm", "pcs", "random", "full"]),
    (["seed=1.5"], ["seed=1.5 must be an integer"]),
    (["budgett=0.2"], ["budgett is not a config key; did you mean budget?"]),
    (["-m", "selector=choice(random,pcs)", "budget=1.5"], ["budget=1.5", "(0, 1]"]),
])
def test_bad_input_on_the_command_line(overrides, fragments, tmp_path):
    run = run_ssat(*overrides, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", check=False)
    assert_one_line_error(run, *fragments)
    assert tree(tmp_path / "cache") == [], "nothing may be trained after bad input"


@pytest.mark.slow
def test_bad_data_on_the_command_line_leaves_no_outputs_folder(tmp_path):
    """The default run directory (outputs/<date>/<time>_...) is created by Hydra, then removed with its parents."""
    pool = labels_100_to_109(tmp_path / "p.npz")
    run = run_ssat("pool=npz", f"pool.paths={pool}", run_dir=tmp_path / "run", cache_dir=tmp_path / "cache",
                   check=False, cwd=tmp_path)
    assert_one_line_error(run, "labels 100..109")
    assert not (tmp_path / "outputs").exists() and tree(tmp_path / "cache") == []


@pytest.mark.slow
def test_a_failure_during_work_exits_1_with_one_line(tmp_path):
    """Exit code 2 is bad input found before work; a stage that fails (here a diverged loss) exits 1."""
    run = run_ssat("intermediate.optim.lr=1e30", "intermediate.epochs=2", run_dir=tmp_path / "run",
                   cache_dir=tmp_path / "cache", check=False, fast=False)
    lines = [line for line in run.proc.stderr.splitlines() if line.startswith("ssat: error: ")]
    assert run.proc.returncode == 1 and len(lines) == 1, run.proc.stderr[-3000:]
    assert "Traceback" not in run.proc.stderr
    assert run.run_dir.is_dir(), "work was done: the run directory and its logs stay"


@pytest.mark.parametrize("overrides", [[], ["dataset=digits32"], ["dataset=cifar10"], ["dataset=cifar100"],
                                       ["dataset=svhn"],
                                       ["experiment=cifar10_paper", "pool.paths=pool.npz"],
                                       ["experiment=cifar10_small"], ["experiment=autoattack"], ["selector=lcg_gmm"],
                                       ["trainer=ddp"]])
def test_the_presets_pass_the_schema(overrides):
    """The schema declares every key of its blocks (an undeclared one fails as unknown) and allows every preset."""
    check_command_line(overrides)
