"""Runs that survive faults: kill -9 and resume, a diverging loss, outputs that cannot be written."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import FAST, run_ssat
from forked import DEVNULL, STDOUT, popen_module
from ssat.attacks import TradesLoss
from ssat.data.datasets import load_digits
from ssat.data.sampler import SSATBatchSampler
from ssat.data.training_set import LabeledAndSelected
from ssat.errors import TrainingDiverged
from ssat.lightning.trainer import build_trainer
from ssat.models import SmallCNN
from ssat.stages.training import FitSettings, TrainingJob, fit

EPOCHS, BATCHES = 4, 3
# A short run before SSAT and a small evaluation after it: the kill lands in SSAT's epochs.
SHORT_SSAT = ["intermediate.epochs=2", "eval.pgd.steps=2", "eval.val_pgd.steps=1", "test_size=60",
              "eval.sanity.num_points=20", "eval.sanity.noise_samples=1", f"ssat.epochs={EPOCHS}",
              f"ssat.batches_per_epoch={BATCHES}"]


def committed(cache: Path, stage: str) -> list[Path]:
    return [p for p in (cache / stage).glob("*") if (p / "record.json").exists()]


def fit_digits(out_dir: Path, loader: dict, stop_at: int | None = None) -> dict:
    """4 epochs of TRADES with augmentation, validation PGD and an EMA on 256 digits, seeded as a stage is;
    ``stop_at``: the attempt raises at that epoch's start, leaving last.ckpt of the epoch before, as a kill would."""
    digits = load_digits()
    images, labels = digits.train_images[:256], digits.train_labels[:256]
    L.seed_everything(3, verbose=False)
    model = SmallCNN(1, 10, [0.3], [0.4], width=8)

    class StopAt(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == stop_at:
                raise RuntimeError("stopped")

    def make_trainer(stage, out_dir, max_epochs, callbacks, batches_per_epoch):
        return build_trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=[*callbacks, StopAt()],
                             logger=False, default_root_dir=str(out_dir), enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, inference_mode=False,
                             use_distributed_sampler=False)

    sampler = SSATBatchSampler(len(labels), 0, 64, 0.0, seed=5)
    job = TrainingJob("ssat", model, TradesLoss(eps=0.1, alpha=0.05, steps=2), LabeledAndSelected(images, labels),
                      sampler, images[:64], labels[:64], out_dir, make_trainer)
    return fit(job, FitSettings(epochs=4, optim={"lr": 0.05, "schedule": "cosine"}, augment={"crop_padding": 1},
                                eval_batch_size=64, val_pgd={"eps": 0.1, "alpha": 0.05, "steps": 2, "random_start": True},
                                loader=loader, ema={"decay": 0.9, "warmup": 2}))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fit_resumed_from_last_ckpt_ends_with_the_uninterrupted_weights_bit_for_bit(tmp_path, num_workers):
    """Augmentation, TRADES' random start and the validation PGD draw from the global RNGs; the resumed attempt
    must draw what the uninterrupted one drew (with loader workers too, which start at other points)."""
    loader = {"num_workers": num_workers}
    whole = fit_digits(tmp_path / "whole", loader)
    with pytest.raises(RuntimeError, match="stopped"):
        fit_digits(tmp_path / "resumed", loader, stop_at=2)
    resumed = fit_digits(tmp_path / "resumed", loader)
    assert resumed == whole
    expected, got = (torch.load(tmp_path / run / "model.pt") for run in ("whole", "resumed"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_kill_9_mid_ssat_then_rerun_resumes_to_the_same_final_epoch(tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    proc = popen_module("ssat.run", [*SHORT_SSAT, f"hydra.run.dir={run_dir}", f"cache_dir={cache}"], stdout=DEVNULL,
                        stderr=DEVNULL)
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

    rerun = run_ssat(*SHORT_SSAT, run_dir=run_dir, cache_dir=cache, fast=False)
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
        fit(TrainingJob("ssat", model, DivergeAt(step=9), train_set, sampler, images[:64], labels[:64], tmp_path,
                        make_trainer), FitSettings(epochs=5, optim={"lr": 0.01}, augment={}, eval_batch_size=64))
    message = str(info.value)
    assert "\n" not in message
    assert "the training loss became nan at epoch 2, batch 1" in message
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"the last good checkpoint is kept: {last}" in message
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 8  # the end of the last finished epoch
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.slow
def test_diverging_run_ends_with_one_line_and_exit_code_1(tmp_path):
    run = run_ssat("intermediate.epochs=1", "intermediate.optim.lr=1e12", run_dir=tmp_path / "run",
                   cache_dir=tmp_path / "cache", check=False)
    assert run.proc.returncode == 1  # it failed during work; 2 is bad input found before any
    (line,) = [x for x in run.proc.stderr.splitlines() if x.startswith("ssat: error:")]
    assert "intermediate: the training loss became" in line and "lower the learning rate" in line
    assert "Traceback" not in run.proc.stderr
    assert not committed(tmp_path / "cache", "intermediate")


@pytest.mark.slow
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


@pytest.mark.slow
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


# --- kill anywhere: SIGKILL in every stage, then the same command: the uninterrupted run's results, bit for bit

# Three epochs of each training stage (a kill, a resume and a kill in a later epoch, then the rest), three chunks of
# evaluation (the kill after the first), a small sanity check.
SHORT = ["intermediate.epochs=3", "ssat.epochs=3", "ssat.batches_per_epoch=2", "eval.pgd.steps=3",
         "eval.val_pgd.steps=1", "seed=7", "test_size=120", "eval.chunk_size=40", "eval.sanity.num_points=40",
         "eval.sanity.noise_samples=2"]
TINY_GENERATION = ["selector=lcg_km", "generation.pretrain.epochs=3", "generation.finetune.epochs=2",
                   "generation.num_images=64", "generation.sampler.num_inference_steps=4",
                   "generation.sampler.batch_size=16", "ssat.epochs=2"]
TRAINING = ("intermediate", "ssat", "ddpm_pretrain", "ddpm_finetune")
CHECKPOINT = "checkpoints/last.ckpt"
# (overrides, where each attempt is killed: a stage and the file in its unfinished folder whose writing by that
# attempt triggers the kill); then the same command runs once more to the end. A training stage's checkpoint
# puts the kill in a later epoch (after a resume, the second time), its unet/ after its last epoch.
CHAINS = {
    # the default pipeline (lcs_km) with an EMA; SSAT killed twice in a row
    "selection": ([*SHORT, "ssat.ema.decay=0.9"],
                  [("intermediate", CHECKPOINT), ("embed", "progress.json"), ("select", "selection.npy"),
                   ("pseudo_label", "pseudo_labels.npy"), ("ssat", CHECKPOINT), ("ssat", CHECKPOINT),
                   ("evaluate", "flags/pgd/*.npy")]),
    "generation": ([*SHORT, *TINY_GENERATION],
                   [("ddpm_pretrain", CHECKPOINT), ("ddpm_finetune", "unet/*"), ("sample", "progress.json")]),
}
# Held between the stage's work and its commit (SSAT_TEST_STAGE_DELAY), so that a kill after the work of a stage
# of milliseconds still lands before the commit.
HOLD_S = 30
# What differs between two runs of one command: how long stages took, where they live, which came from the cache.
VOLATILE = {"cached", "timings", "total_seconds", "wall_seconds", "selection_seconds", "stage_dirs"}


def outcome(run_dir: Path) -> dict:
    """results.json less its timings and paths, every stage's record (epochs, steps, probes...) less where a
    resumed stage picked up, and a hash of every array and weight file that every stage wrote (the selection,
    features, flags, samples, model.pt of the classifiers and the DDPMs' safetensors)."""
    results = json.loads((run_dir / "results.json").read_text())
    stages = {stage: Path(folder) for stage, folder in results["stage_dirs"].items()}
    records = {stage: json.loads((folder / "record.json").read_text())["info"] for stage, folder in stages.items()}
    files = {f"{stage}/{path.relative_to(folder)}": hashlib.sha256(path.read_bytes()).hexdigest()
             for stage, folder in stages.items() for path in sorted(folder.rglob("*"))
             if path.suffix in (".npy", ".pt", ".safetensors")}
    return {"results": {k: v for k, v in results.items() if k not in VOLATILE},
            "records": {stage: {k: v for k, v in info.items() if k != "resumed_at"} for stage, info in records.items()},
            "files": files}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The outcome of each chain's command run once without a kill, in its own cache."""
    outcomes = {}

    def of(chain: str) -> dict:
        if chain not in outcomes:
            root = tmp_path_factory.mktemp(f"uninterrupted_{chain}")
            run = run_ssat(*CHAINS[chain][0], run_dir=root / "run", cache_dir=root / "cache", fast=False)
            outcomes[chain] = outcome(run.run_dir)
        return outcomes[chain]

    return of


def written_since(pattern: str, cache: Path, since: float) -> bool:
    for path in cache.glob(pattern):
        try:
            if path.stat().st_mtime >= since:
                return True
        except FileNotFoundError:  # replaced between glob and stat: a newer one is there
            return True
    return False


def kill_in(stage: str, trigger: str, overrides: list[str], cache: Path, run_dir: Path, log: Path) -> None:
    """Runs the command and kills it with SIGKILL inside ``stage`` once this attempt has written ``trigger`` there;
    the stage stays uncommitted."""
    args = [*overrides, f"hydra.run.dir={run_dir}", f"cache_dir={cache}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SSAT_TEST_STAGE_DELAY": f"{stage}:{HOLD_S}"}
    started = time.time()
    log.write_text("")
    proc = popen_module("ssat.run", args, env=env, stdout=log, stderr=STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not written_since(f"{stage}/*.partial/{trigger}", cache, started):
            assert proc.poll() is None, f"the run ended before {stage}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert not committed(cache, stage), f"{stage} was committed before the kill"


@pytest.mark.slow
@pytest.mark.parametrize("chain", CHAINS)
def test_kill_9_in_every_stage_then_rerun_gives_the_uninterrupted_results_bit_for_bit(tmp_path, uninterrupted,
                                                                                       chain):
    overrides, kills = CHAINS[chain]
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    logs = [tmp_path / f"attempt{i}.log" for i in range(len(kills))]
    for (stage, trigger), log in zip(kills, logs):
        kill_in(stage, trigger, overrides, cache, run_dir, log)
    rerun = run_ssat(*overrides, run_dir=run_dir, cache_dir=cache, fast=False)
    later_output = [log.read_text() for log in logs[1:]] + [rerun.proc.stdout + rerun.proc.stderr]
    for (stage, _), output in zip(kills, later_output):
        if stage in TRAINING:  # the next attempt resumed the killed training stage, not started it again
            assert f"Restoring states from the checkpoint path at {cache.resolve()}/{stage}/" in output
    got, expected = outcome(run_dir), uninterrupted(chain)
    for part in ("results", "records", "files"):  # results first: the readable difference
        assert got[part] == expected[part], part
