"""experiments/gpu_check.sh, the one command that checks the GPU path, run here on the CPU at its --tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_archive import cifar_archive

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "gpu_check.sh"


@pytest.mark.slow
def test_gpu_check_runs_every_part_on_the_cpu_and_prints_one_json():
    cifar_archive()  # skips where the shared CIFAR-10 archive is missing
    proc = subprocess.run(["bash", str(SCRIPT), "--tiny"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-5000:]
    (line,) = proc.stdout.splitlines()  # one JSON, nothing else on stdout
    report = json.loads(line)
    assert report["failed"] == [] and report["tiny"]
    training = report["training"]
    assert training["precision"] == "bf16-mixed" and training["attack"] == "trades-1"
    assert training["lightning_images_per_s"] > 0 and training["plain_images_per_s"] > 0
    assert len(training["rounds"]) == 1 and set(training["rounds"][0]) == {"lightning", "plain"}
    assert report["kmeans"]["backend"].startswith("faiss on ") and report["kmeans"]["inertia"] > 0
    assert report["gmm"]["covariance"] == "full" and 1 <= report["gmm"]["iterations"] <= 3
    assert report["kmeans"]["rows"] == report["gmm"]["rows"] == 4000
    stages = report["stages"]
    assert "experiment=cifar10_paper" in stages["command"]
    assert set(stages["stage_seconds"]) == {"intermediate", "embed", "select", "pseudo_label", "ssat", "evaluate"}
    assert stages["sizes"]["pool"] == 40 and stages["sizes"]["test"] == 4
