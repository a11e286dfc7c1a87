"""The paper's comparison at small scale on real CIFAR-10: full SSAT against selection and guided generation.

    python experiments/paper_table.py --data data/cifar10 [--seeds 0 1] [--out experiments/results/cifar10_small]

Runs `python -m ssat.run` with the `experiment=cifar10_small` preset, two seeds each, for: `full`; `random`,
`pcs`, `lcs_km` and `lcs_gmm` at budgets 0.1 and 0.2; and `lcg_km` generating as many images as a 0.1 selection
holds (its small DDPM is pretrained once by the cached `ddpm_pretrain` stage and reported in its own column,
outside the comparison's time). All runs share one cache, so the intermediate model and the embedding are
computed once per seed, and a rerun of this command reuses every finished stage.

Writes table.md and table.json under --out: clean and PGD accuracy (mean ± spread over seeds), pseudo-label
accuracy of the selection, SSAT epochs to the best validation robust accuracy, seconds per stage, the total,
and each method's total over full's. Extra arguments after `--` go to every run (e.g. `-- trainer=gpu`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

# (selector, budgets): the runs of the table, in its row order.
RUNS = [("full", [1.0]), *((name, [0.1, 0.2]) for name in ("random", "pcs", "lcs_km", "lcs_gmm")), ("lcg_km", [0.1])]
# Stages whose time counts in a method's total; ddpm_pretrain is reported apart (a pretrained DDPM is an input).
COUNTED = ("intermediate", "embed", "select", "pseudo_label", "ssat", "evaluate", "ddpm_finetune", "sample",
           "sample_plain")


def run_sweep(selector: str, budgets: list[float], seeds: list[int], args: argparse.Namespace) -> None:
    sweep_dir = args.out / "runs" / selector
    cmd = [sys.executable, "-m", "ssat.run", "-m", f"experiment={args.experiment}", f"dataset.root={args.data}",
           f"cache_dir={args.cache_dir}", f"selector={selector}", f"budget={','.join(map(str, budgets))}",
           f"seed={','.join(map(str, seeds))}", f"hydra.sweep.dir={sweep_dir}",
           "hydra.sweep.subdir=${selector.name}_${budget}_seed${seed}", *args.overrides]
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"  {selector}: {time.perf_counter() - start:.0f} s", flush=True)


def spread(values: list[float], digits: int = 3) -> str:
    return f"{mean(values):.{digits}f} ± {pstdev(values):.{digits}f}" if len(values) > 1 else f"{values[0]:.{digits}f}"


def summarise(results: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["selector"], r["budget"])].append(r)
    order = {name: i for i, (name, _) in enumerate(RUNS)}
    rows = []
    for (selector, budget), runs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        totals = [sum(r["timings"].get(s, 0.0) for s in COUNTED) for r in runs]
        row = {
            "selector": selector, "budget": budget, "seeds": sorted(r["seed"] for r in runs),
            "n_train": runs[0]["sizes"]["labeled"] + runs[0]["n_selected"],
            "clean_acc": [r["clean_acc"] for r in runs], "robust_acc": [r["robust_acc"] for r in runs],
            "pseudo_label_acc": [r["pseudo_label_acc"] for r in runs if r.get("pseudo_label_acc") is not None],
            "best_epoch": [r["ssat_best_epoch"] + 1 for r in runs], "epochs_run": [r["ssat_epochs"] for r in runs],
            "stage_seconds": {s: mean(r["timings"].get(s, 0.0) for r in runs) for s in COUNTED},
            "total_seconds": totals,
            "ddpm_pretrain_seconds": mean(r["timings"].get("ddpm_pretrain", 0.0) for r in runs),
            "selections": [r.get("selection_sha256") for r in runs],
        }
        rows.append(row)
    full = next((mean(row["total_seconds"]) for row in rows if row["selector"] == "full"), None)
    for row in rows:
        row["time_over_full"] = mean(row["total_seconds"]) / full if full else None
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["method", "budget", "train images", "clean acc", "PGD acc", "pseudo-label acc", "best epoch",
            "intermediate+embed+select s", "generation s", "SSAT s", "eval s", "total s", "total / full",
            "DDPM pretrain s (apart)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        s = row["stage_seconds"]
        cells = [
            row["selector"], f"{row['budget']:g}", str(row["n_train"]), spread(row["clean_acc"]),
            spread(row["robust_acc"]), spread(row["pseudo_label_acc"]) if row["pseudo_label_acc"] else "n/a",
            spread(row["best_epoch"], 1), f"{s['intermediate'] + s['embed'] + s['select']:.0f}",
            f"{s['ddpm_finetune'] + s['sample'] + s['sample_plain']:.0f}", f"{s['ssat']:.0f}", f"{s['evaluate']:.0f}",
            spread(row["total_seconds"], 0), f"{row['time_over_full']:.2f}" if row["time_over_full"] else "n/a",
            f"{row['ddpm_pretrain_seconds']:.0f}" if row["ddpm_pretrain_seconds"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/cifar10"), help="CIFAR-10 in ImageFolder layout")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/cifar10_small"))
    parser.add_argument("--cache-dir", type=Path, help="stage cache shared by the runs (default: OUT/cache)")
    parser.add_argument("--experiment", default="cifar10_small", help="the preset every run starts from")
    parser.add_argument("--methods", nargs="+", default=[name for name, _ in RUNS], choices=[n for n, _ in RUNS],
                        help="run only these (the table still shows every run found under OUT)")
    parser.add_argument("--table-only", action="store_true", help="summarise the runs already under OUT")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run (after --)")
    args = parser.parse_args()
    args.data, args.out = args.data.resolve(), args.out.resolve()
    args.cache_dir = (args.cache_dir or args.out / "cache").resolve()
    if not args.table_only:
        if not (args.data / "train").is_dir():
            raise SystemExit(f"paper_table: error: no train/ folder under {args.data}; extract the archive with "
                             f"`mkdir -p {args.data} && tar -xzf shared/datasets/cifar10-jpeg.tar.gz -C {args.data}`")
        start = time.perf_counter()
        for selector, budgets in RUNS:
            if selector in args.methods:
                run_sweep(selector, budgets, args.seeds, args)
        print(f"all runs: {time.perf_counter() - start:.0f} s wall", flush=True)
    results = [json.loads(p.read_text()) for p in sorted((args.out / "runs").rglob("results.json"))]
    rows = summarise(results)
    table = markdown(rows)
    (args.out / "table.md").write_text(table)
    (args.out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    print(f"written {args.out / 'table.md'} and {args.out / 'table.json'}")


if __name__ == "__main__":
    main()
