"""What a run reports: one documented summary type, written as results.json and printed as a short table."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ssat.artifacts import ModelWeights, SelectionFiles
from ssat.cache import StageResult, write_json_atomic

# Bump when a field of results.json changes meaning or goes away (adding one does not need it).
SCHEMA_VERSION = 2
RESULTS = "results.json"
# What a run directory holds for people and trackers: the summary, the selection and every candidate's score.
RUN_FILES = (RESULTS, SelectionFiles.INDICES, SelectionFiles.SCORES)
STAGES = "stages.json"  # what a partial run (+stage=<name>) leaves in its run directory instead of results.json


@dataclass
class RunSummary:
    """results.json. Accuracies are on the test set (or its ``test_size`` subset); seconds are each stage's compute
    time when it was computed, also for stages taken from the cache."""

    dataset: str
    selector: str
    budget: float                  # 1 when the whole pool was used; a generated pool: the budget that sized it
    seed: int
    attack: str
    model: str
    target: str                    # pool | labeled (selection.target)
    sizes: dict[str, int]          # labeled, val, pool, test, candidates, selected, boundary, random
    n_pool: int
    n_generated: int
    guidance: dict[str, str] | None  # a generative selector's guidance (PCG's sign: paper or release)
    pool_labels: str | None        # what the selected pool points trained with: intermediate or file (null: no pool)
    coreset_schedule: dict[str, Any] | None  # a coreset's epochs (ACS): warm start, skipped, batches per epoch
    n_selected: int
    selection_sha256: str          # equal across reruns: the same command selects the same points
    clean_acc: float
    robust_acc: float              # PGD (eval.pgd)
    autoattack_acc: float | None
    autoattack_num_points: int | None
    autoattack_warnings: list[str]
    sanity: dict[str, Any]
    sanity_passed: bool
    pseudo_label_acc: float | None
    intermediate_val_acc: float | None
    checkpoints: dict[str, dict[str, str]]  # models read from files, not trained: {stage: {path, sha256}}
    ssat_epochs: int
    ssat_best_epoch: int
    ssat_epochs_to_convergence: int
    ssat_early_stopped: bool
    ssat_ema: bool
    timings: dict[str, float]
    selection_seconds: float       # the select stage plus re-selections during training (coresets)
    reselections: list[dict[str, Any]] | None
    total_seconds: float
    cached: dict[str, bool]
    stage_keys: dict[str, str]
    stage_dirs: dict[str, str]     # where the report finds the features and the selection
    wall_seconds: float
    schema_version: int = field(default=SCHEMA_VERSION)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def selection_sha256(selection: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(selection, dtype=np.int64).tobytes()).hexdigest()


def write_run_dir(run_dir: Path, results: dict[str, StageResult], summary: RunSummary) -> None:
    """results.json, the selection and scores, and links to the checkpoints of the training stages."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (SelectionFiles.INDICES, SelectionFiles.SCORES):
        shutil.copyfile(results["select"].path / name, run_dir / name)
    for stage in ("intermediate", "ssat"):
        link_dir = ModelWeights.checkpoint_dir(run_dir) / stage
        link_dir.mkdir(parents=True, exist_ok=True)
        for ckpt in (ModelWeights.BEST, ModelWeights.LAST):
            target = ModelWeights.checkpoint_dir(results[stage].path) / ckpt
            link = link_dir / ckpt
            if target.exists() and not link.is_symlink():
                os.symlink(target, link)
    write_json_atomic(run_dir / RESULTS, summary.to_dict())


def stage_records(results: dict[str, StageResult]) -> dict[str, dict[str, Any]]:
    """Each cached stage's key, whether it was reused, its seconds and its folder: what a partial run records, so
    that a sweep of one-stage jobs can be checked against the cache it shares."""
    return {name: {"key": r.key, "cached": r.cached, "seconds": r.seconds, "folder": str(r.path)}
            for name, r in results.items() if r.path is not None}


def write_stages(run_dir: Path, stage: str, results: dict[str, StageResult]) -> dict[str, Any]:
    record = {"stage": stage, "stages": stage_records(results)}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / STAGES, record)
    return record


def format_summary(summary: dict[str, Any]) -> str:
    """The short table printed at the end of a run."""
    s = summary["sizes"]
    head = ["selector", "budget", "labeled", "pool", "selected (boundary+random)", "clean_acc", "robust_acc"]
    row = [summary["selector"], f"{summary['budget']:g}", str(s["labeled"]), str(s["pool"]),
           f"{s['selected']} ({s['boundary']}+{s['random']})", f"{summary['clean_acc']:.4f}",
           f"{summary['robust_acc']:.4f}"]
    if summary.get("autoattack_acc") is not None:
        head.append("autoattack_acc")
        row.append(f"{summary['autoattack_acc']:.4f}")
    widths = [max(len(h), len(r)) for h, r in zip(head, row)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join(r.ljust(w) for r, w in zip(row, widths)),
             "", f"{'stage':<14}{'seconds':>9}  cached"]
    for name, seconds in summary["timings"].items():
        lines.append(f"{name:<14}{seconds:>9.1f}  {'yes' if summary['cached'][name] else 'no'}")
    lines.append(f"{'total':<14}{summary['total_seconds']:>9.1f}")
    sanity = summary.get("sanity")
    if sanity and not sanity["passed"]:
        lines += ["", f"!!! SANITY CHECKS FAILED: {', '.join(sanity['failed'])}: the robust accuracy above is not "
                      f"to be trusted (gradient masking or an evaluation bug; see results.json)"]
    return "\n".join(lines)


def format_stages(results: dict[str, StageResult]) -> str:
    """The stages a partial run (``+stage=<name>``) ran or reused, and where their artifacts are."""
    lines = [f"{'stage':<14}{'seconds':>9}  cached  folder"]
    for name, r in results.items():
        if r.path is not None:
            lines.append(f"{name:<14}{r.seconds:>9.1f}  {'yes' if r.cached else 'no ':<6}  {r.path}")
    return "\n".join(lines)
