"""Runs that survive faults: kill -9 and resume, a diverging loss, outputs that cannot be written."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_ssat
from ssat.attacks import TradesLoss
from ssat.data.datasets import load_digits
from ssat.data.sampler import SSATBatchSampler
from ssat.data.training_set import LabeledAndSelected
from ssat.errors import TrainingDiverged
from ssat.lightning.trainer import build_trainer
from ssat.models import SmallCNN
from ssat.stages.training import fit

EPOCHS, BATCHES = 8, 5
SHORT_SSAT = [f"ssat.epochs={EPOCHS}", f"ssat.batches_per_epoch={BATCHES}"]


def committed(cache: Path, stage: str) -> list[Path]:
    return [p for p in (cache / stage).glob("*") if (p / "record.json").exists()]


def test_kill_9_mid_ssat_then_rerun_resumes_to_the_same_final_epoch(tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    args = [sys.executable, "-m", "ssat.run", *FAST, *SHORT_SSAT, f"hydra.run.dir={run_dir}", f"cache_dir={cache}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not list(cache.glob("ssat/*.partial/checkpoints/last.ckpt")):
            assert proc.poll() is None, "the run ended before SSAT wrote its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed mid-SSAT"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not committed(cache, "ssat") and not committed(cache, "evaluate")
    (last,) = cache.glob("ssat/*.partial/checkpoints/last.ckpt")
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    assert killed_at < EPOCHS - 1

    rerun = run_ssat(*SHORT_SSAT, run_dir=run_dir, cache_dir=cache)
    out = rerun.proc.stdout + rerun.proc.stderr
    assert "Restoring states from the checkpoint" in out
    results = rerun.results
    assert results["cached"] == {
        "intermediate": True, "embed": True, "select": True, "pseudo_label": True, "ssat": False, "evaluate": False}
    # As an uninterrupted run: all the epochs, every epoch's batches, each optimizer step once.
    assert results["ssat_epochs"] == EPOCHS
    (final,) = committed(cache, "ssat")
    ckpt = torch.load(final / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == EPOCHS - 1
    assert ckpt["global_step"] == EPOCHS * BATCHES
    assert "lr_schedulers" in ckpt and "optimizer_states" in ckpt


class DivergeAt:
    """TRADES whose loss turns NaN from the given optimizer step on (fault injection for the NaN guard)."""

    def __init__(self, step: int):
        self.loss = TradesLoss(eps=0.1, alpha=0.05, steps=1)
        self.step, self.calls = step, 0

    def __call__(self, model, x, y):
        loss, logs = self.loss(model, x, y)
        self.calls += 1
        return (loss * float("nan") if self.calls > self.step else loss), logs


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    digits = load_digits()
    images, labels = digits.train_images[:256], digits.train_labels[:256]
    train_set = LabeledAndSelected(images, labels)
    sampler = SSATBatchSampler(len(labels), 0, 64, 0.0, seed=0)  # 4 batches an epoch
    model = SmallCNN(1, 10, [0.3], [0.4], width=8)

    def make_trainer(stage, out_dir, max_epochs, callbacks, batches_per_epoch):
        return build_trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=callbacks, logger=False,
                             default_root_dir=str(out_dir), enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, inference_mode=False, use_distributed_sampler=False)

    with pytest.raises(TrainingDiverged) as info:
        fit(model, DivergeAt(step=9), train_set, sampler, images[:64], labels[:64], tmp_path, make_trainer, "ssat",
            epochs=5, optim={"lr": 0.01}, augment={}, eval_batch_size=64, val_pgd=None)
    message = str(info.value)
    assert "\n" not in message
    assert "the training loss became nan at epoch 2, batch 1" in message
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"the last good checkpoint is kept: {last}" in message
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 8  # the end of the last finished epoch
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "model.pt").exists()


def test_diverging_run_ends_with_one_line_and_exit_code_1(tmp_path):
    run = run_ssat("intermediate.epochs=1", "intermediate.optim.lr=1e12", run_dir=tmp_path / "run",
                   cache_dir=tmp_path / "cache", check=False)
    assert run.proc.returncode == 1  # it failed during work; 2 is bad input found before any
    (line,) = [x for x in run.proc.stderr.splitlines() if x.startswith("ssat: error:")]
    assert "intermediate: the training loss became" in line and "lower the learning rate" in line
    assert "Traceback" not in run.proc.stderr
    assert not committed(tmp_path / "cache", "intermediate")


@pytest.mark.parametrize("key", ["cache_dir", "hydra.run.dir"])
def test_output_under_a_regular_file_fails_before_any_work(tmp_path, key):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    dirs = {"cache_dir": tmp_path / "cache", "hydra.run.dir": tmp_path / "run", key: blocker / "out"}
    run = run_ssat(run_dir=dirs["hydra.run.dir"], cache_dir=dirs["cache_dir"], check=False)
    assert run.proc.returncode == 2, run.proc.stderr[-2000:]
    (line,) = [x for x in run.proc.stderr.splitlines() if x.startswith("ssat: error:")]
    assert key in line and str(blocker) in line
    assert "Traceback" not in run.proc.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("record.json"))


def test_full_disk_fails_with_a_message_and_commits_nothing(tmp_path):
    """A file-size limit (what `ulimit -f` sets) makes the first large write fail as a full disk would: the
    intermediate model's first checkpoint. Nothing is committed, and no half-written checkpoint is left."""
    cache = tmp_path / "cache"

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    args = [sys.executable, "-m", "ssat.run", *FAST, "intermediate.epochs=2", f"hydra.run.dir={tmp_path / 'run'}",
            f"cache_dir={cache}"]
    proc = subprocess.run(args, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]  # a failure during work, not bad input
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("ssat: error:")]
    assert "stage intermediate could not write" in line and "File too large" in line
    assert "Traceback" not in proc.stderr
    assert not any(cache.rglob("record.json"))
    partial = [p.name for p in cache.glob("intermediate/*.partial")]
    # the unfinished work and the stage's lock file (kept for the next job), nothing that looks committed
    assert partial and sorted(p.name for p in (cache / "intermediate").iterdir()) == sorted(
        [*partial, partial[0].replace(".partial", ".lock")])
    assert not any(cache.rglob("*.ckpt")) and not any(cache.rglob(".*.tmp-*"))
