"""The pipeline's plan: data -> (a generative selector's pool stages) -> intermediate -> embed -> select ->
pseudo_label -> ssat -> evaluate. Each stage is declared in its own module (ssat/stages/); the runner computes
every key and reuses what the cache holds, so a sweep over selector and budget trains the intermediate model and
embeds the pool once. ``+stage=<name>`` runs that stage and what it needs, then stops.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ssat import distributed
from ssat.artifacts import SelectionFiles
from ssat.attacks.autoattack import MIN_CLASSES as AUTOATTACK_MIN_CLASSES
from ssat.cache import StageCache, check_writable
from ssat.checkpoints import ModelFile
from ssat.config import build
from ssat.errors import ConfigError
from ssat.pipeline.runner import Runner, upstream
from ssat.pipeline.stage import Stage
from ssat.schema import check_config
from ssat.pipeline.summary import (RunSummary, format_stages, format_summary, selection_sha256, write_run_dir,
                                   write_stages)
from ssat.selection.target import selection_target
from ssat.stages import embed, evaluate, intermediate, pseudo_label, select, ssat
from ssat.stages.data import DATA, POOL, load_data

__all__ = ["check_config", "format_stages", "format_summary", "load_data", "plan", "run_pipeline"]
log = logging.getLogger("ssat")


def plan(selector, cfg: DictConfig) -> list[Stage]:
    """Every stage of this run, the selector's own pool stages (a guided DDPM's) in place of the data's pool."""
    return [DATA, *intermediate.checkpoint_stages(cfg), *(selector.pool_stages(cfg) or [POOL]),
            intermediate.stage(cfg), embed.STAGE, select.STAGE, pseudo_label.STAGE, ssat.STAGE, evaluate.STAGE]


def run_pipeline(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Runs (or reuses) every stage for this config, or those up to ``cfg.stage``, and writes the run directory."""
    started = time.perf_counter()
    check_config(cfg)
    check_writable(cfg.cache_dir, "cache_dir")
    check_writable(run_dir, "hydra.run.dir")
    distributed.launch(cfg.trainer)  # under trainer=ddp the other ranks start here and run all that follows
    runner = Runner(cfg, StageCache(cfg.cache_dir), run_dir)
    data = runner.run([DATA])["data"].value
    if cfg.dataset.num_classes is None:  # selectors may interpolate it
        cfg.dataset.num_classes = data.num_classes
    selector = build(cfg.selector)
    stages = plan(selector, cfg)
    check_before_work(cfg, selector, stages, data)
    results = runner.run(upstream(stages, cfg.stage) if cfg.get("stage") else stages)
    if cfg.get("stage"):
        log.info("stage %s and what it needs are done\n\n%s\n", cfg.stage, format_stages(results))
        record = write_stages(run_dir, cfg.stage, results) if distributed.rank() == 0 else {"stage": cfg.stage}
        return {**record, "robust_acc": None}
    summary = summarise(cfg, selector, results, time.perf_counter() - started)
    if distributed.rank() == 0:
        write_run_dir(run_dir, results, summary)
    return summary.to_dict()


def model_name(cfg: DictConfig) -> str:
    """The model group's option (wrn28_10, not WideResNet, which wrn34_10 also builds) under Hydra, else the
    class. (Not a ``name`` key in the model's config: that config is also instantiated whole, e.g. by
    ``selector.model: ${model}``.)"""
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("model")
        if choice:
            return choice
    return cfg.model._target_.rsplit(".", 1)[-1]


def check_before_work(cfg: DictConfig, selector, stages: list[Stage], data) -> None:
    """What can be wrong with this run's settings, found before any stage trains."""
    check_autoattack(cfg, data)
    target = selection_target(cfg.selection.target)
    selector.check(len(target.candidates(data)), target.known_labels(data) is not None)
    selector.num_selected(cfg.budget, len(target.candidates(data)))
    for stage in stages:
        if stage.check is not None:
            stage.check(cfg, data)


def check_autoattack(cfg: DictConfig, data) -> None:
    if cfg.eval.autoattack.enabled and data.num_classes < AUTOATTACK_MIN_CLASSES:
        raise ConfigError(f"eval.autoattack.enabled=true needs at least {AUTOATTACK_MIN_CLASSES} classes (APGD-T's "
                          f"targeted DLR loss); the data set has {data.num_classes}: set eval.autoattack.enabled=false")


def summarise(cfg: DictConfig, selector, results: dict, wall_seconds: float) -> RunSummary:
    """results.json from the stages' records."""
    computed = {name: r for name, r in results.items() if r.path is not None}
    sizes = {**results["pool"].value.sizes(), "test": results["evaluate"].info["num_test"]}  # test_size's subset
    selected, trained, evaluated = results["select"].info, results["ssat"].info, results["evaluate"].info
    generative = bool(selector.pool_stages(cfg))
    sanity = evaluated["sanity"]
    if not sanity["passed"]:
        log.warning("!!! the evaluation failed its sanity checks: %s (results.json: sanity)",
                    ", ".join(sanity["failed"]))
    return RunSummary(
        dataset=cfg.dataset.name, selector=selector.name,
        budget=1.0 if selected["selected"] == selected["candidates"] and not generative else cfg.budget,
        seed=cfg.seed, attack=cfg.attack.name, model=model_name(cfg),
        target=cfg.selection.target, sizes={**sizes, **selected}, n_pool=sizes["pool"],
        n_generated=sizes["pool"] if generative else 0, n_selected=selected["selected"],
        guidance=selector.guidance.describe() if generative else None,
        pool_labels=results["pseudo_label"].info.get("pool_labels"),
        coreset_schedule=trained.get("coreset_schedule"),
        selection_sha256=selection_sha256(SelectionFiles.indices(results["select"].path)),
        clean_acc=evaluated["clean_acc"], robust_acc=evaluated["robust_acc"],
        autoattack_acc=evaluated.get("autoattack_acc"), autoattack_num_points=evaluated.get("autoattack_num_points"),
        autoattack_warnings=evaluated.get("autoattack_warnings", []), sanity=sanity, sanity_passed=sanity["passed"],
        pseudo_label_acc=results["pseudo_label"].info.get("pseudo_label_acc"),
        intermediate_val_acc=results["intermediate"].info["best_val"],
        checkpoints={name: {"path": r.value.path, "sha256": r.value.sha256} for name, r in results.items()
                     if isinstance(r.value, ModelFile)}, ssat_epochs=trained["epochs"],
        ssat_best_epoch=trained["best_epoch"], ssat_epochs_to_convergence=trained["epochs_to_convergence"],
        ssat_early_stopped=trained["early_stopped"], ssat_ema=trained["ema"],
        timings={name: r.seconds for name, r in computed.items()},
        selection_seconds=results["select"].seconds + sum(r["seconds"] for r in trained.get("reselections") or []),
        reselections=trained.get("reselections"), total_seconds=sum(r.seconds for r in computed.values()),
        cached={name: r.cached for name, r in computed.items()},
        stage_keys={name: r.key for name, r in computed.items()},
        stage_dirs={name: str(r.path) for name, r in computed.items()}, wall_seconds=wall_seconds)
