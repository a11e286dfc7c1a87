"""Selection cost on a pool of millions: our lcs_km and lcs_gmm against scikit-learn, measured side by side.

    python experiments/bench_selection.py --n 1000000 --dim 512 --json out.json [--embed]
    python experiments/bench_selection.py --n 20000000 --dim 640 --dtype float16 --workdir /work/bench-data

A feature file larger than half the machine's memory (the second command: 25.6 GB on a 24 GB machine) runs the
pool-larger-than-RAM mode: random, pcs, lcs_km and lcs_gmm's fast option on the memory-mapped file, each in its
own process, with its peak private memory (RssAnon: what the process allocated, the page cache's file pages
aside) against a 4 GB limit; scikit-learn cannot hold such a pool and is not run. With --workdir the files are
written once (streamed) and reused by later runs; remove them when done.

Builds a clustered synthetic feature file on disk, then runs each method in its own process (so its peak RSS
is its own): our selectors end to end with their default config (read the memory-mapped features, fit, score,
pick a 20% budget), and scikit-learn's KMeans (k-means++) and GaussianMixture with the same covariance type and
the same number of iterations, on the same rows. scikit-learn runs on a random subsample when its estimated
time exceeds --sklearn-seconds; ours is then timed again on exactly those rows for the ratio. A GMM comparison
whose scikit-learn side takes under a minute runs three times on each side, and the medians give the ratio.

lcs_gmm runs twice: its default, the release's method (full covariance on the raw features of every row), and
the fast option (selector.pca_dim=64 selector.max_fit_points=200000). Each is compared with scikit-learn on the
rows it fits (raw, or the PCA-reduced sample; the PCA is timed in ours end to end), at --gmm-iterations each.
--embed also measures the embed stage's throughput against the model's bare forward pass on the same batches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K = 10
BUDGET = 0.2


ANON_LIMIT_MB = 4096  # the pool-larger-than-RAM mode's limit on a method's peak private memory
REPEAT_BELOW_SECONDS = 60.0  # a GMM comparison whose scikit-learn side takes less is run three times, each side


def make_features(path: Path, logits_path: Path, n: int, dim: int, dtype: str = "float32", seed: int = 0,
                  chunk: int = 16384) -> None:
    """K anisotropic Gaussian blobs of unequal size, written in chunks (the file may exceed RAM), and logits that
    favour each row's blob; written under temporary names and renamed when complete, so a later run reuses them.

    Each chunk's rows are grouped by blob (so that each group is one in-place multiply-add into one reused
    buffer: fresh temporaries are page-faulted anew every time, which made 20M x 640 take most of an hour).
    """
    import torch
    from numpy.lib.format import open_memmap

    rng = np.random.default_rng(seed)
    means = rng.normal(size=(K, dim)).astype(np.float32) * 4
    scales = rng.uniform(0.5, 2.0, size=(K, dim)).astype(np.float32)
    weights = rng.dirichlet(np.full(K, 5.0))
    partial, logits_partial = path.with_suffix(".partial"), logits_path.with_suffix(".partial")
    out = open_memmap(partial, mode="w+", dtype=np.dtype(dtype), shape=(n, dim))
    logits = open_memmap(logits_partial, mode="w+", dtype=np.float32, shape=(n, K))
    buffer = np.empty((chunk, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        counts = rng.multinomial(m, weights)
        rows = buffer[:m]
        rng.standard_normal(out=rows, dtype=np.float32)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for k in range(K):
            group = rows[bounds[k]:bounds[k + 1]]
            group *= scales[k]
            group += means[k]
        torch.from_numpy(out[start:start + m]).copy_(torch.from_numpy(rows))  # numpy's float16 cast is slow
        block = rng.standard_normal((m, K), dtype=np.float32)
        block[np.arange(m), np.repeat(np.arange(K), counts)] += 3
        logits[start:start + m] = block
    out.flush()
    logits.flush()
    del out, logits
    partial.rename(path)
    logits_partial.rename(logits_path)


class AnonPeak:
    """Peak RssAnon of this process (private memory; file pages of a memory map aside), polled every 10 ms."""

    def __init__(self):
        import threading

        self.peak_kb, self.done = 0, False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    @staticmethod
    def now_kb() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def _poll(self) -> None:
        while not self.done:
            self.peak_kb = max(self.peak_kb, self.now_kb())
            time.sleep(0.01)

    def stop_mb(self) -> float:
        self.done = True
        self.thread.join()
        return max(self.peak_kb, self.now_kb()) / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process: unlike wall time, hardly changed by others sharing the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# lcs_gmm's speed option: PCA to 64 dimensions and a fit on 200,000 rows drawn at random (the default is neither)
GMM_FAST = ["selector.pca_dim=64", "selector.max_fit_points=200000"]


def compose_selector(name: str, overrides: list[str] = ()):
    from hydra import compose, initialize_config_module

    from ssat.config import build

    with initialize_config_module(config_module="ssat.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"selector={name}", *overrides])
    return build(cfg.selector)


def gmm_selector(method: str):
    """lcs_gmm as its default config (the release's method), or with the speed option for a *_fast method."""
    return compose_selector("lcs_gmm", GMM_FAST if method.endswith("_fast") else [])


def configured_selector(method: str):
    """The selector a measurement runs (or whose settings scikit-learn's fit copies), None for sklearn_kmeans."""
    if method in ("ours_random", "ours_pcs"):
        return compose_selector(method.removeprefix("ours_"))
    if method in ("ours_lcs_km", "ours_lcs_km_sample"):  # _sample: max_passes=1, the sample's centroids
        return compose_selector("lcs_km", ["selector.max_passes=1"] if method.endswith("_sample") else [])
    if "gmm" in method:
        return gmm_selector(method)
    return None


def rows_of(features: np.ndarray, rows_file: str | None) -> np.ndarray:
    if rows_file is None:
        return features
    return np.ascontiguousarray(features[np.load(rows_file)])


def worker(method: str, features_file: str, rows_file: str | None, iterations: int | None) -> dict:
    """One measurement, in its own process; prints a JSON line."""
    from ssat.selection import PoolEmbedding

    anon = AnonPeak()
    features = np.load(features_file, mmap_mode="r")
    logits = np.load(logits_file(Path(features_file)), mmap_mode="r")
    selector = configured_selector(method)  # composing the config (Hydra, imports) is not the selection's work
    start, cpu_start = time.perf_counter(), cpu_seconds()
    x = rows_of(features, rows_file)
    if rows_file is not None:
        logits = np.zeros((len(x), K), dtype=np.float32)
    result: dict = {"method": method, "rows": len(x)}
    if method in ("ours_random", "ours_pcs"):
        selection = selector.select(PoolEmbedding(x, logits), BUDGET, seed=0)
        result["selected"] = len(selection.indices)
    elif method in ("ours_lcs_km", "ours_lcs_km_sample"):  # _sample: max_passes=1, the sample's centroids
        selector.select(PoolEmbedding(x, logits), BUDGET, seed=0)
        result["inertia"] = selector.fitted_.inertia
        result["iterations"] = selector.niter
        result["passes"] = selector.fitted_.passes
        result["pass_inertia"] = list(selector.fitted_.pass_inertia)
    elif method in ("ours_lcs_gmm", "ours_lcs_gmm_fast"):
        if iterations is not None:  # equal iterations with scikit-learn: no early stop
            selector.max_iter, selector.tol = iterations, 0.0
        selector.select(PoolEmbedding(x, logits), BUDGET, seed=0)
        result["mean_log_likelihood"] = selector.fitted_.mean_log_likelihood
        result["iterations"] = selector.fitted_.n_iter
        result["pca_dim"] = selector.pca_dim
        result["fit_rows"] = min(len(x), selector.max_fit_points or len(x))
    elif method in ("ours_gmm_fit", "ours_gmm_fit_fast"):  # like sklearn_gmm: fit and score the reduced rows
        from ssat.clustering.gmm import fit_gmm

        x = selector.reduce(x)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        fit = fit_gmm(x, K, selector.covariance_type, max_iter=iterations, tol=0.0, reg_covar=selector.reg_covar,
                      seed=0, backend="torch", device=selector.device, batch_size=selector.batch_size)
        loglik, _ = fit.score(x, selector.batch_size, selector.device)
        result["mean_log_likelihood"] = float(loglik.mean())
        result["iterations"] = fit.n_iter
    elif method == "sklearn_kmeans":
        from sklearn.cluster import KMeans

        km = KMeans(K, init="k-means++", n_init=1, max_iter=iterations, tol=0.0, random_state=0).fit(x)
        result["inertia"] = float(km.inertia_)
        result["iterations"] = int(km.n_iter_)
    elif method in ("sklearn_gmm", "sklearn_gmm_fast"):
        from sklearn.mixture import GaussianMixture

        x = selector.reduce(x)  # the rows our GMM is fitted on (after the selector's PCA, if any)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        gmm = GaussianMixture(K, covariance_type=selector.covariance_type, max_iter=iterations, tol=0.0,
                              reg_covar=selector.reg_covar, random_state=0).fit(x)
        result["mean_log_likelihood"] = float(gmm.score(x))
        result["iterations"] = int(gmm.n_iter_)
    else:
        raise SystemExit(f"unknown method {method}")
    result["seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = cpu_seconds() - cpu_start
    result["peak_rss_mb"] = peak_rss_mb()
    result["peak_anon_mb"] = anon.stop_mb()
    return result


def logits_file(features_file: Path) -> Path:
    return features_file.with_name(features_file.name.replace("features", "logits"))


def measure(method: str, features_file: Path, rows_file: Path | None = None, iterations: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--features", str(features_file)]
    if rows_file is not None:
        cmd += ["--rows", str(rows_file)]
    if iterations is not None:
        cmd += ["--iterations", str(iterations)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {method:<18} rows={result['rows']:>8}  {result['seconds']:8.1f} s  cpu {result['cpu_seconds']:8.1f} s  "
          f"peak RSS {result['peak_rss_mb']:7.0f} MB, private {result['peak_anon_mb']:7.0f} MB", flush=True)
    return result


def warm_page_cache(path: Path, block: int = 2**26) -> None:
    """Read the file once, so that the first method measured (lcs_km) does not pay disk reads that the later ones
    are spared: the file fits in RAM, and a later method finds it in the page cache."""
    with open(path, "rb") as f:
        while f.read(block):
            pass


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time, with every run's seconds recorded."""
    middle = dict(sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2])
    middle["runs_seconds"] = [run["seconds"] for run in runs]
    return middle


def sklearn_rows(method: str, features_file: Path, n: int, iterations: int, budget_seconds: float,
                 workdir: Path, probe: int = 20_000) -> Path | None:
    """None (all rows) when scikit-learn fits in the time budget, else a file of subsample row indices."""
    probe = min(n, probe)
    rows = workdir / f"probe_{method}.npy"
    np.save(rows, np.sort(np.random.default_rng(1).choice(n, probe, replace=False)))
    seconds = measure(method, features_file, rows, iterations)["seconds"]
    estimate = seconds * n / probe
    if estimate <= budget_seconds:
        return None
    m = max(probe, int(probe * budget_seconds / seconds))
    print(f"  {method}: about {estimate:.0f} s on all {n} rows; running it on a random subsample of {m} rows")
    sub = workdir / f"rows_{method}.npy"
    np.save(sub, np.sort(np.random.default_rng(2).choice(n, m, replace=False)))
    return sub


def bench_embed(n: int = 5_000, batch_size: int = 512) -> dict:
    """Embed stage vs the bare forward pass of the same model on the same batches (CIFAR-sized images)."""
    import torch

    from ssat.models import SmallCNN
    from ssat.stages.embed import embed_pool

    torch.manual_seed(0)
    model = SmallCNN(in_channels=3, num_classes=10, mean=[0.5] * 3, std=[0.25] * 3).eval()
    images = np.random.default_rng(0).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)

    def bare() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, n, batch_size):
                z = model.features(torch.from_numpy(images[i:i + batch_size]).float().div_(255))
                model.head(z)
        return time.perf_counter() - start

    os.environ["TQDM_DISABLE"] = "1"  # the progress bar would print every batch here

    def stage() -> float:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            embed_pool(model, images, Path(out), batch_size)
            return time.perf_counter() - start

    bare(), stage()  # warm-up
    times = {"bare": [], "embed": []}
    for _ in range(3):  # interleaved, best of three
        times["bare"].append(bare())
        times["embed"].append(stage())
    bare_ips, embed_ips = n / min(times["bare"]), n / min(times["embed"])
    return {"images": n, "bare_forward_images_per_second": bare_ips, "embed_images_per_second": embed_ips,
            "embed_over_bare": embed_ips / bare_ips}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="of the feature file")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path,
                        help="where the feature file is written once and reused (default: a temporary folder)")
    parser.add_argument("--sklearn-seconds", type=float, default=120.0,
                        help="subsample for scikit-learn when its estimated time exceeds this")
    parser.add_argument("--gmm-iterations", type=int, default=20,
                        help="EM iterations of both GMMs in the side-by-side comparison (no early stop)")
    parser.add_argument("--larger-than-ram", action="store_true",
                        help="the pool-larger-than-RAM mode whatever the file's size (to try it on a small file)")
    parser.add_argument("--no-release-gmm", action="store_true",
                        help="skip lcs_gmm's default end to end on every raw row (20 minutes at 1M x 512 on 2 "
                             "cores); its fit is still compared with scikit-learn's on the same rows")
    parser.add_argument("--embed", action="store_true", help="also measure embed throughput against bare forward")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--features", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.features, args.rows, args.iterations)))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        # with --workdir the files are kept there for later runs; else they go with the temporary folder
        data_dir = args.workdir or workdir
        features_file = data_dir / f"features_{args.n}x{args.dim}_{args.dtype}.npy"
        if features_file.exists():
            print(f"features: reusing {features_file}")
        else:
            start = time.perf_counter()
            make_features(features_file, logits_file(features_file), args.n, args.dim, args.dtype)
            print(f"features: written in {time.perf_counter() - start:.0f} s", flush=True)
        file_mb = features_file.stat().st_size / 2**20
        ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
        print(f"features: {args.n} x {args.dim} {args.dtype}, {file_mb:.0f} MB; {ram_mb:.0f} MB of RAM; "
              f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}", flush=True)
        report: dict = {"n": args.n, "dim": args.dim, "dtype": args.dtype, "feature_file_mb": file_mb,
                        "ram_mb": ram_mb, "cpus": os.cpu_count(), "methods": {}}
        methods = report["methods"]
        if file_mb > ram_mb / 2 or args.larger_than_ram:
            larger_than_ram(features_file, methods)
            report["anon_limit_mb"] = ANON_LIMIT_MB
            summary(report, args.json)
            return
        report["memory_limit_mb"] = 1.5 * file_mb + 1024
        warm_page_cache(features_file)

        print("lcs_km (k-means++ restarts on a 100k sample by FAISS, then streamed Lloyd passes) against "
              "scikit-learn KMeans (k-means++):")
        methods["ours_lcs_km"] = measure("ours_lcs_km", features_file)
        methods["ours_lcs_km_sample"] = measure("ours_lcs_km_sample", features_file)
        iterations = methods["ours_lcs_km"]["iterations"]
        rows = sklearn_rows("sklearn_kmeans", features_file, args.n, iterations, args.sklearn_seconds, workdir)
        methods["sklearn_kmeans"] = measure("sklearn_kmeans", features_file, rows, iterations)
        if rows is not None:
            methods["ours_lcs_km_same_rows"] = measure("ours_lcs_km", features_file, rows)
        same = methods.get("ours_lcs_km_same_rows", methods["ours_lcs_km"])
        sk = methods["sklearn_kmeans"]
        sk["ours_seconds_over_sklearn"] = same["seconds"] / sk["seconds"]
        sk["ours_cpu_seconds_over_sklearn"] = same["cpu_seconds"] / sk["cpu_seconds"]
        sk["inertia_ours_over_sklearn"] = same["inertia"] / sk["inertia"]

        iterations = args.gmm_iterations
        print(f"lcs_gmm (torch EM) against scikit-learn GaussianMixture, {iterations} iterations each:")
        if not args.no_release_gmm:
            methods["ours_lcs_gmm"] = measure("ours_lcs_gmm", features_file)
        methods["ours_lcs_gmm_fast"] = measure("ours_lcs_gmm_fast", features_file)
        for suffix in ("", "_fast"):
            # raw 512-d full covariance: a probe of 10,000 rows (1,000 per component) already costs scikit-learn
            # about a minute; on the reduced rows the usual probe
            probe = 20_000 if suffix else 10_000
            rows = sklearn_rows(f"sklearn_gmm{suffix}", features_file, args.n, iterations, args.sklearn_seconds,
                                workdir, probe)
            sk = measure(f"sklearn_gmm{suffix}", features_file, rows, iterations)
            same = measure(f"ours_gmm_fit{suffix}", features_file, rows, iterations)
            if sk["seconds"] < REPEAT_BELOW_SECONDS:  # short runs vary (22-29 s and 2.4-3.3 s here): medians
                sk = median_run([sk, *(measure(f"sklearn_gmm{suffix}", features_file, rows, iterations)
                                       for _ in range(2))])
                same = median_run([same, *(measure(f"ours_gmm_fit{suffix}", features_file, rows, iterations)
                                           for _ in range(2))])
            methods[f"sklearn_gmm{suffix}"], methods[f"ours_gmm_fit{suffix}_same_rows"] = sk, same
            sk["sklearn_seconds_over_ours"] = sk["seconds"] / same["seconds"]
            sk["sklearn_cpu_seconds_over_ours"] = sk["cpu_seconds"] / same["cpu_seconds"]
            sk["loglik_relative_difference"] = abs(same["mean_log_likelihood"] - sk["mean_log_likelihood"]) / abs(
                sk["mean_log_likelihood"])

        if args.embed:
            print("embed stage against the bare forward pass:")
            report["embed"] = bench_embed()
    summary(report, args.json)


def larger_than_ram(features_file: Path, methods: dict) -> None:
    """Every selector on the memory-mapped pool. lcs_km's first pass is max_passes=1 (the sample's centroids, every
    row assigned once): its objective is the first of those printed, so that variant is not run apart."""
    print("pool larger than RAM: every method on the memory-mapped file, peak private memory against "
          f"{ANON_LIMIT_MB} MB")
    for method in ("ours_random", "ours_pcs", "ours_lcs_km", "ours_lcs_gmm_fast"):
        methods[method] = measure(method, features_file)


def summary(report: dict, json_file: Path | None) -> None:
    methods = report["methods"]
    print("\nmethod                          rows   seconds  cpu seconds  peak RSS MB  private MB  objective")
    for name, m in methods.items():
        objective = m.get("inertia", m.get("mean_log_likelihood"))
        print(f"{name:<28}{m['rows']:>10}  {m['seconds']:8.1f}  {m['cpu_seconds']:11.1f}  {m['peak_rss_mb']:11.0f}  "
              f"{m['peak_anon_mb']:10.0f}  {'' if objective is None else f'{objective:.6g}'}")
    for name in ("ours_lcs_km", "ours_lcs_km_sample"):
        if name in methods:
            m = methods[name]
            print(f"{name}: {m['passes']} streamed passes over every row, inertia after each: "
                  f"{', '.join(f'{v:.7g}' for v in m['pass_inertia'])}")
    if "anon_limit_mb" in report:
        worst = max(m["peak_anon_mb"] for m in methods.values())
        print(f"largest peak private memory {worst:.0f} MB against the {report['anon_limit_mb']} MB limit: "
              f"{'within' if worst < report['anon_limit_mb'] else 'OVER'}")
    else:
        km = methods["sklearn_kmeans"]
        print(f"\nlcs_km end to end / sklearn KMeans fit: {km['ours_seconds_over_sklearn']:.2f}x time (cpu "
              f"{km['ours_cpu_seconds_over_sklearn']:.2f}x) on {km['rows']} rows (target <= 0.5); "
              f"inertia ours/sklearn {km['inertia_ours_over_sklearn']:.6f}")
        for suffix, what in (("", "raw features (the default)"),
                             ("_fast", "PCA 64, 200k fit rows (the fast option)")):
            gmm = methods[f"sklearn_gmm{suffix}"]
            print(f"lcs_gmm on {what}: sklearn/ours time {gmm['sklearn_seconds_over_ours']:.1f}x (cpu "
                  f"{gmm['sklearn_cpu_seconds_over_ours']:.1f}x) on {gmm['rows']} rows at "
                  f"{gmm['iterations']} iterations; mean log-likelihood differs by "
                  f"{100 * gmm['loglik_relative_difference']:.2g}%")
        print(f"memory limit (1.5 x feature file + 1 GB): {report['memory_limit_mb']:.0f} MB")
    if "embed" in report:
        e = report["embed"]
        print(f"embed: {e['embed_images_per_second']:.0f} img/s vs bare forward {e['bare_forward_images_per_second']:.0f}"
              f" img/s ({100 * e['embed_over_bare']:.1f}%)")
    if json_file:
        json_file.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
