"""The GPU check: one command that measures the GPU path and runs every stage on it, printing one JSON.

    experiments/gpu_check.sh                # on a GPU machine (meant to take under 8 minutes on one GPU)
    experiments/gpu_check.sh --tiny         # the same parts at the CPU test's sizes (tests/test_gpu_check.py)

Four parts, each timed; progress goes to stderr, the JSON to stdout (and to --json):

- training: SSAT TRADES-10 throughput of WRN-28-10 (experiment=cifar10_paper's model, attack and batch) in bf16 with
  channels_last (trainer=gpu), through ssat's Lightning module and a plain PyTorch loop on the same batches, in
  interleaved rounds (experiments/bench_training.py's two sides);
- kmeans: lcs_km (FAISS k-means, on the GPU with the faiss-gpu build, else FAISS on the CPU) end to end on a
  memory-mapped file of clustered synthetic features, 1M x 640 (WRN-28-10's feature width);
- gmm: lcs_gmm's torch EM (the release's method: full covariance, raw features, every row) on the same file;
- stages: one batch of every stage of `experiment=cifar10_paper trainer=gpu` (AutoAttack included) through
  `python -m ssat.run`, on real CIFAR-10 images from the shared JPEG archive in the official format and an npz pool.

Without a CUDA device the parts run on the CPU (trainer=cpu with the same bf16 autocast) and say so. Exit status 1
when a part failed (its error is in the JSON), else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "experiments"), str(ROOT / "tests")]

# Sizes of a GPU run, and of the CPU test's (--tiny): a WRN-10-1 instead of WRN-28-10, a few batches and rows.
FULL = {"batch": 256, "batches": 20, "warmup": 4, "rounds": 2, "attack_steps": 10, "rows": 1_000_000, "dim": 640,
        "gmm_iter": 20, "per_class": 100, "stage_batch": 64, "autoattack_points": 16, "model": []}
TINY = {"batch": 8, "batches": 3, "warmup": 1, "rounds": 1, "attack_steps": 1, "rows": 4000, "dim": 32,
        "gmm_iter": 3, "per_class": 4, "stage_batch": 4, "autoattack_points": 0,
        "model": ["model.depth=10", "model.widen_factor=1"]}


def log(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


def timed(name: str, part: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The part's figures and its seconds; an exception becomes the part's error instead of ending the check."""
    log(f"{name} ...")
    start = time.perf_counter()
    try:
        out = part()
    except Exception as err:  # every part reports, whatever one of them hit
        traceback.print_exc(file=sys.stderr)
        out = {"error": f"{type(err).__name__}: {err}"}
    out["seconds"] = round(time.perf_counter() - start, 1)
    log(f"{name} done in {out['seconds']} s")
    return out


def trainer_overrides(gpu: bool) -> list[str]:
    """trainer=gpu (bf16 autocast, channels_last), or on a CPU the same autocast."""
    return ["trainer=gpu"] if gpu else ["trainer=cpu", "trainer.precision=bf16-mixed"]


def write_data(root: Path, per_class: int) -> tuple[Path, Path]:
    """CIFAR-10 in the official python format and an npz pool (N x H x W x C uint8 with labels, as the 1M DDPM
    set), from real images of the shared archive: per_class training and per_class // 10 (at least 1) test images."""
    from cifar_archive import pixels_and_labels, read_cifar_jpegs, write_cifar10

    jpegs = read_cifar_jpegs(per_class_train=per_class, per_class_test=max(1, per_class // 10))
    write_cifar10(root / "cifar10", jpegs)
    x, y = pixels_and_labels(jpegs, "train")
    np.savez(root / "pool.npz", image=x.transpose(0, 2, 3, 1), label=y)
    return root / "cifar10", root / "pool.npz"


def training(sizes: dict, gpu: bool, data: tuple[Path, Path], work: Path) -> dict[str, Any]:
    from bench_training import Bench, interleaved_rounds

    images = data[1]
    val = max(10, int(np.load(images)["label"].size * 0.1))
    overrides = ["experiment=cifar10_paper", *trainer_overrides(gpu), *sizes["model"], f"dataset.root={data[0]}",
                 f"pool.paths={images}", f"cache_dir={work / 'cache'}", f"val_size={val}",
                 f"ssat.batch_size={sizes['batch']}", f"attack.steps={sizes['attack_steps']}"]
    bench = Bench(overrides, sizes["batches"], sizes["warmup"], work)
    torch.manual_seed(bench.cfg.seed)
    rounds = interleaved_rounds(bench, sizes["rounds"])
    lightning = float(np.median([r["lightning"] for r in rounds]))
    plain = float(np.median([r["plain"] for r in rounds]))
    cfg = bench.cfg
    return {"model": f"WideResNet-{cfg.model.depth}-{cfg.model.widen_factor}",
            "attack": f"{cfg.attack.name}-{cfg.attack.steps}", "precision": str(cfg.trainer.precision),
            "channels_last": bool(cfg.trainer.channels_last) and gpu, "batch_size": cfg.ssat.batch_size,
            "batches_timed_per_round": sizes["batches"] - sizes["warmup"], "rounds": rounds,
            "lightning_images_per_s": round(lightning, 1), "plain_images_per_s": round(plain, 1),
            "lightning_over_plain": round(lightning / plain, 3)}


def features_file(sizes: dict, work: Path) -> tuple[Path, Path]:
    """The benchmark's clustered features (rows x dim, float32) and their logits, memory-mapped files."""
    from bench_selection import make_features

    path = work / f"features_{sizes['rows']}x{sizes['dim']}.npy"
    make_features(path, path.with_name("logits.npy"), n=sizes["rows"], dim=sizes["dim"])
    return path, path.with_name("logits.npy")


def selector_score(name: str, files: tuple[Path, Path], overrides: list[str]) -> tuple[Any, float]:
    """The selector of the config tree scoring the memory-mapped features end to end, and its seconds."""
    from bench_selection import compose_selector

    from ssat.selection import PoolEmbedding

    selector = compose_selector(name, ["dataset.num_classes=10", *overrides])
    pool = PoolEmbedding(*(np.load(path, mmap_mode="r") for path in files))
    start = time.perf_counter()
    selector.score(pool, seed=0)
    return selector, time.perf_counter() - start


def kmeans(files: tuple[Path, Path]) -> dict[str, Any]:
    import faiss

    selector, seconds = selector_score("lcs_km", files, [])
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return {"backend": f"faiss on {gpus} GPU(s)" if gpus else "faiss on the CPU", "faiss": faiss.__version__,
            "k": selector.n_clusters, "niter": selector.niter, "nredo": selector.nredo,
            "score_seconds": round(seconds, 2), "inertia": selector.fitted_.inertia}


def gmm(files: tuple[Path, Path], max_iter: int) -> dict[str, Any]:
    selector, seconds = selector_score("lcs_gmm", files, [f"selector.max_iter={max_iter}"])
    fit = selector.fitted_
    return {"device": "cuda" if torch.cuda.is_available() else "cpu", "covariance": selector.covariance_type,
            "components": selector.n_components, "iterations": fit.n_iter, "converged": bool(fit.converged),
            "score_seconds": round(seconds, 2), "mean_log_likelihood": fit.mean_log_likelihood}


def stages(sizes: dict, gpu: bool, data: tuple[Path, Path], work: Path) -> dict[str, Any]:
    """`python -m ssat.run experiment=cifar10_paper trainer=gpu` with every stage shrunk to one batch."""
    b = sizes["stage_batch"]
    autoattack = (["eval.autoattack.enabled=true", f"eval.autoattack.num_points={sizes['autoattack_points']}"]
                  if sizes["autoattack_points"] else ["eval.autoattack.enabled=false"])
    limits = ["val_size=10", f"test_size={b}", "intermediate.epochs=1", "ssat.epochs=1",
              f"intermediate.batch_size={b}", f"ssat.batch_size={b}", "ssat.batches_per_epoch=1",
              "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1", f"eval.batch_size={b}",
              f"embed.batch_size={b * 8}", f"attack.steps={sizes['attack_steps']}", "eval.val_pgd.steps=1",
              f"eval.sanity.num_points={b}", "eval.sanity.noise_samples=1", "selector.nredo=1", *autoattack]
    if not gpu:
        limits.append("eval.pgd.steps=1")
    run_dir = work / "run"
    command = [sys.executable, "-m", "ssat.run", "experiment=cifar10_paper", *trainer_overrides(gpu),
               *sizes["model"], f"dataset.root={data[0]}", f"pool.paths={data[1]}", *limits,
               f"hydra.run.dir={run_dir}", f"cache_dir={work / 'stage_cache'}"]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": path})
    if proc.returncode != 0:
        raise RuntimeError(f"ssat.run exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    r = json.loads((run_dir / "results.json").read_text())
    return {"command": " ".join(command[1:]), "stage_seconds": r["timings"], "sizes": r["sizes"],
            "clean_acc": r["clean_acc"], "robust_acc": r["robust_acc"], "autoattack_acc": r["autoattack_acc"],
            "sanity_passed": r["sanity_passed"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the CPU test's sizes (a WRN-10-1, a few batches)")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    for key, value in FULL.items():
        if key != "model":
            parser.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"(default {value}; --tiny: {TINY[key]})")
    args = parser.parse_args()
    sizes = {key: value if getattr(args, key, None) is None else getattr(args, key)
             for key, value in (TINY if args.tiny else FULL).items()}
    gpu = torch.cuda.is_available()
    import warnings

    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ssat-gpu-check-") as tmp:
        work = Path(tmp)
        data = write_data(work, sizes["per_class"])
        features = features_file(sizes, work)
        rows = {"rows": sizes["rows"], "dim": sizes["dim"]}
        device = torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads): no CUDA device"
        report = {
            "device": device, "torch": torch.__version__, "tiny": args.tiny,
            "sizes": {k: v for k, v in sizes.items() if k != "model"},
            "training": timed("training", lambda: training(sizes, gpu, data, work / "training")),
            "kmeans": timed("kmeans", lambda: {**rows, **kmeans(features)}),
            "gmm": timed("gmm", lambda: {**rows, **gmm(features, sizes["gmm_iter"])}),
            "stages": timed("stages", lambda: stages(sizes, gpu, data, work / "stages")),
        }
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    report["failed"] = [part for part in ("training", "kmeans", "gmm", "stages") if "error" in report[part]]
    text = json.dumps(report, default=float)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
