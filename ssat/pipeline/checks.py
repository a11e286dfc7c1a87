"""Config errors that can be caught before any data is read."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ssat.attacks import LOSSES
from ssat.attacks.autoattack import VERSIONS
from ssat.errors import ConfigError
from ssat.lightning import EMA
from ssat.selection.target import selection_target


def missing_keys(tree: Any, prefix: str = ""):
    """Dotted keys whose value is still Hydra's "???" (a value the user must give)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from missing_keys(value, f"{prefix}{key}.")
    elif tree == "???":
        yield prefix.rstrip(".")


def check_config(cfg: DictConfig) -> None:
    """Config errors that can be caught before any data is read."""
    missing = sorted(missing_keys(OmegaConf.to_container(cfg, resolve=False)))
    if missing:
        raise ConfigError(f"{missing[0]} must be set, for example {missing[0]}=<value> on the command line")
    if not isinstance(cfg.budget, (int, float)) or not 0 < cfg.budget <= 1:
        raise ConfigError(f"budget={cfg.budget} is outside (0, 1]: it is the fraction of the pool to select")
    fraction = cfg.selector.get("boundary_fraction")
    if fraction is not None and not 0 <= fraction <= 1:
        raise ConfigError(f"selector.boundary_fraction={fraction} is outside [0, 1]")
    if not 0 <= cfg.ssat.unsup_fraction < 1:
        raise ConfigError(f"ssat.unsup_fraction={cfg.ssat.unsup_fraction} is outside [0, 1)")
    selection_target(cfg.selection.target)
    for stage in ("intermediate", "ssat"):
        if cfg[stage].epochs < 1:
            raise ConfigError(f"{stage}.epochs={cfg[stage].epochs} must be at least 1")
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={cfg.trainer.accelerator} but no CUDA device is visible; "
                          f"use trainer=cpu")
    if cfg.loader.num_workers < 0:
        raise ConfigError(f"loader.num_workers={cfg.loader.num_workers} must not be negative")
    if cfg.ssat.ema.decay is not None:
        EMA(**cfg.ssat.ema)  # its own checks, now rather than after the intermediate model has trained
    patience = cfg.ssat.early_stopping.patience
    if patience is not None and patience < 1:
        raise ConfigError(f"ssat.early_stopping.patience={patience} must be at least 1 (null: no early stopping)")
    check_eval_config(cfg.eval)


def check_eval_config(ev: DictConfig) -> None:
    for key in ("pgd", "val_pgd"):
        pgd = ev[key]
        if pgd.loss not in LOSSES:
            raise ConfigError(f"eval.{key}.loss={pgd.loss!r} is not one of {', '.join(LOSSES)}")
        if pgd.restarts < 1:
            raise ConfigError(f"eval.{key}.restarts={pgd.restarts} must be at least 1")
        if pgd.restarts > 1 and not pgd.random_start:
            raise ConfigError(f"eval.{key}.restarts={pgd.restarts} needs eval.{key}.random_start=true "
                              f"(restarts without a random start repeat the same attack)")
    if ev.chunk_size < 1:
        raise ConfigError(f"eval.chunk_size={ev.chunk_size} must be at least 1")
    if ev.autoattack.version not in VERSIONS:
        raise ConfigError(f"eval.autoattack.version={ev.autoattack.version!r} is not one of {', '.join(VERSIONS)}")
    if ev.autoattack.num_points is not None and ev.autoattack.num_points < 1:
        raise ConfigError(f"eval.autoattack.num_points={ev.autoattack.num_points} must be at least 1 (null: all)")
    scales = list(ev.sanity.eps_scales)
    if len(set(scales)) < 2 or min(scales) <= 0:
        raise ConfigError(f"eval.sanity.eps_scales={scales} must hold at least two distinct positive factors of "
                          f"eval.pgd.eps")
    if ev.sanity.num_points < 1:
        raise ConfigError(f"eval.sanity.num_points={ev.sanity.num_points} must be at least 1")
