"""requirements.lock (the exact versions make and CI install) satisfies the ranges pyproject.toml declares, and
scripts/check_lock.py catches a lock that does not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_lock", ROOT / "scripts" / "check_lock.py")
check_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_lock)

PYPROJECT = check_lock.tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = (ROOT / "requirements.lock").read_text()


def test_the_lock_satisfies_every_declared_range(capsys):
    assert check_lock.main([]) == 0
    assert "requirements.lock satisfies the" in capsys.readouterr().out
    assert check_lock.problems(PYPROJECT, LOCK) == []


def test_the_gpu_extra_pins_the_faiss_release_of_the_cpu_extra():
    pins, _ = check_lock.read_lock(LOCK)
    assert pins["faiss-gpu"] == pins["faiss-cpu"]
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert [r.split(">")[0] for r in extras["cpu"]] == ["faiss-cpu"] and extras["gpu"][0].startswith("faiss-gpu")
    assert not any("faiss" in r for r in PYPROJECT["project"]["dependencies"]), \
        "both wheels install the module faiss: the base dependencies take neither"


@pytest.mark.parametrize("edit, message", [
    (("numpy==", "numpy==1.26.4 # "), "numpy==1.26.4 in requirements.lock is outside <3,>=2.4, the range of the dependencies"),
    (("faiss-gpu==1.15.1", "faiss-gpu==1.14.3"), "faiss-gpu==1.14.3 in requirements.lock is outside <2,>=1.15, the range of extra 'gpu'"),
    (("\nwandb==", "\n# wandb=="), "wandb (wandb<1,>=0.31, extra 'wandb') is not pinned"),
    (("\ntqdm==4.70.1", "\ntqdm>=4.70"), "'tqdm>=4.70' is not one exact pin"),
    (("\nscipy==1.17.1", "\nscipy==1.17.1\nscipy==1.17.1"), "scipy is pinned twice"),
])
def test_a_lock_outside_the_ranges_is_reported_naming_the_package(edit, message, tmp_path, capsys):
    old, new = edit
    assert LOCK.count(old) == 1
    lock = tmp_path / "requirements.lock"
    lock.write_text(LOCK.replace(old, new))
    assert check_lock.main([str(ROOT / "pyproject.toml"), str(lock)]) == 1
    err = capsys.readouterr().err
    assert message in err and all(line.startswith("check_lock: ") for line in err.splitlines()), err
