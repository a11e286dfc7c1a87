"""Runs a plan of stages: computes every key in one place, gives each stage its config view and its inputs, and
reuses what the cache holds."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from omegaconf import DictConfig

from ssat.cache import StageCache, StageResult
from ssat.config import build
from ssat.errors import ConfigError, during_work
from ssat.pipeline.stage import Stage, UndeclaredRead, restricted_view, stage_key, values_at

log = logging.getLogger("ssat")


@dataclass
class StageContext:
    """A stage's view of the run: ``cfg`` holds only what it declares (and its inputs declare), ``inputs`` the
    results of the stages it needs, by name; ``run_dir`` is where the run's logs go."""

    cfg: DictConfig
    inputs: dict[str, StageResult]
    run_dir: Path

    @property
    def device(self) -> torch.device:
        """Where the stages outside Lightning (embed, evaluate, sampling) run: the trainer's accelerator when it
        is there (so they read ``trainer.accelerator``)."""
        if self.cfg.trainer.accelerator != "cpu" and torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")

    def trainer_factory(self) -> Callable:
        """make_trainer(stage, out_dir, max_epochs, callbacks, batches_per_epoch): a Lightning Trainer from the
        ``trainer`` group (so a training stage reads ``trainer``) with the run's logger."""
        cfg, log_dir = self.cfg, str(self.run_dir / "logs")

        def make_trainer(stage: str, out_dir: Path, max_epochs: int, callbacks: list, batches_per_epoch: int):
            return build(cfg.trainer, max_epochs=max_epochs, callbacks=callbacks,
                         logger=build(cfg.logger, save_dir=log_dir, name=stage), default_root_dir=str(out_dir),
                         inference_mode=False, use_distributed_sampler=False, enable_model_summary=False,
                         num_sanity_val_steps=0, log_every_n_steps=max(1, min(50, batches_per_epoch)))

        return make_trainer

    def value(self, name: str) -> Any:
        """The in-memory value of an uncached input (the data, the pool)."""
        return self.inputs[name].value

    def path(self, name: str) -> Path:
        """The cache folder of a cached input."""
        return self.inputs[name].path


def order(stages: Iterable[Stage]) -> list[Stage]:
    """The stages with every stage after the ones it needs (the given order where it is free)."""
    by_name = {s.name: s for s in stages}
    done: dict[str, Stage] = {}

    def visit(stage: Stage, path: tuple[str, ...]) -> None:
        if stage.name in done:
            return
        if stage.name in path:
            raise RuntimeError(f"the stages {' -> '.join((*path, stage.name))} need each other")
        for need in stage.needs:
            if need not in by_name:
                raise RuntimeError(f"stage {stage.name} needs {need}, which is not in the plan")
            visit(by_name[need], (*path, stage.name))
        done[stage.name] = stage

    for stage in by_name.values():
        visit(stage, ())
    return list(done.values())


def upstream(stages: list[Stage], target: str) -> list[Stage]:
    """``target`` and every stage it needs, directly or not, in running order."""
    by_name = {s.name: s for s in stages}
    if target not in by_name:
        raise ConfigError(f"stage={target} is not a stage of this run; choose one of: {', '.join(by_name)}")
    wanted, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(by_name[name].needs)
    return [s for s in stages if s.name in wanted]


class Runner:
    """Runs stages in order, each under its key: cached stages through the StageCache, the others in memory.
    ``results`` keeps every stage run so far, so a later call can run the stages that need them."""

    def __init__(self, cfg: DictConfig, cache: StageCache, run_dir: Path):
        self.cfg, self.cache, self.run_dir = cfg, cache, run_dir
        self.by_name: dict[str, Stage] = {}
        self.results: dict[str, StageResult] = {}

    def visible_paths(self, stage: Stage) -> set[str]:
        """The paths a stage may read: its own and, through its inputs, theirs."""
        paths = set(stage.paths(self.cfg))
        for need in stage.needs:
            paths |= self.visible_paths(self.by_name[need])
        return paths

    def keyed(self, stage: Stage, content: Any = None) -> tuple[str, dict[str, Any]]:
        """The stage's key and what it hashes (the values it reads and its inputs' keys; for an uncached stage
        also ``content``, a fingerprint of what it read, such as the data's files)."""
        values = values_at(self.cfg, stage.paths(self.cfg), stage.unkeyed)
        inputs = {need: self.results[need].key for need in stage.needs}
        if content is not None:
            inputs["content"] = content
        return stage_key(stage.name, stage.version, values, inputs), {"reads": values, "inputs": inputs}

    def run(self, stages: list[Stage]) -> dict[str, StageResult]:
        """Runs the given stages (those not run yet), each after the ones it needs."""
        self.by_name.update({s.name: s for s in stages})
        wanted = {s.name for s in stages}
        stages = [s for s in order(self.by_name.values()) if s.name in wanted and s.name not in self.results]
        numbered = [s for s in stages if s.cached]
        for stage in stages:
            ctx = StageContext(restricted_view(self.cfg, self.visible_paths(stage)),
                               {need: self.results[need] for need in stage.needs}, self.run_dir)
            try:
                if stage.cached:
                    log.info("[%d/%d] %s: %s", numbered.index(stage) + 1, len(numbered), stage.name,
                             stage.describe(ctx))
                    key, record = self.keyed(stage)
                    with during_work():
                        result = self.cache.run(stage.name, key, record, lambda out: stage.run(ctx, out),
                                                stage.every_rank)
                    state = "from cache" if result.cached else "done"
                    log.info("    %s %s in %.1f s (%s)", stage.name, state, result.seconds, result.path)
                else:  # the data and the pool: what they find wrong is the input's (exit code 2), not the work's
                    value, content = stage.run(ctx, None)
                    result = StageResult(stage.name, self.keyed(stage, content)[0], None, 0.0, False, {}, value)
            except Exception as err:
                undeclared = _cause(err, UndeclaredRead)
                if undeclared is None:
                    raise
                raise UndeclaredRead(f"stage {stage.name}: {undeclared}") from None
            self.results[stage.name] = result
        return self.results


def _cause(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``err`` or the first exception of type ``kind`` in its chain (OmegaConf and Hydra wrap what they raise)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
