"""Entry point: ``python -m ssat.run [group=option ...] [key=value ...]`` (Hydra; ``-m`` for sweeps)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ssat.config import check_command_line
from ssat.errors import BAD_INPUT, FAILED, SsatError

log = logging.getLogger("ssat")

# Part of the default run directory's name: two runs started in the same microsecond still get their own.
OmegaConf.register_new_resolver("ssat.pid", os.getpid, replace=True)

# What Hydra writes into a job's folder before the job does anything: a folder holding only these held no work.
HYDRA_FILES = {".hydra", "run.log", "multirun.yaml"}


def fail(message: str, exit_code: int = BAD_INPUT) -> None:
    print(f"ssat: error: {message}", file=sys.stderr)
    raise SystemExit(exit_code)


def remove_if_empty_of_work(run_dir: Path) -> None:
    """A job that failed before any work leaves nothing: its folder goes, and so do the parents inside the working
    directory that it leaves empty (outputs/<date>/, a sweep's folder holding only multirun.yaml)."""
    folder, cwd = run_dir.resolve(), Path.cwd().resolve()
    for handler in logging.root.handlers:  # run.log is closed before its folder goes
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(folder):
            logging.root.removeHandler(handler)
            handler.close()
    while folder.is_dir() and {p.name for p in folder.iterdir()} <= HYDRA_FILES:
        shutil.rmtree(folder)
        folder = folder.parent
        if folder == cwd or not folder.is_relative_to(cwd):
            return


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Runs one pipeline; returns the robust accuracy (what a Hydra sweeper would maximise).

    The pipeline (torch, Lightning) is imported here, after the command line's checks: bad input fails without it.
    """
    from ssat import distributed, tracking
    from ssat.cache import WRITE_ERRNOS
    from ssat.pipeline import format_summary, run_pipeline
    from ssat.pipeline.summary import RESULTS

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # optim.schedule=onecycle steps once per epoch on purpose (DM-Improves-AT's `cosinew`).
    warnings.filterwarnings("ignore", message=".*OneCycleLR. scheduler is using 'interval': 'epoch'.*")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run_pipeline(cfg, run_dir)
    except SsatError as err:
        tracking.finish_failed()
        if err.exit_code == BAD_INPUT:
            remove_if_empty_of_work(run_dir)
        fail(str(err), err.exit_code)
    except OSError as err:  # a write outside the stages (the run dir's files), after the work
        if err.errno not in WRITE_ERRNOS:
            raise
        tracking.finish_failed()
        fail(f"could not write {err.filename}: {err.strerror}", FAILED)
    if distributed.rank() == 0 and "stage" not in summary:  # a partial run (+stage=...) has logged its stages
        log.info("results in %s\n\n%s\n", run_dir / RESULTS, format_summary(summary))
    return summary["robust_acc"]


def cli() -> None:
    """Checks every job of the command line (sys.argv) before Hydra starts, then runs them."""
    try:
        check_command_line(sys.argv[1:])
    except SsatError as err:
        fail(str(err))
    main()


if __name__ == "__main__":
    cli()
