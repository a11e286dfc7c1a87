"""The config's schema: the type and allowed range of every value in the top-level blocks, checked before any work.

Each block of ``conf/config.yaml`` is a dataclass below; a field's type is what the value must be (``int``,
``float``, ``bool``, ``str``, ``X | None``, ``list[X]``, a nested block, or ``dict`` for a mapping passed on whole)
and its metadata the allowed range (``between``) or choices (``one_of``). ``check_schema`` walks the composed
config against ``Config`` and raises one ConfigError naming the first bad key as the user types it. What one value
cannot say alone (restarts need a random start) is checked in ``check_relations``, and that the trainer's GPU is
visible in ``check_devices`` (where the job runs: a SLURM sweep is checked on a login node that may have none).
"""

from __future__ import annotations

import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssat.choices import (AUTOATTACK_VERSIONS, EMBED_DTYPES, PGD_LOSSES, PSEUDO_LABELS, SAMPLERS, SCHEDULES,
                          SELECTION_TARGETS)
from ssat.errors import ConfigError


def between(low: float | None = None, high: float | None = None, *, open_low: bool = False, open_high: bool = False,
            why: str = "") -> dict:
    """A number's allowed range; None is unbounded on that side."""
    return {"range": (low, high, open_low, open_high), "why": why}


def one_of(choices, why: str = "") -> dict:
    return {"choices": tuple(choices), "why": why}


def at_least(low: float, why: str = "") -> dict:
    return between(low, why=why)


POSITIVE = at_least(1)


@dataclass
class Optim:
    lr: float = field(metadata=between(0, open_low=True))
    momentum: float = field(metadata=between(0, 1))
    weight_decay: float = field(metadata=at_least(0))
    nesterov: bool
    schedule: str = field(metadata=one_of(SCHEDULES))
    milestones: list[int] = field(metadata=POSITIVE)
    gamma: float = field(metadata=between(0, open_low=True))
    norm_weight_decay: bool


@dataclass
class Selection:
    target: str = field(metadata=one_of(SELECTION_TARGETS))


@dataclass
class Loader:
    num_workers: int = field(metadata=at_least(0))
    pin_memory: bool


@dataclass
class Intermediate:
    epochs: int = field(metadata=POSITIVE)
    batch_size: int = field(metadata=POSITIVE)
    adversarial: bool
    optim: Optim
    checkpoint: str | None  # a file, read in ssat.checkpoints



@dataclass
class Embed:
    batch_size: int = field(metadata=POSITIVE)
    dtype: str = field(metadata=one_of(EMBED_DTYPES))


@dataclass
class Ema:
    decay: float | None = field(metadata=between(0, 1, open_high=True, why="null turns the EMA off"))
    warmup: int = field(metadata=POSITIVE)
    start: float = field(metadata=between(0, 1, open_high=True))


@dataclass
class EarlyStopping:
    patience: int | None = field(metadata=at_least(1, why="null: no early stopping"))


@dataclass
class Ssat:
    epochs: int = field(metadata=POSITIVE)
    batch_size: int = field(metadata=POSITIVE)
    unsup_fraction: float = field(metadata=between(0, 1, open_high=True))
    batches_per_epoch: int | None = field(metadata=at_least(1, why="null: one pass over labeled + selected"))
    optim: Optim
    ema: Ema
    early_stopping: EarlyStopping
    pseudo_labels: str = field(metadata=one_of(PSEUDO_LABELS))
    pseudo_label_temperature: float = field(metadata=between(0, open_low=True))


@dataclass
class Pgd:
    eps: float = field(metadata=at_least(0))
    alpha: float = field(metadata=at_least(0))
    steps: int = field(metadata=at_least(0))
    random_start: bool
    loss: str = field(metadata=one_of(PGD_LOSSES))
    restarts: int = field(metadata=POSITIVE)


@dataclass
class AutoAttack:
    enabled: bool
    version: str = field(metadata=one_of(AUTOATTACK_VERSIONS))
    eps: float = field(metadata=at_least(0))
    num_points: int | None = field(metadata=at_least(1, why="null: all"))


@dataclass
class Sanity:
    num_points: int = field(metadata=POSITIVE)
    eps_scales: list[float] = field(metadata=between(0, open_low=True))
    noise_samples: int = field(metadata=at_least(0))
    tolerance: float = field(metadata=at_least(0))


@dataclass
class Eval:
    batch_size: int = field(metadata=POSITIVE)
    chunk_size: int = field(metadata=POSITIVE)
    pgd: Pgd
    val_pgd: Pgd
    autoattack: AutoAttack
    sanity: Sanity


@dataclass
class Pretrain:
    epochs: int = field(metadata=POSITIVE)
    batch_size: int = field(metadata=POSITIVE)
    lr: float = field(metadata=between(0, open_low=True))
    images: str  # one of ssat.stages.generate.PRETRAIN_IMAGES, checked there
    seed: int


@dataclass
class Finetune:
    epochs: int = field(metadata=POSITIVE)
    batch_size: int = field(metadata=POSITIVE)
    lr: float = field(metadata=between(0, open_low=True))
    bank_size: int = field(metadata=POSITIVE)


@dataclass
class Sampler:
    scheduler: str = field(metadata=one_of(SAMPLERS))
    num_inference_steps: int | None = field(metadata=at_least(1, why="null: the training step count"))
    batch_size: int = field(metadata=POSITIVE)


@dataclass
class Generation:
    lam: float = field(metadata=at_least(0, why="0 is plain fine-tuning"))
    classifier: str  # "intermediate" or a file, read in ssat.checkpoints
    pretrained: str | None
    unet: dict  # UNet2DModel's own arguments, checked by diffusers when the UNet is built
    pretrain: Pretrain
    finetune: Finetune
    num_images: int = field(metadata=POSITIVE)
    budget_of: int | None = field(metadata=at_least(1, why="null: num_images"))
    plain_fraction: float = field(metadata=between(0, 1))
    sampler: Sampler


@dataclass
class Config:
    """The top-level blocks the schema covers; the groups (dataset, pool, model, selector, ...) check their own."""
    seed: int = field(metadata=between(0, 2**32 - 1))
    budget: float = field(metadata=between(0, 1, open_low=True, why="it is the fraction of the pool to select"))
    val_size: int = field(metadata=POSITIVE)
    test_size: int | None = field(metadata=at_least(1, why="null: the whole test set"))
    cache_dir: str
    selection: Selection
    loader: Loader
    intermediate: Intermediate
    embed: Embed
    ssat: Ssat
    eval: Eval
    generation: Generation


def shown(value: Any) -> str:
    """A value as the user would type it after ``key=``."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return repr(value) if isinstance(value, str) else str(value).replace("None", "null")


def _interval(low, high, open_low, open_high) -> str:
    if high is None:
        return f"{'greater than' if open_low else 'at least'} {low}"
    if low is None:
        return f"{'less than' if open_high else 'at most'} {high}"
    return f"outside {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


def _type_name(kind) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        kind, "a block of keys" if is_dataclass(kind) else str(kind))


def _fail(key: str, value: Any, problem: str, why: str = "") -> None:
    raise ConfigError(f"{key}={shown(value)} {problem}{f' ({why})' if why else ''}")


def _check_value(key: str, value: Any, kind, meta: dict) -> None:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if value is None:
            _fail(key, value, f"must be {_type_name(kind)}", meta.get("why", ""))
    if origin is list:
        if not isinstance(value, ListConfig):
            _fail(key, value, f"must be a list, e.g. {key}=[1,2]")
        for i, item in enumerate(value):
            _check_value(f"{key}[{i}]", item, args[0], meta)
        return
    if is_dataclass(kind):
        if not isinstance(value, DictConfig):
            _fail(key, value, f"must be {_type_name(kind)} ({', '.join(f.name for f in fields(kind))})")
        check_block(value, kind, f"{key}.")
        return
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          str: lambda v: isinstance(v, str), dict: lambda v: isinstance(v, DictConfig)}[kind]
    if not ok(value):
        _fail(key, value, f"must be {_type_name(kind)}{' (finite)' if isinstance(value, float) else ''}")
    if "choices" in meta and value not in meta["choices"]:
        _fail(key, value, f"is not one of {', '.join(meta['choices'])}", meta["why"])
    if "range" in meta:
        low, high, open_low, open_high = meta["range"]
        below = low is not None and (value <= low if open_low else value < low)
        above = high is not None and (value >= high if open_high else value > high)
        if below or above:
            interval = _interval(low, high, open_low, open_high)
            _fail(key, value, f"is {interval}" if interval.startswith("outside") else f"must be {interval}",
                  meta["why"])


def did_you_mean(key: str, valid, prefix: str = "") -> str:
    """'; did you mean <prefix><name>?' for the valid name closest to a misspelled one (difflib), or ''."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def check_block(node: DictConfig, schema: type, prefix: str = "", known_only: bool = True) -> None:
    """Every key of ``node`` against the dataclass ``schema``: present, of its type and in its range, and with
    ``known_only`` no key the schema does not declare (one added with ``+key=value``)."""
    hints = typing.get_type_hints(schema)
    declared = {f.name: f for f in fields(schema)}
    for key in node if known_only else ():
        if key not in declared:
            raise ConfigError(f"{prefix}{key} is not a config key{did_you_mean(str(key), declared, prefix)}")
    for name, spec in declared.items():
        key = f"{prefix}{name}"
        if name not in node:
            raise ConfigError(f"{key} is missing from the config")
        if OmegaConf.is_missing(node, name):
            raise ConfigError(f"{key} must be set, for example {key}=<value> on the command line")
        try:
            value = node[name]
        except OmegaConfBaseException as err:
            raise ConfigError(f"{key} cannot be resolved: {str(err).splitlines()[0]}") from None
        _check_value(key, value, hints[name], dict(spec.metadata))


def missing_keys(tree: Any, prefix: str = ""):
    """Dotted keys whose value is still Hydra's "???" (a value the user must give)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from missing_keys(value, f"{prefix}{key}.")
    elif tree == "???":
        yield prefix.rstrip(".")


def check_config(cfg: DictConfig, devices_here: bool = True) -> None:
    """Config errors that can be caught before any data is read: values the user must give, then the schema, and
    with ``devices_here`` (the job runs on this machine) the trainer's devices."""
    missing = sorted(missing_keys(OmegaConf.to_container(cfg, resolve=False)))
    if missing:
        raise ConfigError(f"{missing[0]} must be set, for example {missing[0]}=<value> on the command line")
    check_schema(cfg)
    if devices_here:
        check_devices(cfg)


def check_schema(cfg: DictConfig) -> None:
    """The top-level blocks against ``Config``, then the relations between values."""
    check_block(cfg, Config, known_only=False)
    check_relations(cfg)
    check_paths(cfg)


# Paths the loaders read; a path the system cannot even look up fails here naming its key (a missing one is left to
# the loader, which says what it expected to find).
PATH_KEYS = ("cache_dir", "dataset.root", "pool.root", "pool.paths", "intermediate.checkpoint", "generation.classifier")


def check_paths(cfg: DictConfig) -> None:
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        for path in ([] if value is None else value if isinstance(value, ListConfig) else [value]):
            try:
                os.stat(str(path))
            except FileNotFoundError:
                pass
            except OSError as err:
                raise ConfigError(f"{key}={shown(value)} cannot be looked up: {err.strerror}") from None


def check_relations(cfg: DictConfig) -> None:
    """What no single value says: restarts need a random start, scales must differ."""
    for key in ("pgd", "val_pgd"):
        pgd = cfg.eval[key]
        if pgd.restarts > 1 and not pgd.random_start:
            raise ConfigError(f"eval.{key}.restarts={pgd.restarts} needs eval.{key}.random_start=true "
                              f"(restarts without a random start repeat the same attack)")
    scales = list(cfg.eval.sanity.eps_scales)
    if len(set(scales)) < 2:
        raise ConfigError(f"eval.sanity.eps_scales={scales} must hold at least two distinct positive factors of "
                          f"eval.pgd.eps")


def check_devices(cfg: DictConfig) -> None:
    """A GPU trainer needs a visible GPU (torch is imported only to ask, so a bad command line fails without it)."""
    if cfg.trainer.accelerator not in ("gpu", "cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={cfg.trainer.accelerator} but no CUDA device is visible; "
                          f"use trainer=cpu")
