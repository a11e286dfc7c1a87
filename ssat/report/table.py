"""Collect results.json files and summarise them per (dataset, model, selector, budget), seeds as mean and spread;
AutoAttack when it ran and whether the evaluation passed its sanity checks."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

from ssat.pipeline.summary import RESULTS
from ssat.errors import DataError

COLUMNS = ("dataset", "model", "selector", "budget", "seeds", "n_selected", "pseudo_label_acc", "clean_acc",
           "robust_acc", "autoattack_acc", "sanity", "total_seconds")


def collect_results(paths: list[Path]) -> list[dict[str, Any]]:
    """Every results.json under the given run or sweep directories (or the files themselves)."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path} does not exist")
        files = [path] if path.is_file() else sorted(path.rglob(RESULTS))
        for file in files:
            record = json.loads(file.read_text())
            record["run_dir"] = str(file.parent)
            found.append(record)
    if not found:
        raise DataError(f"no results.json under {', '.join(map(str, paths))}")
    return found


def _spread(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{mean(values):.{digits}f} ± {pstdev(values):.{digits}f}"


def sanity_failures(runs: list[dict[str, Any]]) -> list[str]:
    """The sanity checks the runs failed ("seed 1: eps0_matches_clean" when several seeds are grouped)."""
    several = len(runs) > 1
    failed = []
    for r in sorted(runs, key=lambda r: r["seed"]):
        names = r.get("sanity", {}).get("failed", [])
        if names:
            failed.append(f"seed {r['seed']}: {', '.join(names)}" if several else ", ".join(names))
    return failed


def sanity_cell(runs: list[dict[str, Any]]) -> str:
    """ok, FAILED: the checks, or n/a for records written before the checks existed."""
    if not all("sanity" in r for r in runs):
        return "n/a"
    failed = sanity_failures(runs)
    return f"FAILED: {'; '.join(failed)}" if failed else "ok"


def summarise(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per (dataset, model, selector, budget); accuracies as mean ± standard deviation over seeds;
    autoattack_acc empty when AutoAttack did not run."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r.get("model", ""), r["selector"], r["budget"])].append(r)
    rows = []
    for (dataset, model, selector, budget), runs in sorted(groups.items(),
                                                           key=lambda kv: (kv[0][0], kv[0][1], kv[0][3], kv[0][2])):
        autoattack = [r["autoattack_acc"] for r in runs if r.get("autoattack_acc") is not None]
        rows.append({
            "dataset": dataset,
            "model": model,
            "selector": selector,
            "budget": f"{budget:g}",
            "seeds": ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"])),
            "n_selected": str(runs[0]["n_selected"]),
            "pseudo_label_acc": _spread([r["pseudo_label_acc"] for r in runs if r.get("pseudo_label_acc") is not None]
                                        or [float("nan")]),
            "clean_acc": _spread([r["clean_acc"] for r in runs]),
            "robust_acc": _spread([r["robust_acc"] for r in runs]),
            "autoattack_acc": _spread(autoattack) if autoattack else "",
            "sanity": sanity_cell(runs),
            "total_seconds": _spread([r["total_seconds"] for r in runs], digits=1),
        })
    return rows


def results_table(records: list[dict[str, Any]], fmt: str = "markdown") -> str:
    rows = summarise(records)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row[c] for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"
