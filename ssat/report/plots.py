"""The report's figures (matplotlib, Agg: no display needed): accuracy against budget and runtime, and where the
selected points lie in the pool's feature space."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ssat.artifacts import Embedding, SelectionFiles  # noqa: E402
from ssat.clustering.pca import fit_pca  # noqa: E402
from ssat.errors import DataError  # noqa: E402

# Pool points drawn in grey behind the selection; more only blur the picture (the PCA still sees every point).
MAX_BACKGROUND = 20000


def _by(records: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[tuple(r.get(k, "") for k in keys)].append(r)
    return dict(sorted(groups.items()))


def _datasets_title(records: list[dict[str, Any]]) -> str:
    return ", ".join(sorted({r["dataset"] for r in records}))


def legend_label(name: str, runs: list[dict[str, Any]]) -> str:
    """A legend entry; a line whose runs failed their evaluation's sanity checks says so, as the tables do."""
    failed = sum(not r.get("sanity", {}).get("passed", True) for r in runs)
    return f"{name} [sanity FAILED in {failed} of {len(runs)} runs]" if failed else name


def _series(records: list[dict[str, Any]], *keys: str) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by ``keys`` and named by them, the dataset and model only when they differ between runs."""
    varying = [k for k in ("dataset", "model") if len({r.get(k, "") for r in records}) > 1]
    return {" ".join(str(v) for v in key): runs for key, runs in _by(records, *varying, *keys).items()}


def plot_budget(records: list[dict[str, Any]], path: Path) -> Path:
    """Robust accuracy against budget, one line per (dataset, model, selector); error bars: the spread over seeds."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, runs in _series(records, "selector").items():
        points = _by(runs, "budget")
        budgets = [b for (b,) in points]
        accs = [[r["robust_acc"] for r in rs] for rs in points.values()]
        ax.errorbar(budgets, [mean(a) for a in accs], yerr=[pstdev(a) for a in accs], marker="o", capsize=3,
                    label=legend_label(name, runs))
    ax.set_xlabel("budget (fraction of the pool selected)")
    ax.set_ylabel("robust accuracy (PGD)")
    ax.set_title(f"Robust accuracy against budget ({_datasets_title(records)}; mean ± sd over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_runtime(records: list[dict[str, Any]], path: Path) -> Path:
    """Robust accuracy against the total compute of a run's stages (cached stages count at their original cost)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, runs in _series(records, "selector").items():
        ax.scatter([r["total_seconds"] for r in runs], [r["robust_acc"] for r in runs],
                   label=legend_label(name, runs), alpha=0.8)
        for r in runs:
            ax.annotate(f"{r['budget']:g}", (r["total_seconds"], r["robust_acc"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("total runtime of the stages (s)")
    ax.set_ylabel("robust accuracy (PGD)")
    ax.set_title(f"Robust accuracy against runtime ({_datasets_title(records)}; labels: budget)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def projection_run(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run to draw: the first with boundary points (the interesting picture), else the first."""
    drawable = [r for r in records if "stage_dirs" in r]
    if not drawable:
        raise DataError("no results.json records stage_dirs (written since the report draws the pool); rerun")
    return next((r for r in drawable if r["sizes"].get("boundary", 0) > 0), drawable[0])


def plot_projection(record: dict[str, Any], path: Path, seed: int = 0) -> Path:
    """The pool's features on their first two principal components, with the run's boundary and random picks."""
    stage_dirs = {k: Path(v) for k, v in record["stage_dirs"].items()}
    features = Embedding.load(stage_dirs["embed"]).features
    chosen = SelectionFiles.load(stage_dirs["select"])
    selection, is_boundary = chosen.indices, chosen.is_boundary
    coords = fit_pca(features, 2).transform(features)
    rest = np.setdiff1d(np.arange(len(features)), selection)
    if len(rest) > MAX_BACKGROUND:
        rest = np.random.default_rng(seed).choice(rest, MAX_BACKGROUND, replace=False)
    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    ax.scatter(*coords[rest].T, s=4, c="lightgrey", label=f"pool, not selected ({len(features) - len(selection)})")
    for mask, colour, what in ((~is_boundary, "tab:blue", "random"), (is_boundary, "tab:red", "boundary")):
        if mask.any():
            ax.scatter(*coords[selection[mask]].T, s=8, c=colour, label=f"selected, {what} ({int(mask.sum())})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"{record['dataset']} pool features (PCA), {record['selector']} at budget {record['budget']:g}",
                 fontsize=9)
    ax.legend(fontsize=7, markerscale=2)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_all(records: list[dict[str, Any]], out: Path, projection: dict[str, Any] | None = None) -> list[Path]:
    """robust_vs_budget.png, robust_vs_runtime.png and selection_pca.png in ``out``."""
    return [plot_budget(records, out / "robust_vs_budget.png"),
            plot_runtime(records, out / "robust_vs_runtime.png"),
            plot_projection(projection or projection_run(records), out / "selection_pca.png")]
