"""A committed stage whose files no longer match its record (truncated, bit-flipped, missing, unreadable record) is
moved aside with a one-line warning and computed again; every artifact type of the pipeline is corrupted in turn."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from conftest import run_in_process
from ssat.cache import RECORD, StageCache

GENERATION_FAST = ["generation.pretrain.epochs=2", "generation.finetune.epochs=1", "generation.num_images=64",
                   "generation.sampler.num_inference_steps=4"]


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


class Writes:
    def __init__(self):
        self.calls = 0

    def __call__(self, out: Path):
        self.calls += 1
        (out / "sub").mkdir()
        (out / "sub" / "data.bin").write_bytes(bytes(range(256)) * 64)
        return {"calls": self.calls}


@pytest.mark.parametrize("damage", [
    ("truncated", lambda folder: truncate(folder / "sub" / "data.bin"), "has 8192 bytes, 16384 were written"),
    ("bit flip", lambda folder: flip_a_bit(folder / "sub" / "data.bin"), "has changed since it was written"),
    ("missing", lambda folder: (folder / "sub" / "data.bin").unlink(), "sub/data.bin is missing"),
    ("record", lambda folder: (folder / RECORD).write_text("{\"stage\": "), "record.json is unreadable"),
], ids=lambda d: d[0])
def test_a_corrupt_stage_is_moved_aside_and_computed_again(tmp_path, caplog, damage):
    _, corrupt, problem = damage
    cache, compute = StageCache(tmp_path), Writes()
    first = cache.run("embed", "0123456789abcdef", {"seed": 0}, compute)
    assert json.loads((first.path / RECORD).read_text())["files"]["sub/data.bin"][0] == 16384
    assert cache.run("embed", "0123456789abcdef", {"seed": 0}, compute).cached  # intact: reused, nothing recomputed
    corrupt(first.path)
    with caplog.at_level(logging.WARNING, logger="ssat"):
        again = cache.run("embed", "0123456789abcdef", {"seed": 0}, compute)
    assert not again.cached and compute.calls == 2 and again.info == {"calls": 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert str(first.path) in warnings[0] and problem in warnings[0] and "computing stage embed again" in warnings[0]
    aside = [p for p in (tmp_path / "embed").iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].name in warnings[0]
    assert cache.run("embed", "0123456789abcdef", {"seed": 0}, compute).cached  # the recomputed stage is whole again


def test_a_stage_corrupted_twice_in_one_second_by_one_process_is_moved_aside_twice(tmp_path, monkeypatch):
    """The aside folder's name holds the time to the second and the pid: a second one gets a suffix."""
    import ssat.cache

    monkeypatch.setattr(ssat.cache.time, "strftime", lambda fmt: "20261202-120000")
    cache, compute = StageCache(tmp_path), Writes()
    for _ in range(2):
        first = cache.run("embed", "0123456789abcdef", {"seed": 0}, compute)
        flip_a_bit(first.path / "sub" / "data.bin")
    assert not cache.run("embed", "0123456789abcdef", {"seed": 0}, compute).cached
    aside = [p.name for p in (tmp_path / "embed").iterdir() if ".corrupt-" in p.name]
    assert sorted(aside) == ["0123456789abcdef.corrupt-20261202-120000-" + str(os.getpid()) + suffix
                             for suffix in ("", "-1")] and compute.calls == 3


# Per stage of the pipeline: a file it wrote and how it is damaged (each artifact type in turn).
ARTIFACTS = [
    ("intermediate", "model.pt", flip_a_bit),
    ("intermediate", "checkpoints/last.ckpt", truncate),
    ("embed", "features.npy", truncate),
    ("embed", "logits.npy", flip_a_bit),
    ("select", "selection.npy", flip_a_bit),
    ("pseudo_label", "pseudo_labels.npy", truncate),
    ("ssat", "model.pt", truncate),
    ("evaluate", "flags/pgd/000000000-000000060.npy", flip_a_bit),  # TINY: 60 test points
]
SAME = ("selection_sha256", "clean_acc", "robust_acc", "pseudo_label_acc", "intermediate_val_acc", "ssat_epochs")


def test_every_corrupt_pipeline_artifact_is_reported_and_recomputed_to_the_same_result(tmp_path, caplog):
    """In process on the tiny schedule, one cache: each run after the first finds one damaged file."""
    baseline = run_in_process(tmp_path=tmp_path / "baseline")
    for i, (stage, file, corrupt) in enumerate(ARTIFACTS):
        corrupt(Path(baseline["stage_dirs"][stage]) / file)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ssat"):
            results = run_in_process(tmp_path=tmp_path / f"run{i}", cache_dir=tmp_path / "baseline" / "cache")
        lines = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
        assert len(lines) == 1 and f"{stage}/{baseline['stage_keys'][stage]}" in lines[0] and file in lines[0], lines
        assert [name for name, cached in results["cached"].items() if not cached] == [stage]
        assert {k: results[k] for k in SAME} == {k: baseline[k] for k in SAME}, (stage, file)


def test_a_corrupt_generated_pool_is_recomputed(tmp_path, caplog):
    cache = tmp_path / "cache"
    baseline = run_in_process("selector=lcg_km", *GENERATION_FAST, tmp_path=tmp_path / "baseline", cache_dir=cache)
    truncate(Path(baseline["stage_dirs"]["sample"]) / "images.npy")
    with caplog.at_level(logging.WARNING, logger="ssat"):
        results = run_in_process("selector=lcg_km", *GENERATION_FAST, tmp_path=tmp_path / "again", cache_dir=cache)
    assert any("images.npy has" in r.getMessage() for r in caplog.records)
    assert [name for name, cached in results["cached"].items() if not cached] == ["sample"]
    assert {k: results[k] for k in SAME} == {k: baseline[k] for k in SAME}
