"""When does boundary selection pay? The regime map of issue 16.

    python experiments/regime_map.py --dataset digits --out experiments/results/regime_map_digits
    python experiments/regime_map.py --dataset cifar10 --data data/cifar10 --out experiments/results/regime_map_cifar10
    python experiments/regime_map.py --quick --out /tmp/regime_map          # a tiny digits map (the CI test)
    python experiments/regime_map.py --dataset cifar10_gpu --data data/cifar10 --out experiments/results/regime_map_gpu

The strength of the intermediate model is varied by the size of the labeled set (``--labeled``); the pool is the
same at every size (``pool.pool_first=true``: ``--pool`` images drawn, with their labels hidden, before the labeled
set is carved from the rest of the training images). At every size and seed each method of METHODS runs at the same
budget with the same SSAT compute: ``ssat.batches_per_epoch`` batches for ``ssat.epochs`` epochs and no early
stopping, so no selector can win by training longer (a re-selection's embedding of the pool is counted in its
seconds). Every method of a size and seed shares one cache, hence one intermediate model and one embedding.

Writes under --out: table.md and table.json (per size and method: the intermediate model's validation accuracy,
the pseudo-label accuracy of the selection (first and, for adaptive runs, the last re-selection), clean and PGD
accuracy, PGD accuracy minus random's paired by seed, seconds) and regime_map.png: each method's PGD accuracy minus
random's against the intermediate model's accuracy and against the selection's pseudo-label accuracy. Nothing here
looks at test accuracy to choose a setting: the sizes and schedules are fixed in PRESETS before any run.
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

# method -> the overrides that make it ("{every}": the preset's re-selection period)
METHODS = {
    "random": ["selector=random"],
    "pcs": ["selector=pcs"],
    "lcs_km": ["selector=lcs_km"],
    "lcs_km_adaptive": ["selector=lcs_km", "selector.reselect_every={every}"],
    "lcs_km_adaptive_relabel": ["selector=lcs_km", "selector.reselect_every={every}", "selector.relabel=true"],
    "lcs_km_soft": ["selector=lcs_km", "ssat.pseudo_labels=soft"],
}
COMMON = ["budget=0.2", "pool.pool_first=true", "ssat.early_stopping.patience=null"]
PRESETS = {
    # digits: 1,437 training images less 150 for validation and a pool of 600 leave 687 to label: 20 labeled
    # images give a weak intermediate model, all 687 a strong one.
    "digits": {"labeled": [20, 60, 687], "pool": 600, "seeds": [0, 1], "every": 2,
               "overrides": ["ssat.epochs=6", "ssat.batches_per_epoch=5", "attack.steps=5",
                             "eval.sanity.num_points=60", "eval.sanity.noise_samples=2"]},
    # CIFAR-10 JPEGs at laptop scale: the cifar10_small preset's network and attack, a fixed pool of 4,000 and a
    # fixed SSAT budget of 4 epochs of 8 batches of 128 (sized to the shared 2-core machine, see the README).
    "cifar10": {"labeled": [500, 2000, 8000], "pool": 4000, "seeds": [0, 1], "every": 1,
                "overrides": ["experiment=cifar10_small", "dataset.root={data}", "intermediate.epochs=10",
                              "ssat.epochs=4", "ssat.batches_per_epoch=8", "test_size=500",
                              "eval.sanity.num_points=100", "eval.sanity.noise_samples=2"]},
    # The strong end on one GPU (about 10 minutes on an H100-class GPU, by estimate: not run yet): 40,000 labeled
    # images give an intermediate model near the paper's regime, a pool of 8,000 from the rest, PreAct ResNet-18 in
    # bf16, TRADES with 5 steps, 6 SSAT epochs of 100 batches of 256; random against lcs_km and adaptive lcs_km.
    "cifar10_gpu": {"labeled": [40000], "pool": 8000, "seeds": [0], "every": 2,
                    "methods": ["random", "lcs_km", "lcs_km_adaptive"],
                    "overrides": ["dataset=image_folder", "dataset.root={data}", "dataset.name=cifar10_jpeg",
                                  "dataset.image_size=32", "dataset.mean=[0.4914,0.4822,0.4465]",
                                  "dataset.std=[0.2471,0.2435,0.2616]", "model=preact_resnet18", "trainer=gpu",
                                  "val_size=1024", "test_size=2000", "intermediate.epochs=15",
                                  "intermediate.batch_size=256", "embed.batch_size=1024", "ssat.epochs=6",
                                  "ssat.batch_size=256", "ssat.batches_per_epoch=100", "ssat.optim.schedule=cosine",
                                  "attack.steps=5", "attack.alpha=0.008", "eval.pgd.steps=20",
                                  "eval.autoattack.enabled=false", "eval.batch_size=1000", "loader.num_workers=4"]},
    # the CI test's map: every method and code path in a couple of minutes
    "quick": {"labeled": [30, 200], "pool": 300, "seeds": [0], "every": 1,
              "overrides": ["intermediate.epochs=3", "ssat.epochs=3", "ssat.batches_per_epoch=2", "attack.steps=2",
                            "eval.pgd.steps=2", "eval.val_pgd.steps=1", "test_size=60", "eval.sanity.num_points=20",
                            "eval.sanity.noise_samples=1"]},
}


def method_overrides(method: str, preset: dict, data: Path) -> list[str]:
    """The overrides every run of ``method`` in ``preset`` gets (sizes, seeds and paths aside)."""
    return [o.format(every=preset["every"], data=data) for o in
            [*COMMON, *preset["overrides"], *METHODS[method], f"pool.num_unlabeled={preset['pool']}"]]


def run_method(method: str, preset: dict, args: argparse.Namespace) -> float:
    """One Hydra multirun over the sizes and seeds for one method; returns its wall seconds."""
    cmd = [sys.executable, "-m", "ssat.run", "-m", *method_overrides(method, preset, args.data),
           f"pool.num_labeled={','.join(map(str, preset['labeled']))}", f"seed={','.join(map(str, preset['seeds']))}",
           f"cache_dir={args.cache_dir}", f"hydra.sweep.dir={args.out / 'runs' / method}",
           "hydra.sweep.subdir=labeled${pool.num_labeled}_seed${seed}", *args.overrides]
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if args.quiet else None,
                   stderr=subprocess.DEVNULL if args.quiet else None)
    seconds = time.perf_counter() - start
    print(f"  {method}: {seconds:.0f} s", flush=True)
    return seconds


def spread(values: list[float], digits: int = 3) -> str:
    return f"{mean(values):.{digits}f} ± {pstdev(values):.{digits}f}" if len(values) > 1 else f"{values[0]:.{digits}f}"


def load_runs(out: Path) -> dict[tuple[str, int, int], dict]:
    """(method, labeled, seed) -> results.json of every finished run under out/runs."""
    runs = {}
    for path in sorted((out / "runs").glob("*/*/results.json")):
        result = json.loads(path.read_text())
        runs[(path.parent.parent.name, result["sizes"]["labeled"], result["seed"])] = result
    return runs


def last_pseudo_label_acc(result: dict) -> float | None:
    """The pseudo-label accuracy of the selection SSAT ended on: the last re-selection's, else the first's."""
    later = [r["pseudo_label_acc"] for r in result.get("reselections") or [] if "pseudo_label_acc" in r]
    return later[-1] if later else result.get("pseudo_label_acc")


def summarise(runs: dict[tuple[str, int, int], dict]) -> list[dict]:
    """One row per (labeled size, method) with every seed's numbers and the PGD gain over random, paired by seed."""
    groups: dict[tuple[int, str], dict[int, dict]] = defaultdict(dict)
    for (method, labeled, seed), result in runs.items():
        groups[(labeled, method)][seed] = result
    order = {name: i for i, name in enumerate(METHODS)}
    rows = []
    for (labeled, method), by_seed in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        seeds = sorted(by_seed)
        baseline = groups.get((labeled, "random"), {})
        paired = [s for s in seeds if s in baseline]
        rows.append({
            "labeled": labeled, "method": method, "seeds": seeds,
            "intermediate_val_acc": [by_seed[s]["intermediate_val_acc"] for s in seeds],
            "pseudo_label_acc": [by_seed[s]["pseudo_label_acc"] for s in seeds],
            "final_pseudo_label_acc": [last_pseudo_label_acc(by_seed[s]) for s in seeds],
            "clean_acc": [by_seed[s]["clean_acc"] for s in seeds],
            "robust_acc": [by_seed[s]["robust_acc"] for s in seeds],
            "gain_over_random": [by_seed[s]["robust_acc"] - baseline[s]["robust_acc"] for s in paired],
            "reselections": [len(by_seed[s].get("reselections") or []) for s in seeds],
            "selection_seconds": [by_seed[s]["selection_seconds"] for s in seeds],
            "ssat_seconds": [by_seed[s]["timings"].get("ssat", 0.0) for s in seeds],
            "total_seconds": [by_seed[s]["total_seconds"] for s in seeds],
        })
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    """Per size: which methods beat random by more than the seed spread (the larger population standard deviation
    over seeds of the two methods' PGD accuracy), and whether adaptive selection is at least as good as the better
    of random and LCS-KM within that spread."""
    by_size: dict[int, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        by_size[row["labeled"]][row["method"]] = row
    lines = []
    for labeled, methods in sorted(by_size.items()):
        random = methods.get("random")
        if random is None:
            continue
        acc = mean(random["intermediate_val_acc"])
        beat, lost = [], []
        for name, row in methods.items():
            if name == "random" or not row["gain_over_random"]:
                continue
            margin = max(pstdev(row["robust_acc"]), pstdev(random["robust_acc"]))
            gain = mean(row["gain_over_random"])
            (beat if gain > margin else lost if gain < -margin else []).append(f"{name} ({gain:+.3f}, spread "
                                                                            f"{margin:.3f})")
        line = (f"- {labeled} labeled (intermediate val acc {acc:.3f}): beat random by more than the seed spread: "
                f"{', '.join(beat) or 'none'}; below random by more than it: {', '.join(lost) or 'none'}")
        best = max((methods[m] for m in ("random", "lcs_km") if m in methods), key=lambda r: mean(r["robust_acc"]))
        for name in ("lcs_km_adaptive", "lcs_km_adaptive_relabel"):
            if name in methods:
                margin = max(pstdev(methods[name]["robust_acc"]), pstdev(best["robust_acc"]))
                gap = mean(methods[name]["robust_acc"]) - mean(best["robust_acc"])
                line += (f"; {name} {'is' if gap >= -margin else 'is not'} at least as good as the better of random "
                         f"and lcs_km ({best['method']}, {gap:+.3f}, spread {margin:.3f})")
        lines.append(line)
    return lines


def markdown(rows: list[dict]) -> str:
    head = ["labeled", "method", "intermediate val acc", "pseudo-label acc (selection)", "pseudo-label acc (last)",
            "clean acc", "PGD acc", "PGD - random", "re-selections", "selection s", "SSAT s", "total s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join([
            str(row["labeled"]), row["method"], spread(row["intermediate_val_acc"]), spread(row["pseudo_label_acc"]),
            spread(row["final_pseudo_label_acc"]), spread(row["clean_acc"]), spread(row["robust_acc"]),
            spread(row["gain_over_random"]) if row["gain_over_random"] else "n/a",
            str(max(row["reselections"])), spread(row["selection_seconds"], 1), spread(row["ssat_seconds"], 0),
            spread(row["total_seconds"], 0)]) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(verdicts(rows)) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """PGD gain over random (mean and seed spread) against the intermediate model's accuracy and against the
    pseudo-label accuracy of the selection SSAT ended on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method and r["gain_over_random"]]
        if method == "random" or not mine:
            continue
        gains = [mean(r["gain_over_random"]) for r in mine]
        errors = [pstdev(r["gain_over_random"]) for r in mine]
        for axis, key in zip(axes, ("intermediate_val_acc", "final_pseudo_label_acc")):
            axis.errorbar([mean(r[key]) for r in mine], gains, yerr=errors, marker="o", capsize=3, label=method)
    labels = ("intermediate model's validation accuracy", "pseudo-label accuracy of the selection")
    for axis, label in zip(axes, labels):
        axis.axhline(0.0, color="grey", lw=0.8)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("PGD accuracy minus random's")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("digits", "cifar10", "cifar10_gpu"), default="digits")
    parser.add_argument("--quick", action="store_true", help="the tiny digits map the CI test runs")
    parser.add_argument("--data", type=Path, default=Path("data/cifar10"), help="CIFAR-10 in ImageFolder layout")
    parser.add_argument("--labeled", type=int, nargs="+", help="labeled-set sizes (default: the preset's)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the preset's)")
    parser.add_argument("--pool", type=int, help="pool size (default: the preset's)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: the preset's, else all")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, help="stage cache shared by the runs (default: OUT/cache)")
    parser.add_argument("--table-only", action="store_true", help="summarise the runs already under OUT")
    parser.add_argument("--quiet", action="store_true", help="drop the runs' own output")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run (after --)")
    args = parser.parse_args()
    preset = dict(PRESETS["quick" if args.quick else args.dataset])
    preset["labeled"] = args.labeled or preset["labeled"]
    preset["seeds"] = args.seeds if args.seeds is not None else preset["seeds"]
    preset["pool"] = args.pool or preset["pool"]
    args.methods = args.methods or preset.get("methods", list(METHODS))
    args.data, args.out = args.data.resolve(), args.out.resolve()
    args.cache_dir = (args.cache_dir or args.out / "cache").resolve()
    if not args.table_only:
        if args.dataset.startswith("cifar10") and not args.quick and not (args.data / "train").is_dir():
            raise SystemExit(f"regime_map: error: no train/ folder under {args.data}; extract the archive with "
                             f"`mkdir -p {args.data} && tar -xzf shared/datasets/cifar10-jpeg.tar.gz -C {args.data}`")
        start = time.perf_counter()
        for method in ["random", *(m for m in args.methods if m != "random")]:  # random first: the baseline
            run_method(method, preset, args)
        print(f"all runs: {time.perf_counter() - start:.0f} s wall", flush=True)
    rows = summarise(load_runs(args.out))
    table = markdown(rows)
    (args.out / "table.md").write_text(table)
    (args.out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, args.out / "regime_map.png")
    print(table)
    print(f"written {args.out / 'table.md'}, {args.out / 'table.json'} and {args.out / 'regime_map.png'}")


if __name__ == "__main__":
    main()
