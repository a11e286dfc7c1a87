"""Entry point: ``python -m ssat.run [group=option ...] [key=value ...]`` (Hydra; ``-m`` for sweeps)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ssat import distributed
from ssat.cache import WRITE_ERRNOS
from ssat.config import check_extras, check_group_choices, check_output_overrides
from ssat.errors import SsatError
from ssat.pipeline import format_summary, run_pipeline

log = logging.getLogger("ssat")

# Part of the default run directory's name: two runs started in the same microsecond still get their own.
OmegaConf.register_new_resolver("ssat.pid", os.getpid, replace=True)


def fail(message: str) -> None:
    print(f"ssat: error: {message}", file=sys.stderr)
    raise SystemExit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Runs one pipeline; returns the robust accuracy (what a Hydra sweeper would maximise)."""
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run_pipeline(cfg, run_dir)
    except SsatError as err:
        fail(str(err))
    except OSError as err:  # a write outside the stages (run dir, logs); stages say which stage failed
        if err.errno not in WRITE_ERRNOS:
            raise
        fail(f"could not write {err.filename}: {err.strerror}")
    if distributed.rank() == 0:
        log.info("results in %s\n\n%s\n", run_dir / "results.json", format_summary(summary))
    return summary["robust_acc"]


def cli() -> None:
    try:
        check_group_choices(sys.argv[1:])
        check_extras(sys.argv[1:])
        check_output_overrides(sys.argv[1:])
    except SsatError as err:
        fail(str(err))
    main()


if __name__ == "__main__":
    cli()
