"""What ``python -m ssat.evaluate`` and ``python -m ssat.export`` act on: the directory of a finished
``python -m ssat.run`` (its SSAT model, the overrides it ran with, its results.json), or a model file with the
overrides that build its model (``dataset=cifar10 model=wrn28_10``)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ssat.artifacts import ModelWeights
from ssat.errors import ConfigError
from ssat.pipeline.summary import RESULTS

OVERRIDES = Path(".hydra") / "overrides.yaml"  # written by Hydra into every job's directory


@dataclass
class Target:
    """A model file, the overrides the run composed its config with (none for a bare file), the run's results
    (None for a bare file) and the folder that outputs go to by default."""

    model_file: Path
    run_overrides: list[str]
    results: dict[str, Any] | None
    folder: Path
    name: str  # outputs are named after it: the run directory's name, or the file's stem


def target(path: Path) -> Target:
    """The run directory or model file at ``path``."""
    if path.is_dir():
        if not (path / RESULTS).is_file() or not (path / OVERRIDES).is_file():
            raise ConfigError(f"{path} is not the directory of a finished python -m ssat.run (it has no {RESULTS} "
                              f"or {OVERRIDES}), nor a model file")
        results = json.loads((path / RESULTS).read_text())
        weights = Path(results["stage_dirs"]["ssat"]) / ModelWeights.FILE
        if not weights.is_file():
            raise ConfigError(f"{path}: its SSAT model {weights} is gone (the cache was moved or cleared, or the run "
                              f"used a relative cache_dir from another folder); pass the model file itself with the "
                              f"overrides that build it")
        return Target(weights, list(OmegaConf.load(path / OVERRIDES)), results, path, path.name)
    if not path.is_file():
        raise ConfigError(f"{path}: no such run directory or model file")
    return Target(path, [], None, path.parent, path.stem)


def target_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The command line of the tools that take a run directory or a model file, then config overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", type=Path, help="a run directory of python -m ssat.run, or a model file")
    parser.add_argument("overrides", nargs="*", help="config overrides (for a model file: those that build its "
                                                     "model, e.g. dataset=cifar10 model=wrn28_10)")
    return parser
