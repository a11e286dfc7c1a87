"""The selection pipeline: intermediate -> embed -> select -> pseudo-label -> ssat -> evaluate.

Each stage is computed through the StageCache, keyed by the config that affects it and by its inputs' keys,
so a sweep over selector and budget trains the intermediate model and embeds the pool once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ssat import distributed
from ssat.attacks import CrossEntropyLoss, PGDATLoss
from ssat.attacks.autoattack import MIN_CLASSES as AUTOATTACK_MIN_CLASSES
from ssat.config import build
from ssat.schema import check_config
from ssat.cache import StageCache, StageResult, check_writable, write_json_atomic
from ssat.data.splits import SemiSupervisedData, take_test_subset
from ssat.errors import ConfigError, DataError, during_work
from ssat.data.pools import MemmapImages
from ssat.generation.sampling import IMAGES
from ssat.generation.unet import check_pretrained
from ssat.selection.coreset import CoresetSelector
from ssat.selection.generated import GuidedGeneration
from ssat.selection.target import selection_target
from ssat.stages.embed import embed_pool, load_embedding
from ssat.stages.generate import UNET_DIR, ddpm_finetune, ddpm_pretrain, generated_pool_sizes, sample
from ssat.stages.evaluate import evaluate
from ssat.stages.intermediate import train_intermediate
from ssat.stages.pseudo_label import pseudo_label
from ssat.stages.select import select_pool
from ssat.stages.ssat import train_ssat
from ssat.stages.training import load_weights

log = logging.getLogger("ssat")

STAGES = ("intermediate", "embed", "select", "pseudo_label", "ssat", "evaluate")


def load_data(cfg: DictConfig) -> SemiSupervisedData:
    """The data set through its loader, split into labeled, validation, pool and test; checked against the config."""
    dataset = build(cfg.dataset.loader)
    channels = dataset.train_images.shape[1]
    if channels != cfg.dataset.channels:
        raise DataError(f"dataset.channels={cfg.dataset.channels} but the images have {channels} channels")
    if cfg.dataset.num_classes is None:
        cfg.dataset.num_classes = len(dataset.classes)
    elif cfg.dataset.num_classes != len(dataset.classes):
        raise DataError(f"dataset.num_classes={cfg.dataset.num_classes} but the data set has "
                        f"{len(dataset.classes)} classes")
    return take_test_subset(build(cfg.pool, dataset=dataset, val_size=cfg.val_size), cfg.test_size)


def device_of(cfg: DictConfig) -> torch.device:
    """Where the non-Lightning stages (embed, evaluate) run: the trainer's accelerator when it is present."""
    if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def trainer_factory(cfg: DictConfig, run_dir: Path):
    """Builds a Lightning Trainer from the trainer and logger groups for one training stage."""

    def make_trainer(stage: str, out_dir: Path, max_epochs: int, callbacks: list, batches_per_epoch: int):
        logger = build(cfg.logger, save_dir=str(run_dir / "logs"), name=stage)
        return build(cfg.trainer, max_epochs=max_epochs, callbacks=callbacks, logger=logger,
                           default_root_dir=str(out_dir), inference_mode=False, use_distributed_sampler=False,
                           enable_model_summary=False, num_sanity_val_steps=0,
                           log_every_n_steps=max(1, min(50, batches_per_epoch)))

    return make_trainer


def build_model(cfg: DictConfig):
    return build(cfg.model)


def model_name(cfg: DictConfig) -> str:
    """The model group's option (wrn28_10, not WideResNet, which wrn34_10 also builds) under Hydra, else the
    class. (Not a ``name`` key in the model's config: that config is also instantiated whole, e.g. by
    ``selector.model: ${model}``.)"""
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("model")
        if choice:
            return choice
    return cfg.model._target_.rsplit(".", 1)[-1]


def _report_stage(result: StageResult) -> None:
    state = "from cache" if result.cached else "done"
    log.info("    %s %s in %.1f s (%s)", result.name, state, result.seconds, result.path)


def run_pipeline(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Runs (or reuses) every stage for this config and writes the run directory's artifacts."""
    started = time.perf_counter()
    check_config(cfg)
    check_writable(cfg.cache_dir, "cache_dir")
    check_writable(run_dir, "hydra.run.dir")
    distributed.launch(cfg.trainer)  # under trainer=ddp the other ranks start here and run all that follows
    data = load_data(cfg)  # first: it fills dataset.num_classes, which selectors may interpolate
    if cfg.eval.autoattack.enabled and data.num_classes < AUTOATTACK_MIN_CLASSES:
        raise ConfigError(f"eval.autoattack.enabled=true needs at least {AUTOATTACK_MIN_CLASSES} classes (APGD-T's "
                          f"targeted DLR loss); the data set has {data.num_classes}: set eval.autoattack.enabled=false")
    selector = build(cfg.selector)
    ssat_loss = build(cfg.attack)
    generative = isinstance(selector, GuidedGeneration)
    if generative:  # a bad DDPM source or setting fails now, not after the intermediate model has trained
        check_generation(cfg, data)
    target = selection_target(cfg.selection.target)
    selector.check(len(target.candidates(data)), target.known_labels(data) is not None)
    n_selected = selector.num_selected(cfg.budget, len(target.candidates(data)))
    cache = StageCache(cfg.cache_dir)
    make_trainer = trainer_factory(cfg, run_dir)
    device = device_of(cfg)
    # pool.labels says which labels the selection trains with: the pseudo_label stage's input, not the data's
    pool_data = {key: value for key, value in OmegaConf.to_container(cfg.pool, resolve=True).items() if key != "labels"}
    data_inputs = {"dataset": cfg.dataset, "pool": pool_data, "val_size": cfg.val_size,
                   "pool_files": getattr(data.pool_images, "fingerprint", None)}
    sizes = data.sizes()
    results: dict[str, StageResult] = {}

    plan = [*(generation_stages(cfg) if generative else ()), *STAGES]

    def run_stage(name: str, what: str, inputs: dict[str, Any], compute, distributed_stage: bool = False):
        """``distributed_stage``: every rank computes it (training, embed); otherwise rank 0 alone."""
        log.info("[%d/%d] %s: %s", len(results) + 1, len(plan), name, what)
        with during_work():
            result = cache.run(name, inputs, compute, distributed_stage)
        _report_stage(result)
        results[name] = result
        return result

    inter_cfg = cfg.intermediate
    inter_loss = PGDATLoss(**{k: v for k, v in cfg.attack.items() if k in ("eps", "alpha", "steps")}) \
        if inter_cfg.adversarial else CrossEntropyLoss()

    def compute_intermediate(out: Path):
        L.seed_everything(cfg.seed, verbose=False)
        return train_intermediate(build_model(cfg), data, out, make_trainer, inter_loss, inter_cfg.epochs,
                                  inter_cfg.batch_size, inter_cfg.optim, cfg.dataset.augment, cfg.eval.batch_size,
                                  cfg.seed, distributed.rank(), distributed.world_size(), dict(cfg.loader))

    intermediate = run_stage(
        "intermediate", f"{model_name(cfg)} on {sizes['labeled']} labeled images, "
        f"{inter_cfg.epochs} epochs",
        {**data_inputs, "model": cfg.model, "intermediate": inter_cfg, "seed": cfg.seed}, compute_intermediate,
        distributed_stage=True)

    def selection_model():
        return load_weights(build_model(cfg), intermediate.path / "model.pt")

    pool_source = None  # the pool comes with the data, unless a guided DDPM generates it
    if generative:
        pool_source, data = generate_pool_stages(cfg, selector, data, data_inputs, intermediate, selection_model,
                                                 run_stage, make_trainer, device)
        sizes = data.sizes()
        n_selected = selector.num_selected(cfg.budget, sizes["pool"])

    candidates = target.candidates(data)
    embedded = run_stage(
        "embed", f"features of {len(candidates)} {target.name} images",
        {"intermediate": intermediate.key, "pool": pool_source, "dtype": cfg.embed.dtype, "target": target.name},
        lambda out: embed_pool(selection_model(), candidates, out, cfg.embed.batch_size, device, cfg.embed.dtype),
        distributed_stage=True)
    pool_embedding = replace(load_embedding(embedded.path), images=candidates, labels=target.known_labels(data))

    selected = run_stage(
        "select", f"{selector.name}, budget {cfg.budget} ({n_selected} of {len(candidates)} {target.name} points)",
        {"embed": embedded.key, "selector": cfg.selector, "n_selected": n_selected, "seed": cfg.seed},
        lambda out: select_pool(selector, pool_embedding, cfg.budget, cfg.seed, out))
    selection = np.load(selected.path / "selection.npy")

    # pool.labels=file (npz pools): the selected pool points train on the files' labels, as the release does
    pool_labels = cfg.pool.get("labels", "intermediate") if target.name == "pool" and not generative else None
    file_labels = data.pool_hidden_labels if pool_labels == "file" else None
    labelled = run_stage(
        "pseudo_label", f"{len(selection)} selected points ({pool_labels or 'true'} labels)",
        {"embed": embedded.key, "select": selected.key, "labels": pool_labels},
        lambda out: pseudo_label(pool_embedding.logits, selection, out, target.hidden_labels(data),
                                 target.known_labels(data), file_labels))
    train_data, train_selection, train_labels = target.training_data(
        data, selection, np.load(labelled.path / "pseudo_labels.npy"))

    ssat_cfg = cfg.ssat
    coreset = selector if isinstance(selector, CoresetSelector) else None  # chosen during SSAT

    def compute_ssat(out: Path):
        L.seed_everything(cfg.seed, verbose=False)
        return train_ssat(build_model(cfg), train_data, train_selection, train_labels, out, make_trainer, ssat_loss,
                          ssat_cfg.epochs, ssat_cfg.batch_size, ssat_cfg.unsup_fraction,
                          ssat_cfg.batches_per_epoch, ssat_cfg.optim, cfg.dataset.augment, cfg.eval.batch_size,
                          dict(cfg.eval.val_pgd), cfg.seed, distributed.rank(), distributed.world_size(),
                          dict(cfg.loader), ema=dict(ssat_cfg.ema) if ssat_cfg.ema.decay is not None else None,
                          patience=ssat_cfg.early_stopping.patience, coreset=coreset, coreset_size=n_selected)

    trained = run_stage(
        "ssat", f"{ssat_loss.name} on {len(train_data.labeled_labels)} labeled + {len(train_selection)} "
        f"pseudo-labeled, {ssat_cfg.epochs} epochs",
        {**data_inputs, "model": cfg.model, "ssat": ssat_cfg, "attack": cfg.attack, "val_pgd": cfg.eval.val_pgd,
         "pseudo_label": labelled.key, "seed": cfg.seed,
         **({"coreset": {"selector": cfg.selector, "size": n_selected}} if coreset else {})}, compute_ssat,
        distributed_stage=True)

    def compute_evaluate(out: Path):
        L.seed_everything(cfg.seed, verbose=False)
        model = load_weights(build_model(cfg), trained.path / "model.pt")
        ev = OmegaConf.to_container(cfg.eval, resolve=True)
        return evaluate(model, data.test_images, data.test_labels, out, ev["batch_size"], ev["pgd"],
                        ev["autoattack"], ev["sanity"], device, ev["chunk_size"], cfg.seed)

    ev = cfg.eval
    evaluated = run_stage(
        "evaluate", f"clean, PGD-{ev.pgd.steps} ({ev.pgd.loss}, {ev.pgd.restarts} restart(s))"
        f"{', AutoAttack ' + ev.autoattack.version if ev.autoattack.enabled else ''} on {sizes['test']} test images"
        f" and sanity checks",
        {"ssat": trained.key, "pgd": ev.pgd, "autoattack": ev.autoattack, "sanity": ev.sanity,
         "test_size": cfg.test_size, "batch_size": ev.batch_size, "chunk_size": ev.chunk_size, "seed": cfg.seed},
        compute_evaluate)
    sanity = evaluated.info["sanity"]
    if not sanity["passed"]:
        log.warning("!!! the evaluation failed its sanity checks: %s (results.json: sanity)",
                    ", ".join(sanity["failed"]))

    summary = {
        "dataset": cfg.dataset.name,
        "selector": selector.name,
        # The whole pool is budget 1 whatever was asked (selector=full ignores the budget); a generated pool is
        # used whole, and its size came from the budget.
        "budget": 1.0 if n_selected == len(candidates) and not generative else cfg.budget,
        "seed": cfg.seed,
        "attack": ssat_loss.name,
        "model": model_name(cfg),
        "target": target.name,
        "sizes": {**sizes, **selected.info},
        "n_pool": sizes["pool"],
        "n_generated": sizes["pool"] if generative else 0,
        "guidance": selector.guidance.describe() if generative else None,  # PCG's sign: paper or release
        "n_selected": selected.info["selected"],
        # equal hashes across reruns show that the same command selects the same pool images
        "selection_sha256": hashlib.sha256(np.ascontiguousarray(selection, dtype=np.int64).tobytes()).hexdigest(),
        "clean_acc": evaluated.info["clean_acc"],
        "robust_acc": evaluated.info["robust_acc"],
        "autoattack_acc": evaluated.info.get("autoattack_acc"),
        "autoattack_num_points": evaluated.info.get("autoattack_num_points"),
        "autoattack_warnings": evaluated.info.get("autoattack_warnings", []),
        "sanity": sanity,
        "sanity_passed": sanity["passed"],
        "pseudo_label_acc": labelled.info.get("pseudo_label_acc"),
        "pool_labels": pool_labels,  # what the selected pool points trained with: intermediate or file (null: no pool)
        "intermediate_val_acc": intermediate.info["best_val"],
        "ssat_epochs": trained.info["epochs"],
        "ssat_best_epoch": trained.info["best_epoch"],
        "ssat_epochs_to_convergence": trained.info["epochs_to_convergence"],
        "ssat_early_stopped": trained.info["early_stopped"],
        "ssat_ema": trained.info["ema"],
        "timings": {name: r.seconds for name, r in results.items()},
        # Choosing points: the select stage, plus a coreset's re-selections inside ssat (counted in its seconds).
        "selection_seconds": selected.seconds + trained.info.get("reselection_seconds", 0.0),
        "reselections": trained.info.get("reselections"),
        # A coreset's epochs (ACS): warm start, skipped epochs, batches per full and per coreset epoch.
        "coreset_schedule": trained.info.get("coreset_schedule"),
        "total_seconds": sum(r.seconds for r in results.values()),
        "cached": {name: r.cached for name, r in results.items()},
        "stage_keys": {name: r.key for name, r in results.items()},
        "stage_dirs": {name: str(r.path) for name, r in results.items()},  # where the report finds the features
        "wall_seconds": time.perf_counter() - started,
    }
    if distributed.rank() == 0:
        write_run_dir(run_dir, results, summary)
    return summary


def generation_stages(cfg: DictConfig) -> tuple[str, ...]:
    """The stages that make the pool of a generative selector, before embed (which labels the samples)."""
    gen = cfg.generation
    return (*(("ddpm_pretrain",) if gen.pretrained is None else ()), "ddpm_finetune", "sample",
            *(("sample_plain",) if gen.plain_fraction > 0 else ()))


# What an unconditional DDPM trained from scratch may learn from: labels are not needed, so the pool may join.
PRETRAIN_IMAGES = {
    "labeled": lambda data: data.labeled_images,
    "labeled_and_pool": lambda data: np.concatenate([data.labeled_images, np.asarray(data.pool_images)]),
}


def check_generation(cfg: DictConfig, data: SemiSupervisedData) -> None:
    gen = cfg.generation
    if gen.pretrained is None and gen.pretrain.images not in PRETRAIN_IMAGES:
        raise ConfigError(f"generation.pretrain.images={gen.pretrain.images!r} is not one of "
                          f"{', '.join(PRETRAIN_IMAGES)}")
    generated_pool_sizes(gen.num_images, gen.plain_fraction, cfg.budget, gen.budget_of)
    _, channels, size, _ = data.labeled_images.shape
    if gen.pretrained is not None:
        check_pretrained(gen.pretrained, size, channels)


def generate_pool_stages(cfg: DictConfig, selector: GuidedGeneration, data: SemiSupervisedData,
                         data_inputs: dict[str, Any], intermediate: StageResult, selection_model, run_stage,
                         make_trainer, device) -> tuple[list[str], SemiSupervisedData]:
    """PCG / LCG: (pretrain,) fine-tune with guidance and sample; the samples become the unlabeled pool."""
    gen = cfg.generation
    n_guided, n_plain = generated_pool_sizes(gen.num_images, gen.plain_fraction, cfg.budget, gen.budget_of)
    if gen.pretrained is None:
        images = PRETRAIN_IMAGES[gen.pretrain.images](data)
        pretrained = run_stage(
            "ddpm_pretrain", f"a small UNet from scratch on {len(images)} {gen.pretrain.images} images, "
            f"{gen.pretrain.epochs} epochs",
            {**data_inputs, "unet": gen.unet, "pretrain": gen.pretrain},
            lambda out: ddpm_pretrain(images, out, make_trainer, OmegaConf.to_container(gen.unet), gen.pretrain.epochs,
                                      gen.pretrain.batch_size, gen.pretrain.lr, gen.pretrain.seed),
            distributed_stage=True)
        source, source_key = str(pretrained.path / UNET_DIR), pretrained.key
    else:
        source = source_key = gen.pretrained

    finetuned = run_stage(
        "ddpm_finetune", f"{selector.name} guidance, lambda {gen.lam}, {gen.finetune.epochs} epochs",
        {"source": source_key, "intermediate": intermediate.key, "guidance": cfg.selector.guidance, "lam": gen.lam,
         "finetune": gen.finetune, "seed": cfg.seed},
        lambda out: ddpm_finetune(data, selection_model(), source, out, make_trainer, selector.guidance, gen.lam,
                                  gen.finetune.epochs, gen.finetune.batch_size, gen.finetune.lr,
                                  gen.finetune.bank_size, cfg.seed, device), distributed_stage=True)
    sampler = gen.sampler

    def sample_from(unet_dir: str, n: int, seed: int):
        return lambda out: sample(unet_dir, out, n, sampler.batch_size, seed, sampler.scheduler,
                                  sampler.num_inference_steps, device)

    parts = [run_stage("sample", f"{n_guided} images from the fine-tuned DDPM ({sampler.scheduler})",
                       {"ddpm": finetuned.key, "n": n_guided, "sampler": sampler, "seed": cfg.seed},
                       sample_from(str(finetuned.path / UNET_DIR), n_guided, cfg.seed), distributed_stage=True)]
    if n_plain > 0:
        parts.append(run_stage("sample_plain", f"{n_plain} images from the DDPM before fine-tuning",
                               {"ddpm": source_key, "n": n_plain, "sampler": sampler, "seed": cfg.seed + 1},
                               sample_from(source, n_plain, cfg.seed + 1), distributed_stage=True))
    pool = MemmapImages([part.path / IMAGES for part in parts])
    return [part.key for part in parts], replace(data, pool_images=pool, pool_hidden_labels=None)


def write_run_dir(run_dir: Path, results: dict[str, StageResult], summary: dict[str, Any]) -> None:
    """results.json, the selection and scores, and links to the checkpoints of the training stages."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("selection.npy", "scores.npy"):
        shutil.copyfile(results["select"].path / name, run_dir / name)
    for stage in ("intermediate", "ssat"):
        link_dir = run_dir / "checkpoints" / stage
        link_dir.mkdir(parents=True, exist_ok=True)
        for ckpt in ("best.ckpt", "last.ckpt"):
            target = results[stage].path / "checkpoints" / ckpt
            link = link_dir / ckpt
            if target.exists() and not link.is_symlink():
                os.symlink(target, link)
    write_json_atomic(run_dir / "results.json", summary)


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
