"""Weights & Biases: one W&B run per job (a sweep's jobs never merge), every stage under its own prefix, and the
sweep's report (ssat.report.dashboard) as one more run of its group when the sweep ends.

``logger=wandb`` adds the Hydra callback ``WandbRun`` (it knows the job: config, overrides, sweep, run dir) and
makes ``WandbStageLogger`` each training stage's Lightning logger. The run opens when a stage first logs or when
the job ends, so a config error (a one-line exit before any job ends) costs no W&B run, and ``on_job_end``
always finishes it (a failed job with exit code 1), so the next job of a multirun starts a new one.
"""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ssat.pipeline.summary import RESULTS, RUN_FILES
from ssat.errors import ConfigError

# wandb.init's arguments for this job, set by WandbRun.on_job_start; the run itself once opened.
_job: dict[str, Any] | None = None
_run = None


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return (netrc.netrc().authenticators("api.wandb.ai") or (None,) * 3)[2] is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """WANDB_MODE when set; else online with an API key (env or ``wandb login``), offline without one."""
    return os.environ.get("WANDB_MODE") or ("online" if _has_api_key() else "offline")


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a sweep's jobs: the sweep folder's last two parts (date/time), as unique as the folder."""
    return "/".join(Path(sweep_dir).resolve().parts[-2:])


def current_run():
    """The job's W&B run, opened on first use."""
    global _run
    if _run is None:
        if _job is None:
            raise ConfigError("logger=wandb needs its Hydra callback (hydra.callbacks.wandb): "
                              "run through `python -m ssat.run logger=wandb`")
        import wandb

        _run = wandb.init(**_job)
    return _run


def _flat(prefix: str, info: dict[str, Any]) -> dict[str, Any]:
    """Scalars of a stage record as ``<prefix>/<key>`` (nested dicts joined with '/')."""
    out = {}
    for key, value in info.items():
        if isinstance(value, dict):
            out.update(_flat(f"{prefix}/{key}", value))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[f"{prefix}/{key}"] = value
    return out


def stage_summaries(results: dict[str, Any], cache_dir: Path) -> dict[str, Any]:
    """Every stage's record (its info, seconds, whether it came from the cache) under the stage's prefix."""
    flat = {}
    for stage, key in results["stage_keys"].items():
        record = json.loads((cache_dir / stage / key / "record.json").read_text())
        flat.update(_flat(stage, {**record["info"], "seconds": record["seconds"],
                                  "cached": results["cached"][stage]}))
    for key in ("clean_acc", "robust_acc", "pseudo_label_acc", "total_seconds", "n_selected"):
        flat[key] = results.get(key)
    return flat


def job_config(config: DictConfig) -> dict[str, Any]:
    """The job's config, resolved, without the hydra node: resolving that needs hydra.job.num, a multirun's alone."""
    return {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            for key, value in ((key, config[key]) for key in config if key != "hydra")}


def finish_failed() -> None:
    """A job that ends with a one-line error (no Hydra on_job_end follows) still finishes its open run, failed."""
    global _job, _run
    if _run is not None:
        _run.finish(exit_code=1)
    _job = _run = None


class WandbRun(Callback):
    """Opens (lazily) and always finishes the job's W&B run; logs the stage records, the run's artifacts, its sanity
    checks and selection picture; at a sweep's end, the sweep's report."""

    def __init__(self, project: str = "ssat", entity: str | None = None, group: str | None = None,
                 job_type: str = "pipeline", tags: list[str] | None = None):
        self.project, self.entity, self.group, self.job_type = project, entity, group, job_type
        self.tags = list(tags or [])

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _job, _run
        _run = None
        if rank_zero_only.rank != 0:  # DDP's other processes rerun the command: they log nothing
            _job = None
            return
        hydra = HydraConfig.get()
        sweep = hydra.mode == RunMode.MULTIRUN
        run_dir = Path(hydra.runtime.output_dir)
        name = hydra.job.override_dirname or "defaults"
        _job = {
            "project": self.project,
            "entity": self.entity,
            # The sweep's folder (date/time) groups its jobs; a single run is its own group.
            "group": self.group or (sweep_group(hydra.sweep.dir) if sweep else run_dir.name),
            "job_type": self.job_type,
            "name": f"{hydra.job.num}:{name}" if sweep else name,
            "tags": self.tags,
            "config": job_config(config),
            "dir": str(run_dir),
            "mode": wandb_mode(),
            "reinit": "finish_previous",
        }

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        global _job, _run
        if _job is None:
            return
        try:
            run = current_run()  # a failed job gets its run too: the dashboard shows it failed
            run_dir = Path(_job["dir"])
            if job_return.status == JobStatus.COMPLETED:
                import wandb

                from ssat.report.dashboard import log_job

                results = json.loads((run_dir / RESULTS).read_text())
                run.summary.update(stage_summaries(results, Path(config.cache_dir)))
                log_job(run, results, run_dir)
                artifact = wandb.Artifact(f"results-{run.id}", type="results",
                                          metadata={k: results[k] for k in ("selector", "budget", "seed")})
                for name in RUN_FILES:
                    artifact.add_file(str(run_dir / name))
                run.log_artifact(artifact)
        finally:
            if _run is not None:
                _run.finish(exit_code=0 if job_return.status == JobStatus.COMPLETED else 1)
            _job = _run = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """The sweep's report (table and plots) as a run of its group, once every job has ended."""
        if rank_zero_only.rank != 0:
            return
        from ssat.report.dashboard import Destination, publish_sweep

        sweep_dir = Path(config.hydra.sweep.dir)
        publish_sweep(sweep_dir, Destination(self.project, self.entity, self.group or sweep_group(sweep_dir)))


class WandbStageLogger(Logger):
    """A training stage's Lightning logger: its metrics as ``<stage>/<metric>`` against ``<stage>/step``, its
    hyperparameters under ``<stage>`` in the job's W&B config."""

    def __init__(self, name: str, save_dir: str | None = None):  # save_dir as every logger gets: W&B writes elsewhere
        super().__init__()
        self._stage = name
        self._defined = False

    @property
    def name(self) -> str:
        return self._stage

    @property
    def version(self) -> str | None:
        return _run.id if _run is not None else None

    @property
    @rank_zero_experiment
    def experiment(self):
        run = current_run()
        if not self._defined:
            run.define_metric(f"{self._stage}/step")
            run.define_metric(f"{self._stage}/*", step_metric=f"{self._stage}/step")
            self._defined = True
        return run

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        params = params if isinstance(params, dict) else vars(params)
        self.experiment.config.update({self._stage: {k: str(v) for k, v in params.items()}}, allow_val_change=True)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {f"{self._stage}/{k}": v for k, v in metrics.items()}
        if step is not None:
            row[f"{self._stage}/step"] = step
        self.experiment.log(row)
