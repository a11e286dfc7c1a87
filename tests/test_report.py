"""The report shows what a run measured: AutoAttack when it ran, failed sanity checks, and the model by its config
choice; from a real digits run's results.json (with AutoAttack on a few points), and copies of it that differ only
where the report must tell them apart."""

from __future__ import annotations

import csv
import io
import json

import pytest

from conftest import run_ssat
from forked import run_module
from ssat.report.plots import legend_label
from ssat.report.table import collect_results, results_table


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    run = run_ssat("selector=random", "budget=0.2", "ssat.epochs=2", "eval.autoattack.enabled=true",
                   "eval.autoattack.num_points=20", "eval.sanity.num_points=50", run_dir=root / "run",
                   cache_dir=root / "cache")
    return root, run


def write_variant(root, real: dict, name: str, **changes):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({**real, **changes}))
    return folder


@pytest.mark.slow
def test_results_name_the_model_by_its_config_choice(real_run):
    _, run = real_run
    assert run.results["model"] == "small_cnn"
    assert run.results["autoattack_acc"] is not None


@pytest.mark.slow
def test_tables_show_autoattack_sanity_and_model(real_run):
    root, run = real_run
    real = run.results
    failed = {**real["sanity"], "passed": False, "failed": ["eps0_matches_clean", "autoattack_not_above_pgd"]}
    write_variant(root, real, "variants/wide", model="wrn34_10", sanity=failed, sanity_passed=False)
    write_variant(root, real, "variants/no_autoattack", budget=0.4, autoattack_acc=None)
    records = collect_results([root / "run", root / "variants"])
    rows = {(r["model"], r["budget"]): r for r in csv.DictReader(io.StringIO(results_table(records, fmt="csv")))}
    assert set(rows) == {("small_cnn", "0.2"), ("small_cnn", "0.4"), ("wrn34_10", "0.2")}, \
        "runs of different models are different rows"
    assert rows[("small_cnn", "0.2")]["autoattack_acc"] == f"{real['autoattack_acc']:.4f}"
    assert rows[("small_cnn", "0.4")]["autoattack_acc"] == "", "empty when AutoAttack did not run"
    assert rows[("small_cnn", "0.2")]["sanity"] == ("ok" if real["sanity"]["passed"] else
                                                   "FAILED: " + ", ".join(real["sanity"]["failed"]))
    assert rows[("wrn34_10", "0.2")]["sanity"] == "FAILED: eps0_matches_clean, autoattack_not_above_pgd"
    markdown = results_table(records).splitlines()
    header = [c.strip() for c in markdown[0].strip("|").split("|")]
    assert header[:3] == ["dataset", "model", "selector"] and {"autoattack_acc", "sanity"} <= set(header)
    wide = next(line for line in markdown if "wrn34_10" in line)
    assert "FAILED: eps0_matches_clean, autoattack_not_above_pgd" in wide


@pytest.mark.slow
def test_sanity_of_several_seeds_names_the_failing_seed(real_run):
    root, run = real_run
    real = run.results
    passed = {**real["sanity"], "passed": True, "failed": []}
    runs = [{**real, "seed": 0, "sanity": passed},
            {**real, "seed": 1, "sanity": {**passed, "passed": False, "failed": ["robust_not_rising_with_eps"]}}]
    (row,) = csv.DictReader(io.StringIO(results_table(runs, fmt="csv")))
    assert row["seeds"] == "0,1" and row["sanity"] == "FAILED: seed 1: robust_not_rising_with_eps"
    assert legend_label("random", runs) == "random [sanity FAILED in 1 of 2 runs]"
    assert legend_label("random", runs[:1]) == "random"


@pytest.mark.slow
def test_report_command_writes_the_columns_and_plots(real_run, tmp_path):
    root, run = real_run
    real = run.results
    failed = write_variant(root, real, "cli_failed", budget=0.5, sanity={**real["sanity"], "passed": False,
                                                                          "failed": ["noise_not_stronger_than_pgd"]})
    out = tmp_path / "out"
    proc = run_module("ssat.report", [str(root / "run"), str(failed), "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "FAILED: noise_not_stronger_than_pgd" in (out / "report.md").read_text()
    assert "autoattack_acc" in (out / "report.csv").read_text().splitlines()[0]
    for name in ("robust_vs_budget.png", "robust_vs_runtime.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
