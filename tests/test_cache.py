"""StageCache: each stage computed once per key, committed atomically, resumable from its partial folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from omegaconf import OmegaConf

from ssat.cache import RECORD, StageCache, write_json_atomic
from ssat.pipeline.stage import stage_key, values_at


class Compute:
    """A stage body that counts its calls and writes one file."""

    def __init__(self, info=None):
        self.calls = 0
        self.info = info if info is not None else {"acc": 0.5}

    def __call__(self, out):
        self.calls += 1
        (out / "artifact.txt").write_text(f"call {self.calls}")
        return dict(self.info)


INPUTS = {"model": {"depth": 28, "width": 10}, "seed": 0, "budget": 0.2}


def key_of(name, inputs):
    return stage_key(name, 1, values_at(OmegaConf.create(inputs), inputs), {})


def run(cache, name, inputs, compute):
    """A stage under the key the runner would give a stage reading ``inputs``."""
    return cache.run(name, key_of(name, inputs), inputs, compute)


def test_second_run_is_cached_and_does_not_compute(tmp_path):
    """A second run with the same inputs returns cached=True, the same path, seconds and info, no new compute."""
    cache = StageCache(tmp_path)
    compute = Compute({"acc": 0.75, "n": 3})
    first = run(cache, "embed", INPUTS, compute)
    assert not first.cached and compute.calls == 1
    assert first.path == tmp_path.resolve() / "embed" / first.key
    assert (first.path / "artifact.txt").read_text() == "call 1"
    assert first.info == {"acc": 0.75, "n": 3}

    second = run(StageCache(tmp_path), "embed", dict(INPUTS), compute)  # a new cache object: read from disk
    assert compute.calls == 1
    assert second.cached
    assert second.key == first.key and second.path == first.path
    assert second.seconds == first.seconds
    assert second.info == first.info
    record = json.loads((first.path / RECORD).read_text())
    assert record["seconds"] == first.seconds and record["key"] == first.key


def test_different_inputs_give_a_new_key_and_compute(tmp_path):
    cache = StageCache(tmp_path)
    compute = Compute()
    a = run(cache, "select", INPUTS, compute)
    b = run(cache, "select", {**INPUTS, "budget": 0.3}, compute)
    c = run(cache, "select", {**INPUTS, "model": {"depth": 28, "width": 4}}, compute)
    d = run(cache, "pseudo_label", INPUTS, compute)  # same inputs, another stage
    assert compute.calls == 4
    assert len({a.key, b.key, c.key}) == 3
    assert len({a.path, b.path, c.path, d.path}) == 4
    assert not any(r.cached for r in (a, b, c, d))


def test_key_is_the_same_for_dict_and_dictconfig():
    """Equal values hash alike whether given as plain containers or as OmegaConf nodes, in any key order."""
    plain = {"dataset": {"name": "digits", "augment": {"crop": 2, "flip": True}}, "seeds": [1, 2], "budget": 0.2}
    conf = OmegaConf.create({"dataset": {"augment": {"flip": True, "crop": 2}, "name": "digits"}, "seeds": [1, 2],
                             "budget": 0.2})
    paths = ["dataset", "seeds", "budget"]
    assert stage_key("embed", 1, values_at(conf, paths), {}) == key_of("embed", plain)
    assert key_of("embed", plain) != key_of("select", plain)
    assert stage_key("embed", 1, values_at(conf, paths), {}) != stage_key("embed", 2, values_at(conf, paths), {})
    changed = {**plain, "dataset": {"name": "digits", "augment": {"crop": 4, "flip": True}}}
    assert key_of("embed", plain) != key_of("embed", changed)


def test_key_resolves_interpolations_and_leaves_out_locations():
    """A config is hashed by its resolved values; where the data set and the cache live is in no key."""
    conf = OmegaConf.create({"base": 3, "model": {"width": "${base}"}, "dataset": {"name": "d", "root": "/a"},
                             "cache_dir": "/x"})
    moved = OmegaConf.create({"base": 3, "model": {"width": 3}, "dataset": {"name": "d", "root": "/b"},
                              "cache_dir": "/y"})
    paths = ["model", "dataset", "cache_dir"]
    assert values_at(conf, paths) == values_at(moved, paths) == {"model": {"width": 3}, "dataset": {"name": "d"}}


def test_failed_compute_leaves_only_a_partial_folder_and_resumes(tmp_path):
    """A compute that raises leaves <key>.partial (never <key>); a later run finishes it and sees its files."""
    cache = StageCache(tmp_path)
    key = key_of("ssat", INPUTS)

    def crash(out):
        (out / "checkpoint.pt").write_text("epoch 3")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run(cache, "ssat", INPUTS, crash)
    stage_dir = tmp_path / "ssat"
    assert sorted(p.name for p in stage_dir.iterdir()) == [f"{key}.lock", f"{key}.partial"]
    assert not (stage_dir / key).exists()
    assert not (stage_dir / f"{key}.partial" / RECORD).exists()

    seen = {}

    def resume(out):
        seen["checkpoint"] = (out / "checkpoint.pt").read_text()
        return {"resumed_from": seen["checkpoint"]}

    result = run(cache, "ssat", INPUTS, resume)
    assert not result.cached
    assert seen["checkpoint"] == "epoch 3"
    assert result.info == {"resumed_from": "epoch 3"}
    assert sorted(p.name for p in stage_dir.iterdir()) == [key, f"{key}.lock"]
    assert (stage_dir / key / "checkpoint.pt").read_text() == "epoch 3"
    assert run(cache, "ssat", INPUTS, crash).cached  # complete now: the crashing compute is not called


def test_write_json_atomic_leaves_no_temp_file(tmp_path):
    target = tmp_path / "record.json"
    write_json_atomic(target, {"b": [1, 2], "a": 1.5})
    write_json_atomic(target, {"b": [3], "a": 2.5})  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
    assert json.loads(target.read_text()) == {"b": [3], "a": 2.5}


# A second process that runs one stage whose compute announces itself, then waits for the test's go-ahead.
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ssat.cache import StageCache
    root, started, release = map(Path, sys.argv[1:4])

    def compute(out):
        (out / "partial.txt").write_text("from the first job")
        started.touch()
        while not release.exists():
            time.sleep(0.05)
        return {"computed_by": "holder"}

    StageCache(root).run("embed", "0123456789abcdef", {"seed": 0}, compute)
""")


def start_holder(tmp_path):
    """A real second process inside the stage's compute (it holds the stage's lock) when this returns."""
    started, release = tmp_path / "started", tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "cache"), str(started), str(release)],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    while not started.exists():
        assert proc.poll() is None, "the holder process died before computing"
        time.sleep(0.05)
    return proc, release


def run_in_thread(cache, compute):
    out = {}
    thread = threading.Thread(
        target=lambda: out.setdefault("result", cache.run("embed", "0123456789abcdef", {"seed": 0}, compute)))
    thread.start()
    return thread, out


def test_second_job_waits_for_the_first_and_reuses_its_result(tmp_path):
    """While another process computes a stage, run() blocks on its lock, then returns the committed result."""
    proc, release = start_holder(tmp_path)
    compute = Compute({"computed_by": "waiter"})
    thread, out = run_in_thread(StageCache(tmp_path / "cache"), compute)
    thread.join(timeout=1.0)
    assert thread.is_alive() and "result" not in out  # blocked on the lock, not computing
    release.touch()
    thread.join(timeout=60)
    assert proc.wait(timeout=60) == 0
    result = out["result"]
    assert compute.calls == 0
    assert result.cached and result.info == {"computed_by": "holder"}
    assert (result.path / "partial.txt").read_text() == "from the first job"


def test_lock_of_a_killed_job_does_not_block_and_its_partial_work_resumes(tmp_path):
    """A job killed inside a stage (SIGKILL: no clean-up runs) leaves no lock behind: the kernel drops it."""
    proc, _ = start_holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    seen = {}

    def resume(out):
        seen["partial"] = (out / "partial.txt").read_text()
        return {"computed_by": "second"}

    thread, out = run_in_thread(StageCache(tmp_path / "cache"), resume)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert not out["result"].cached and out["result"].info == {"computed_by": "second"}
    assert seen["partial"] == "from the first job"
