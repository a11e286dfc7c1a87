"""logger=wandb, offline: one W&B run per job, for a single run, a single run whose stages all come from the cache,
and a multirun, read back from the run files that `wandb sync` would upload; a job that fails still finishes its
run, marked failed. Each run logs its selection picture and sanity checks; the sweep, and `python -m ssat.report
--wandb`, log the report's table and plots to the sweep's group."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import SHORT
from forked import run_module
from ssat.report.table import COLUMNS, collect_results, results_table, summarise

wandb_records = pytest.importorskip("wandb_records", reason="wandb is not installed (pip install -e '.[wandb]')")

pytestmark = pytest.mark.slow


def ssat_wandb(*overrides: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    """`python -m ssat.run logger=wandb ...` offline (WANDB_MODE) with no W&B key in the environment or ~/.netrc."""
    flags = [o for o in overrides if o.startswith("-")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return run_module("ssat.run", [*flags, *SHORT, "logger=wandb", "selector=random",
                                   *(o for o in overrides if not o.startswith("-"))], cwd=cwd,
                      env={**env, "HOME": str(home), "WANDB_MODE": "offline"})


def one_offline_run(job_dir: Path):
    """The job's only W&B run (offline), and its results.json."""
    (run_dir,) = (job_dir / "wandb").glob("offline-run-*")
    return wandb_records.OfflineRun(run_dir), json.loads((job_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wandb")


@pytest.fixture(scope="module")
def single_runs(root):
    """The same single run twice against one cache: the first computes every stage, the second none."""
    runs = []
    for name in ("first", "cached"):
        proc = ssat_wandb(f"hydra.run.dir={root / name}", f"cache_dir={root / 'cache'}", cwd=root, home=root)
        assert proc.returncode == 0, proc.stderr[-5000:]
        runs.append(root / name)
    return runs


def test_a_single_run_gives_one_wandb_run_with_every_stage(single_runs):
    run, results = one_offline_run(single_runs[0])
    assert run.exit_code == 0
    assert run.run.run_group == single_runs[0].name and "selector=random" in run.run.display_name
    assert run.config["seed"] == results["seed"] and run.config["selector"]["name"] == "random"
    assert "hydra" not in run.config
    assert any("intermediate/train/loss" in row for row in run.history)
    assert any("ssat/val/robust_acc" in row for row in run.history)
    assert run.summary["evaluate/robust_acc"] == results["robust_acc"]
    assert run.summary["intermediate/cached"] is False and run.summary["ssat/cached"] is False
    (artifact,) = [a for a in run.artifacts if a.type == "results"]
    assert {entry.path for entry in artifact.manifest.contents} == {"results.json", "selection.npy", "scores.npy"}


def test_a_single_run_from_the_cache_still_gives_its_wandb_run(single_runs):
    run, results = one_offline_run(single_runs[1])
    first, _ = one_offline_run(single_runs[0])
    assert all(results["cached"].values())
    assert run.exit_code == 0 and run.run.run_id != first.run.run_id
    assert not any(key.endswith("/train/loss") for row in run.history for key in row), "nothing trained"
    assert run.summary["evaluate/robust_acc"] == results["robust_acc"]
    assert all(run.summary[f"{stage}/cached"] is True for stage in results["cached"])
    assert len([a for a in run.artifacts if a.type == "results"]) == 1


@pytest.fixture(scope="module")
def sweep(single_runs, root) -> Path:
    """A two-job multirun against the single runs' cache."""
    sweep = root / "sweep"
    proc = ssat_wandb("-m", "eval.chunk_size=500,1000", f"hydra.sweep.dir={sweep}", f"cache_dir={root / 'cache'}",
                      cwd=root, home=root)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return sweep


def test_a_multirun_gives_one_wandb_run_per_job(sweep, root):
    job_dirs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(job_dirs) == 2
    ids = set()
    for num, job_dir in enumerate(job_dirs):
        run, results = one_offline_run(job_dir)
        assert run.exit_code == 0 and run.run.run_group == f"{root.name}/sweep"
        assert run.run.display_name.startswith(f"{num}:") and "eval.chunk_size=" in run.run.display_name
        assert run.summary["evaluate/robust_acc"] == results["robust_acc"]
        assert run.summary["intermediate/cached"] is True
        ids.add(run.run.run_id)
    assert len(ids) == 2


def test_a_run_logs_its_selection_picture_and_its_sanity_checks(single_runs):
    run, results = one_offline_run(single_runs[0])
    assert run.image("selection/pca").startswith(b"\x89PNG")
    assert (single_runs[0] / "selection_pca.png").read_bytes() == run.image("selection/pca")
    columns, rows = run.table("sanity/checks")
    assert columns == ["check", "passed", "values"]
    checks = results["sanity"]["checks"]
    assert {name: passed for name, passed, _ in rows} == {name: c["passed"] for name, c in checks.items()}
    name, _, values = rows[0]
    assert json.loads(values) == {k: v for k, v in checks[name].items() if k != "passed"}
    assert run.summary["sanity/passed"] == results["sanity"]["passed"]
    assert run.summary["sanity/failed"] == ", ".join(results["sanity"]["failed"])


def check_report_run(report_dir: Path, group: str, sweep: Path) -> None:
    """The report's run: of job type report in the sweep's group, with the results table (as report.md's rows) and
    the three plots."""
    (offline,) = (report_dir / "wandb").glob("offline-run-*")
    run = wandb_records.OfflineRun(offline)
    assert run.exit_code == 0 and run.run.run_group == group and run.run.job_type == "report"
    columns, rows = run.table("report/results")
    assert tuple(columns) == COLUMNS
    assert rows == [[row[c] for c in COLUMNS] for row in summarise(collect_results([sweep]))]
    assert len(rows) == 1 and rows[0][COLUMNS.index("seeds")] == "0,0", "both jobs: one selector, budget, seed"
    for plot in ("robust_vs_budget", "robust_vs_runtime", "selection_pca"):
        assert run.image(f"report/{plot}").startswith(b"\x89PNG"), plot


def test_the_sweep_logs_its_report_to_its_group_when_it_ends(sweep, root):
    check_report_run(sweep, f"{root.name}/sweep", sweep)
    assert (sweep / "report.md").read_text() == results_table(collect_results([sweep]))


def test_the_report_command_logs_the_table_and_the_plots_to_the_sweeps_group(sweep, root, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = run_module("ssat.report", [str(sweep), "--wandb", "--out", str(tmp_path)], timeout=600,
                      env={**env, "HOME": str(root), "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"group {root.name}/sweep" in proc.stderr
    check_report_run(tmp_path, f"{root.name}/sweep", sweep)


def test_a_job_that_fails_during_work_finishes_its_wandb_run_marked_failed(root):
    """A diverged loss ends the job with one line and exit code 1; its W&B run is finished with exit code 1, not
    left open for the next job to merge into."""
    run_dir = root / "diverged"
    proc = ssat_wandb("intermediate.optim.lr=1e30", f"hydra.run.dir={run_dir}", f"cache_dir={root / 'cache2'}",
                      cwd=root, home=root)
    assert proc.returncode == 1, proc.stderr[-5000:]
    assert len([line for line in proc.stderr.splitlines() if line.startswith("ssat: error: ")]) == 1
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert wandb_records.OfflineRun(offline).exit_code == 1
