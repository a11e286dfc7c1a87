"""Collect results.json files and summarise them per (dataset, selector, budget), seeds as mean and spread."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

from ssat.errors import DataError

COLUMNS = ("dataset", "selector", "budget", "seeds", "n_selected", "pseudo_label_acc", "clean_acc", "robust_acc",
           "total_seconds")


def collect_results(paths: list[Path]) -> list[dict[str, Any]]:
    """Every results.json under the given run or sweep directories (or the files themselves)."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path} does not exist")
        files = [path] if path.is_file() else sorted(path.rglob("results.json"))
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


def summarise(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per (dataset, selector, budget); accuracies as mean ± standard deviation over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["selector"], r["budget"])].append(r)
    rows = []
    for (dataset, selector, budget), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        rows.append({
            "dataset": dataset,
            "selector": selector,
            "budget": f"{budget:g}",
            "seeds": ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"])),
            "n_selected": str(runs[0]["n_selected"]),
            "pseudo_label_acc": _spread([r["pseudo_label_acc"] for r in runs if r.get("pseudo_label_acc") is not None]
                                        or [float("nan")]),
            "clean_acc": _spread([r["clean_acc"] for r in runs]),
            "robust_acc": _spread([r["robust_acc"] for r in runs]),
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
