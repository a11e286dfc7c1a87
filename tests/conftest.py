"""Shared test helpers: runs of the real command line (`python -m ssat.run`) on the real config tree with small
overrides, one-thread torch for tiny tensors, and the small digits CNN the attack tests attack."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from forked import run_module
from ssat.models import SmallCNN

# The files that take longest (seconds of test time in a `make test` run here: 189, 161, 144, 110, 69, 67, 61, 57, 56,
# 55), handed out first: pytest-xdist (--dist loadfile --no-loadscope-reorder, see the Makefile) gives each worker
# the next file in collection order, so the longest ones run side by side at the start instead of one of them
# alone at the end (xdist's default order, by number of tests, started the 3-minute walkthrough last).
LONGEST_FIRST = ["test_walkthrough.py", "test_slurm.py", "test_regime_map.py", "test_cli.py", "test_data_reduction.py",
                 "test_bad_input.py", "test_evaluate.py", "test_adaptive_selection.py", "test_stage_graph.py",
                 "test_faults.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order


# A short schedule on digits: the same stages and code paths as the default run, in seconds.
FAST = ["intermediate.epochs=10", "ssat.epochs=6", "eval.pgd.steps=10", "eval.val_pgd.steps=3"]


# Short enough for tests of plumbing through real processes (sweeps, W&B, reports): a few fixed SSAT batches, a
# small evaluation; the intermediate model still learns (robust accuracy above 0).
SHORT = ["intermediate.epochs=4", "ssat.epochs=2", "ssat.batches_per_epoch=4", "eval.pgd.steps=3",
         "eval.val_pgd.steps=2", "test_size=120", "eval.sanity.num_points=40", "eval.sanity.noise_samples=2"]


class Run:
    """A finished `python -m ssat.run` process and its run directory."""

    def __init__(self, proc: subprocess.CompletedProcess, run_dir: Path):
        self.proc = proc
        self.run_dir = run_dir

    @property
    def results(self) -> dict:
        return json.loads((self.run_dir / "results.json").read_text())

    @property
    def selection(self) -> np.ndarray:
        return np.load(self.run_dir / "selection.npy")


def run_ssat(*overrides: str, run_dir: Path, cache_dir: Path, fast: bool = True, check: bool = True,
             cwd: Path | None = None) -> Run:
    flags = [o for o in overrides if o.startswith("-")]  # Hydra wants -m before the overrides
    overrides = [o for o in overrides if not o.startswith("-")]
    args = [*flags, *(FAST if fast else []), *overrides, f"hydra.run.dir={run_dir}", f"cache_dir={cache_dir}"]
    proc = run_module("ssat.run", args, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"ssat.run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return Run(proc, run_dir)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for the selector runs, so they share the intermediate model and the embedding as a sweep would."""
    return tmp_path_factory.mktemp("shared_cache")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is several times faster than two, most of all on a busy machine.

    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_digits_cnn(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    """A width-8 SmallCNN after 300 seeded Adam steps on (N, 1, 8, 8) digits in [0, 1]: well above chance, in eval
    mode; the model the attack and evaluation tests attack."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, mean=[0.3], std=[0.4], width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def compose(*overrides: str):
    """The real config tree composed with ``overrides``, as `python -m ssat.run` would (no Hydra run dir)."""
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module(config_module="ssat.conf", version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


# The smallest schedule that still runs every stage's code (seconds in process).
TINY = ["intermediate.epochs=2", "ssat.epochs=1", "eval.pgd.steps=2", "eval.val_pgd.steps=1", "test_size=60",
        "eval.sanity.num_points=20", "eval.sanity.noise_samples=1"]


def run_in_process(*overrides: str, tmp_path: Path, tiny: bool = True, cache_dir: Path | None = None) -> dict:
    """The pipeline in this process on the composed config (no subprocess, no Hydra job): its results.json. The
    cache is ``tmp_path / "cache"`` unless runs share ``cache_dir``."""
    from ssat.pipeline import run_pipeline

    cfg = compose(*(TINY if tiny else []), *overrides, f"cache_dir={cache_dir or tmp_path / 'cache'}")
    return run_pipeline(cfg, tmp_path / "run")


@pytest.fixture(scope="session")
def robustbench():
    """RobustBench's modules. PyPI's robustbench 1.1.1 imports AutoAttack under the name of its git repository,
    autoattack; PyPI's pyautoattack (ssat's dependency) is that code under another name."""
    if importlib.util.find_spec("robustbench") is None:
        pytest.skip("robustbench is not installed: pip install -e '.[robustbench]'")
    import pyautoattack
    import pyautoattack.state

    sys.modules.setdefault("autoattack", pyautoattack)
    sys.modules.setdefault("autoattack.state", pyautoattack.state)
    from robustbench.model_zoo import cifar10
    from robustbench.model_zoo.architectures import resnet, wide_resnet
    from robustbench.utils import ModelInfo

    return {"wide_resnet": wide_resnet, "resnet": resnet, "cifar10": cifar10, "ModelInfo": ModelInfo}
