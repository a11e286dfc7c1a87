"""Progress off a terminal (a SLURM log, CI, ``> run.log``): a line per epoch with the metrics and one every
INTERVAL seconds within a long epoch instead of a bar redrawn at every batch; the live bars on a terminal."""

from __future__ import annotations

import io
import logging
import os
import re
import sys

import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from conftest import FAST
from forked import STDOUT, popen_module
from ssat.attacks import CrossEntropyLoss
from ssat.lightning import RobustClassifierModule
from ssat.lightning.progress import LineProgressBar
from ssat.lightning.trainer import build_trainer
from ssat.models import SmallCNN
from ssat.progress import ProgressLines, progress

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeClock:
    """Seconds that pass only when the test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TickingLoss:
    """Cross-entropy whose every training step takes ``seconds`` of the fake clock."""

    def __init__(self, clock: FakeClock, seconds: float):
        self.clock, self.seconds, self.loss = clock, seconds, CrossEntropyLoss()

    def __call__(self, model, x, y):
        self.clock.now += self.seconds
        return self.loss(model, x, y)


def ssat_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ssat"]


def test_one_line_per_epoch_with_the_metrics_and_one_per_interval_within_it(tmp_path, caplog):
    """Ten 15-second batches an epoch with a 30 s interval: lines after batches 2, 4, 6 and 8, then (not after batch
    10, the epoch's last) the epoch's line with the training and validation metrics; nothing else."""
    clock = FakeClock()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (80, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (80,))
    train = DataLoader(TensorDataset(images, labels), batch_size=8)
    val = DataLoader(TensorDataset(images[:16].float() / 255, labels[:16]), batch_size=8)
    module = RobustClassifierModule(SmallCNN(1, 10, [0.3], [0.4], width=8), TickingLoss(clock, 15.0),
                                    {"lr": 0.01}, epochs=2)
    trainer = build_trainer(accelerator="cpu", devices=1, max_epochs=2, callbacks=[LineProgressBar(30.0, clock)],
                            logger=CSVLogger(str(tmp_path), name="intermediate"), enable_checkpointing=False,
                            enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    assert isinstance(trainer.progress_bar_callback, LineProgressBar)
    with caplog.at_level(logging.INFO, logger="ssat"):
        trainer.fit(module, train, val)
    lines = ssat_lines(caplog)
    expected = []
    for epoch in (1, 2):
        expected += [f"intermediate epoch {epoch}/2, batch {b}/10, {15 * b:.1f} s" for b in (2, 4, 6, 8)]
        expected.append(f"intermediate epoch {epoch}/2, 10 batches, 150.0 s")
    assert [line.split(":")[0] for line in lines] == expected
    for line in lines:
        assert re.search(r"train/loss=\d", line), line
        assert "v_num" not in line
    assert "val/acc=" in lines[4] and "val/acc=" in lines[9], "the epoch's line carries the validation metrics"


def test_build_trainer_keeps_the_live_bar_on_a_terminal_and_writes_lines_elsewhere(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    def bar(**options):
        return build_trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                             default_root_dir=str(tmp_path), **options).progress_bar_callback

    monkeypatch.setattr(sys, "stdout", Terminal())
    assert isinstance(bar(), TQDMProgressBar)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert isinstance(bar(), LineProgressBar)
    assert bar(enable_progress_bar=False) is None


def test_progress_lines_write_at_most_one_line_per_interval_and_one_at_the_end(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="ssat"):
        with ProgressLines(1000, "embed", "img", initial=100, interval=30.0, clock=clock) as bar:
            for _ in range(9):  # 100 images every 10 s
                clock.now += 10.0
                bar.update(100)
    assert ssat_lines(caplog) == ["embed: 400/1000 img, 30.0 s (10 img/s)",
                                  "embed: 700/1000 img, 60.0 s (10 img/s)",
                                  "embed: 1000/1000 img, 90.0 s (10 img/s)"]


def test_progress_is_a_live_bar_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    with progress(3, "x", "img", stream=Terminal()) as bar:
        assert not isinstance(bar, ProgressLines)
    with progress(3, "x", "img", stream=io.StringIO()) as bar:
        assert isinstance(bar, ProgressLines)


@pytest.mark.slow
def test_a_run_logged_to_a_file_writes_a_line_per_epoch_not_a_bar_per_batch(tmp_path):
    """`python -m ssat.run > run.log 2>&1` (as SLURM writes a job's output): no carriage returns, one line per
    epoch of each training stage carrying its metrics, and the whole log within the 200 lines of the default run's
    target."""
    log_file = tmp_path / "run.log"
    log_file.write_text("")
    proc = popen_module("ssat.run", [*FAST, f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"],
                        stdout=log_file, stderr=STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc.wait(timeout=900)
    text = log_file.read_bytes().decode()  # read_text() would turn the bars' carriage returns into line ends
    assert proc.returncode == 0, text[-5000:]
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) <= 200, f"{len(lines)} lines"
    for stage, epochs in (("intermediate", 10), ("ssat", 6)):
        epoch_lines = [line for line in lines if re.search(rf"\] - {stage} epoch \d+/{epochs}, \d+ batches", line)]
        assert len(epoch_lines) == epochs, "\n".join(epoch_lines)
        assert all("train/loss=" in line and "val/acc=" in line for line in epoch_lines)
    assert "val/robust_acc=" in epoch_lines[-1]
    assert any(re.search(r"\] - embed: \d+/\d+ img", line) for line in lines)
