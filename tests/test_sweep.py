"""Sweeps: concurrent jobs sharing one cache, a W&B run per job (offline), and the report's table and plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import SHORT
from forked import PIPE, STDOUT, popen_module, run_module

pytestmark = pytest.mark.slow  # real ssat.run processes (see pyproject's markers)

wandb_records = pytest.importorskip("wandb_records", reason="wandb is not installed (pip install -e '.[wandb]')")


def start(*overrides: str, cwd: Path, cache_dir: Path, env: dict | None = None):
    flags = [o for o in overrides if o.startswith("-")]
    overrides = [o for o in overrides if not o.startswith("-")]
    return popen_module("ssat.run", [*flags, *SHORT, *overrides, f"cache_dir={cache_dir}"], cwd=cwd, stdout=PIPE,
                        stderr=STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def finish(*procs) -> list[str]:
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, f"ssat.run failed ({proc.returncode}):\n{log[-5000:]}"
    return logs


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweep")


@pytest.fixture(scope="module")
def concurrent(root):
    """Two jobs started together (default run directories) against one empty cache, as a sweep's jobs start."""
    procs = [start("selector=lcs_km", f"budget={b}", cwd=root, cache_dir=root / "cache") for b in (0.1, 0.2)]
    logs = finish(*procs)
    return [json.loads(p.read_text()) for p in sorted((root / "outputs").glob("*/*/results.json"))], logs


def test_concurrent_jobs_get_their_own_run_dirs_and_compute_shared_stages_once(root, concurrent):
    results, logs = concurrent
    assert len(results) == 2 and {r["budget"] for r in results} == {0.1, 0.2}
    for stage in ("intermediate", "embed"):
        assert sorted(r["cached"][stage] for r in results) == [False, True], stage  # one computed, one reused
        assert results[0]["stage_keys"][stage] == results[1]["stage_keys"][stage]
        committed = [p for p in (root / "cache" / stage).iterdir() if p.is_dir()]
        assert [p.name for p in committed] == [results[0]["stage_keys"][stage]]  # no .partial left behind
    for stage in ("select", "ssat"):
        assert not any(r["cached"][stage] for r in results)


@pytest.fixture(scope="module")
def wandb_sweep(root, concurrent, tmp_path_factory):
    """A two-job multirun with logger=wandb, no API key and no WANDB_MODE: offline, one W&B run per job."""
    sweep = root / "wandb_sweep"
    home = tmp_path_factory.mktemp("home")  # no ~/.netrc with a W&B key
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = popen_module("ssat.run", ["-m", *SHORT, "logger=wandb", "selector=random", "budget=0.3,0.4",
                                     f"cache_dir={root / 'cache'}", f"hydra.sweep.dir={sweep}"],
                        cwd=root, stdout=PIPE, stderr=STDOUT, env={**env, "HOME": str(home), "PYTHONUNBUFFERED": "1"})
    finish(proc)
    return sweep


def test_wandb_multirun_gives_one_offline_run_per_job(wandb_sweep):
    job_dirs = sorted(p.parent for p in wandb_sweep.glob("*/results.json"))
    assert [d.name for d in job_dirs] == ["0_random_0.3", "1_random_0.4"]
    runs = []
    for job_dir in job_dirs:
        (run_dir,) = (job_dir / "wandb").glob("offline-run-*")  # offline, and exactly one run per job
        run = wandb_records.OfflineRun(run_dir)
        results = json.loads((job_dir / "results.json").read_text())
        assert run.exit_code == 0
        assert run.run.run_group == f"{wandb_sweep.parent.name}/{wandb_sweep.name}"
        assert run.run.job_type == "pipeline"
        assert f"budget={results['budget']}" in run.run.display_name and "selector=random" in run.run.display_name
        assert run.config["budget"] == results["budget"] and run.config["selector"]["name"] == "random"
        # The SSAT stage trained in this job: its curves under its own prefix, against its own step.
        curves = [row for row in run.history if "ssat/train/loss" in row]
        assert curves and all("ssat/step" in row for row in curves)
        assert any("ssat/val/robust_acc" in row for row in run.history)
        assert not any(key.startswith("intermediate/train") for row in run.history for key in row)  # cached here
        # Every stage's record, cached or not, under its prefix.
        assert run.summary["evaluate/robust_acc"] == results["robust_acc"]
        assert run.summary["intermediate/cached"] is True and run.summary["ssat/cached"] is False
        assert run.summary["select/selected"] == results["n_selected"]
        # One results artifact (the job's files); the sanity table is W&B's own run_table artifact.
        assert sorted(a.type for a in run.artifacts) == ["results", "run_table"]
        (artifact,) = [a for a in run.artifacts if a.type == "results"]
        assert {entry.path for entry in artifact.manifest.contents} == {"results.json", "selection.npy",
                                                                        "scores.npy"}
        runs.append(run.run.run_id)
    assert len(set(runs)) == 2


def test_report_writes_the_table_and_three_plots(root, concurrent, wandb_sweep, tmp_path):
    out = tmp_path / "report"
    proc = run_module("ssat.report", [str(root / "outputs"), str(wandb_sweep), "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = (out / "report.md").read_text()
    assert table == proc.stdout
    rows = table.splitlines()[2:]
    assert sorted((r.split(" | ")[2], r.split(" | ")[3]) for r in rows) == [
        ("lcs_km", "0.1"), ("lcs_km", "0.2"), ("random", "0.3"), ("random", "0.4")]
    assert len((out / "report.csv").read_text().splitlines()) == 5
    for name in ("robust_vs_budget.png", "robust_vs_runtime.png", "selection_pca.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name


def test_report_projection_of_a_named_run(root, concurrent, tmp_path):
    """--projection picks the run drawn; a directory that is not one of the runs is one clear error."""
    (run_dir,) = [p.parent for p in (root / "outputs").glob("*/*/results.json")
                  if json.loads(p.read_text())["budget"] == 0.2]
    ok = run_module("ssat.report", [str(root / "outputs"), "--out", str(tmp_path / "a"), "--projection", str(run_dir)],
                    timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "a" / "selection_pca.png").stat().st_size > 10_000
    bad = run_module("ssat.report", [str(root / "outputs"), "--out", str(tmp_path / "b"), "--projection",
                                     str(tmp_path)], timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("ssat.report: error: --projection")
