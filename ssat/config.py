"""Config checks that Hydra would otherwise answer with a stack trace."""

from __future__ import annotations

from importlib import resources, util
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from ssat.errors import ConfigError, SsatError, WriteError


def group_options(group: str) -> list[str]:
    """The options of a config group: the yaml files in ssat/conf/<group>/."""
    folder = resources.files("ssat") / "conf" / group
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def config_groups() -> list[str]:
    root = resources.files("ssat") / "conf"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "hydra")


def check_group_choices(overrides: list[str]) -> None:
    """An unknown option such as ``selector=foo`` (also inside a sweep list) fails in one line naming the choices."""
    groups = set(config_groups())
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in groups or value in ("", "null"):
            continue
        options = group_options(key)
        for choice in value.split(","):
            if choice not in options:
                raise ConfigError(f"unknown {key} '{choice}'; choose one of: {', '.join(options)}")


# Options that need an optional dependency: (group, option) -> (the extra that installs it, a module it provides).
EXTRAS = {
    ("logger", "wandb"): ("wandb", "wandb"),
    ("hydra/launcher", "slurm"): ("slurm", "hydra_plugins.hydra_submitit_launcher"),
}


def check_extras(overrides: list[str]) -> None:
    """``logger=wandb`` without wandb installed fails in one line naming the extra, before Hydra starts."""
    for override in overrides:
        key, _, value = override.partition("=")
        for choice in value.split(","):
            need = EXTRAS.get((key.lstrip("+~"), choice))
            if need is not None and util.find_spec(need[1]) is None:
                raise ConfigError(f"{key}={choice} needs the extra '{need[0]}': pip install -e '.[{need[0]}]'")


def check_output_overrides(overrides: list[str]) -> None:
    """A run or sweep dir under a regular file fails here in one line; Hydra would fail creating it with a trace."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key not in ("hydra.run.dir", "hydra.sweep.dir"):
            continue
        path = Path(value.strip("'\"").split("${", 1)[0] or ".").absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise WriteError(f"{key}={value} cannot be created: {existing} is a file, not a folder")


def build(node, **kwargs):
    """hydra.utils.instantiate, but an SsatError raised by the target surfaces as itself (one clear line)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, SsatError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None
