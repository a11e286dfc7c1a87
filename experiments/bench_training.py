"""SSAT training throughput: the Lightning module through a real Trainer against a plain PyTorch loop.

    python experiments/bench_training.py --json out.json                       # digits, SmallCNN, CPU
    python experiments/bench_training.py --json out.json trainer=gpu dataset=cifar10 model=wrn28_10 loader.num_workers=4

Trailing arguments are Hydra overrides of the run's config tree (the same data, model, attack, trainer and batch
sampler as `python -m ssat.run`). Both sides train one model from the same initial weights on the same batches
(the SSAT sampler's first epoch at the same seed) with the same TRADES loss, optimizer, augmentation and precision;
the plain loop is what one would write by hand (autocast when the trainer asks for bf16, no Lightning). Rounds
alternate which side runs first, and images/s counts the batches after --warmup of each round (the Trainer's
set-up is not per-step work). Then the Lightning side alone with 0, 1, 2 and 4 data loader workers.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class StepTimer(Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch (device synchronised)."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = self.stop = None
        self.images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()
        if batch_idx >= self.warmup:
            self.images += len(batch[1])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(pl_module.device)
        self.stop = time.perf_counter()

    @property
    def images_per_second(self) -> float:
        return self.images / (self.stop - self.start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module(config_module="ssat.conf", version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


class Bench:
    """The shared parts: config, data, training set, sampler, initial weights and loss."""

    def __init__(self, overrides: list[str], batches: int, warmup: int, workdir: Path):
        from ssat.config import build
        from ssat.data.sampler import SSATBatchSampler
        from ssat.data.training_set import LabeledAndSelected
        from ssat.pipeline import check_config, load_data

        self.cfg = cfg = compose(overrides)
        check_config(cfg)
        data = load_data(cfg)
        rng = np.random.default_rng(cfg.seed)
        n_selected = max(1, round(cfg.budget * len(data.pool_images)))
        selection = np.sort(rng.choice(len(data.pool_images), n_selected, replace=False))
        pseudo = (data.pool_hidden_labels[selection] if data.pool_hidden_labels is not None
                  else np.full(n_selected, -1))
        self.train_set = LabeledAndSelected(data.labeled_images, data.labeled_labels, data.pool_images, selection,
                                            pseudo)
        self.sampler = SSATBatchSampler(self.train_set.num_labeled, n_selected, cfg.ssat.batch_size,
                                        cfg.ssat.unsup_fraction, batches, seed=cfg.seed)
        self.initial = build(cfg.model)
        self.loss = build(cfg.attack)
        self.warmup = warmup
        self.workdir = workdir
        self.build = build

    def lightning(self, num_workers: int) -> float:
        from ssat.lightning import RobustClassifierModule
        from ssat.stages.training import train_loader

        cfg = self.cfg
        module = RobustClassifierModule(copy.deepcopy(self.initial), self.loss, cfg.ssat.optim, cfg.ssat.epochs,
                                        cfg.dataset.augment)
        timer = StepTimer(self.warmup)
        logger = self.build(cfg.logger, save_dir=str(self.workdir / "logs"), name="bench")
        # As the pipeline's trainer (trainer_factory), without checkpoints, validation and the progress bar.
        trainer = self.build(cfg.trainer, max_epochs=1, callbacks=[timer], logger=logger,
                             default_root_dir=str(self.workdir), inference_mode=False, use_distributed_sampler=False,
                             enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False,
                             enable_progress_bar=False, limit_val_batches=0,
                             log_every_n_steps=max(1, min(50, len(self.sampler))))
        loader = train_loader(self.train_set, self.sampler, num_workers, cfg.loader.pin_memory)
        trainer.fit(module, loader)
        return timer.images_per_second

    def plain(self) -> float:
        """The same TRADES steps in a hand-written loop."""
        from ssat.data.augment import augment
        from ssat.lightning.classifier import build_optimizer
        from ssat.stages.training import train_loader

        cfg = self.cfg
        device = torch.device("cuda" if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available() else "cpu")
        model = copy.deepcopy(self.initial).to(device)
        if cfg.trainer.get("channels_last") and device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if cfg.trainer.get("compile"):
            model.compile(**(cfg.trainer.compile if isinstance(cfg.trainer.compile, dict) else {}))
        model.train()
        optimizer, _ = build_optimizer(model, cfg.ssat.epochs, **cfg.ssat.optim)
        bf16 = str(cfg.trainer.precision).startswith("bf16")
        self.sampler.set_epoch(0)  # as Lightning sets it in its first epoch
        loader = train_loader(self.train_set, self.sampler, cfg.loader.num_workers, cfg.loader.pin_memory)
        images, start = 0, None
        for i, (x, y) in enumerate(loader):
            if i == self.warmup:
                sync(device)
                start = time.perf_counter()
            if i >= self.warmup:
                images += len(y)
            x = augment(x.to(device, non_blocking=True).float().div_(255.0), **cfg.dataset.augment)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, _ = self.loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
        return images / (time.perf_counter() - start)


def interleaved_rounds(bench: Bench, rounds: int) -> list[dict[str, float]]:
    """Images/s of each side per round, the side that goes first alternating from round to round."""
    measured = []
    for r in range(rounds):
        order = ("lightning", "plain") if r % 2 == 0 else ("plain", "lightning")
        speeds = {side: bench.lightning(bench.cfg.loader.num_workers) if side == "lightning" else bench.plain()
                  for side in order}
        measured.append(speeds)
        print(f"round {r}: lightning {speeds['lightning']:.1f} img/s, plain {speeds['plain']:.1f} img/s "
              f"({order[0]} first)", file=sys.stderr)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--batches", type=int, default=30, help="batches per measured epoch")
    parser.add_argument("--warmup", type=int, default=4, help="batches of each epoch left out of the timing")
    parser.add_argument("--rounds", type=int, default=10, help="Lightning/plain pairs, alternating which goes first")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2, 4])
    parser.add_argument("--worker-repeats", type=int, default=3, help="epochs per worker count (median)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer=gpu dataset=cifar10")
    args = parser.parse_args()
    if args.batches <= args.warmup:
        parser.error("--batches must exceed --warmup")

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args.overrides, args.batches, args.warmup, Path(tmp))
        cfg = bench.cfg
        torch.manual_seed(cfg.seed)
        rounds = interleaved_rounds(bench, args.rounds)
        workers = {}
        for w in args.workers:
            workers[w] = statistics.median(bench.lightning(w) for _ in range(args.worker_repeats))
            print(f"workers {w}: {workers[w]:.1f} img/s", file=sys.stderr)

    lightning = statistics.median(r["lightning"] for r in rounds)
    plain = statistics.median(r["plain"] for r in rounds)
    ratios = [r["lightning"] / r["plain"] for r in rounds]
    report = {
        "overrides": args.overrides,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
        else f"cpu ({torch.get_num_threads()} threads)",
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "dataset": cfg.dataset.name,
        "attack": {k: cfg.attack[k] for k in ("name", "steps")},
        "precision": str(cfg.trainer.precision),
        "batch_size": cfg.ssat.batch_size,
        "batches_timed_per_epoch": args.batches - args.warmup,
        "rounds": rounds,
        "lightning_images_per_s": lightning,
        "plain_images_per_s": plain,
        "lightning_over_plain": lightning / plain,
        "median_round_ratio": statistics.median(ratios),
        "within_5_percent": statistics.median(ratios) >= 0.95,
        "workers_images_per_s": workers,
    }
    print(f"\nSSAT training throughput, {report['model']} on {report['dataset']}, TRADES-{cfg.attack.steps}, "
          f"batch {cfg.ssat.batch_size}, {report['precision']}, {report['device']}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'':<26}{'images/s':>10}")
    print(f"{'plain PyTorch loop':<26}{plain:>10.1f}")
    print(f"{'SSAT Lightning module':<26}{lightning:>10.1f}")
    print(f"{'ratio (median per round)':<26}{report['median_round_ratio']:>10.3f}"
          f"   {'within' if report['within_5_percent'] else 'NOT within'} 5% of the plain loop")
    for w, speed in workers.items():
        print(f"{f'Lightning, {w} workers':<26}{speed:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
