"""The comparison on a W&B dashboard.

A sweep's jobs are W&B runs of one group; the report joins that group as a run of job type ``report`` holding the
results table (a W&B Table) and the three plots (images), logged by ``python -m ssat.report <sweep dir> --wandb``
and, under ``logger=wandb``, by the sweep itself when its last job has ended. Each job's own run gets the picture of
its selection and a table of its evaluation's sanity checks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ssat.errors import ConfigError, SsatError
from ssat.report.table import COLUMNS, summarise
from ssat.tracking import sweep_group, wandb_mode

log = logging.getLogger("ssat")

# Where a finished run or sweep keeps Hydra's record of how it ran (the W&B callback's settings among them).
HYDRA_RECORDS = ("multirun.yaml", ".hydra/hydra.yaml")
SANITY_COLUMNS = ("check", "passed", "values")


@dataclass(frozen=True)
class Destination:
    """The W&B project and group that a run or sweep logged to."""

    project: str
    entity: str | None
    group: str


def destination(path: Path, project: str | None = None, entity: str | None = None,
                group: str | None = None) -> Destination:
    """Where the jobs under ``path`` (a sweep or a single run) logged, read from Hydra's record of the W&B callback
    (project ssat and the folder's group when it ran without W&B); the arguments, when given, win."""
    settings: dict[str, Any] = {}
    record = next((path / name for name in HYDRA_RECORDS if (path / name).is_file()), None)
    if record is not None:
        callback = OmegaConf.select(OmegaConf.load(record), "hydra.callbacks.wandb", default=None)
        settings = OmegaConf.to_container(callback) if callback is not None else {}
    swept = record is not None and record.name == "multirun.yaml"
    return Destination(project=project or settings.get("project") or "ssat",
                       entity=entity or settings.get("entity"),
                       group=group or settings.get("group") or (sweep_group(path) if swept else path.resolve().name))


def wandb_module():
    """wandb, or one line naming its extra."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("logging the report to W&B needs the extra 'wandb': pip install -e '.[wandb]'") from None
    return wandb


def results_table(wandb, records: list[dict[str, Any]]):
    """The report's table (one row per dataset, model, selector and budget) as a W&B Table."""
    return wandb.Table(columns=list(COLUMNS), data=[[row[c] for c in COLUMNS] for row in summarise(records)])


def publish(records: list[dict[str, Any]], plots: list[Path], where: Destination, run_dir: Path) -> Path:
    """A ``report`` run in the group with the table and the plots; returns the W&B files' folder (offline: what
    `wandb sync` uploads)."""
    wandb = wandb_module()
    run = wandb.init(project=where.project, entity=where.entity, group=where.group, job_type="report",
                     name="report", dir=str(run_dir), mode=wandb_mode(), reinit="finish_previous",
                     config={"runs": len(records)})
    try:
        run.log({"report/results": results_table(wandb, records),
                 **{f"report/{plot.stem}": wandb.Image(str(plot)) for plot in plots}})
        folder = Path(run.dir).parent
    finally:
        run.finish()
    return folder


def sanity_table(wandb, sanity: dict[str, Any]):
    """One row per sanity check: its name, whether it passed, and its numbers."""
    return wandb.Table(columns=list(SANITY_COLUMNS), data=[
        [name, check["passed"], json.dumps({k: v for k, v in check.items() if k != "passed"})]
        for name, check in sanity["checks"].items()])


def log_job(run, results: dict[str, Any], run_dir: Path) -> None:
    """A job's own run: its sanity checks (a table and two summary values) and the picture of its selection."""
    wandb = wandb_module()
    sanity = results.get("sanity")
    if sanity:
        run.summary.update({"sanity/passed": sanity["passed"], "sanity/failed": ", ".join(sanity["failed"])})
        run.log({"sanity/checks": sanity_table(wandb, sanity)})
    dirs = results.get("stage_dirs", {})
    if "embed" in dirs and "select" in dirs:
        from ssat.report.plots import plot_projection  # matplotlib only for a run that has a selection to draw

        picture = plot_projection(results, run_dir / "selection_pca.png")
        run.log({"selection/pca": wandb.Image(str(picture))})


def publish_sweep(sweep_dir: Path, where: Destination) -> None:
    """The sweep's report (report.md, report.csv, the plots) in its folder and in its W&B group; a sweep whose
    report cannot be made (no job finished) says so in one line instead of failing after its jobs."""
    from ssat.report.__main__ import write_report

    try:
        records, _, plots = write_report([sweep_dir], sweep_dir)
        folder = publish(records, plots, where, sweep_dir)
    except SsatError as err:
        log.warning("the sweep's W&B report was not logged: %s", err)
        return
    log.info("sweep report of %d runs logged to W&B group %s (%s)", len(records), where.group, folder)
