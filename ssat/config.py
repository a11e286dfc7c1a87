"""The command line's checks, before Hydra starts (what Hydra would answer with a stack trace or a folder left
behind), and instantiate with one-line errors."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from importlib import util
from pathlib import Path

from hydra import initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, InstantiationException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ssat import distributed
from ssat.errors import FAISS_MISSING, ConfigError, SsatError, WriteError
from ssat.schema import check_config, did_you_mean


# Options that need an optional dependency: (group, option) -> (the extra that installs it, a module it provides).
EXTRAS = {
    ("logger", "wandb"): ("wandb", "wandb"),
    ("hydra/launcher", "slurm"): ("slurm", "hydra_plugins.hydra_submitit_launcher"),
}

# Hydra's launcher of jobs on this machine (any other sends them elsewhere, e.g. to SLURM).
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"

# Hydra's own flags besides -m: --help, --cfg, -cn ... go straight to Hydra, unchecked.
MULTIRUN_FLAGS = ("-m", "--multirun")


def check_command_line(argv: list[str]) -> None:
    """Every job the command line would run is composed and checked here, before Hydra creates any folder.

    Sweeps are expanded with Hydra's own override grammar (``a,b``, ``choice(...)``, ``glob(...)``, ``range(...)``);
    a Hydra composition error (an unknown option or key) becomes one ConfigError; then each job's config goes
    through the extras, the output folders and the schema.
    """
    flags = [arg for arg in argv if arg.startswith("-") and not arg.startswith(("+", "~"))]
    if any(flag not in MULTIRUN_FLAGS for flag in flags):
        return
    overrides = [arg for arg in argv if arg not in flags]
    mode = RunMode.MULTIRUN if flags else RunMode.RUN
    with initialize_config_module(config_module="ssat.conf", version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        parsed = _parsed(OverridesParser.create(config_loader=hydra.config_loader), overrides)
        check_faiss()
        check_extras((o.get_key_element().lstrip("+~"), value) for o in parsed for value in
                     (o.sweep_string_iterator() if o.is_discrete_sweep() else [o.get_value_element_as_str()]))
        jobs = [overrides]
        if mode == RunMode.MULTIRUN:
            jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        for job in jobs:
            cfg = _compose(hydra, job, mode)
            check_output_dir(cfg, "hydra.sweep.dir" if mode == RunMode.MULTIRUN else "hydra.run.dir")
            check_launcher(cfg)
            here = runs_here(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            check_config(cfg, devices_here=here)


def compose_job(overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """One job's config as ``python -m ssat.run <overrides>`` would run it, checked (one-line errors), without
    Hydra's node; and the groups' choices (``model``: wrn28_10). For the commands that run stages outside a Hydra
    job (ssat.evaluate, ssat.export)."""
    with initialize_config_module(config_module="ssat.conf", version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        _parsed(OverridesParser.create(config_loader=hydra.config_loader), overrides)
        cfg = _compose(hydra, overrides, RunMode.RUN)
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items() if "/" not in k}
    with open_dict(cfg):
        del cfg["hydra"]
    check_config(cfg)
    return cfg, choices


def _parsed(parser: OverridesParser, overrides: list[str]):
    parsed = []
    for override in overrides:
        try:
            parsed += parser.parse_overrides([override])
        except OverrideParseException as err:
            raise ConfigError(f"cannot read the override {override}: {_one_line(str(err))}") from None
    return parsed


def _compose(hydra, overrides: list[str], mode: RunMode) -> DictConfig:
    try:
        return hydra.compose_config("config", overrides, run_mode=mode, with_log_configuration=False)
    except MissingConfigException as err:
        if err.options is None:
            raise ConfigError(_one_line(str(err))) from None
        group, _, choice = (err.missing_cfg_file or "").rpartition("/")
        raise ConfigError(f"unknown {group} '{choice}'; choose one of: {', '.join(err.options)}") from None
    except HydraException as err:
        key = getattr(err.__cause__, "full_key", None)
        if key is None:
            raise ConfigError(_one_line(str(err))) from None
        rest = [o for o in overrides if _override_key(o) != key]
        raise ConfigError(f"{key} is not a config key{_nearest_key(hydra, rest, mode, key)}") from None


def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _nearest_key(hydra, overrides: list[str], mode: RunMode, key: str) -> str:
    """'; did you mean <key>?' for the valid key nearest to a misspelled one, among its siblings."""
    parent, _, leaf = key.rpartition(".")
    try:
        cfg = hydra.compose_config("config", overrides, run_mode=mode, with_log_configuration=False)
    except HydraException:
        return ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    siblings = [str(k) for k in node if k != "hydra"] if isinstance(node, DictConfig) else []
    return did_you_mean(leaf, siblings, f"{parent}." if parent else "")


def _one_line(message: str) -> str:
    """Hydra's multi-line message as one line: its lines up to the config search path, joined."""
    lines = [line.strip() for line in message.split("Config search path")[0].splitlines() if line.strip()]
    return "; ".join(lines)


def check_extras(choices: Iterable[tuple[str, str]]) -> None:
    """``logger=wandb`` without wandb installed fails in one line naming the extra, before Hydra composes it."""
    for group, choice in choices:
        need = EXTRAS.get((group, choice))
        if need is not None and util.find_spec(need[1]) is None:
            raise ConfigError(f"{group}={choice} needs the extra '{need[0]}': pip install -e '.[{need[0]}]'")


def runs_here(cfg: DictConfig) -> bool:
    """Whether Hydra runs the jobs on this machine; a launcher that sends them elsewhere (SLURM) leaves the check
    of their devices to the machine they run on."""
    return OmegaConf.select(cfg, "hydra.launcher._target_") == BASIC_LAUNCHER


def check_launcher(cfg: DictConfig) -> None:
    """A SLURM job of several tasks runs one DDP group, one rank per task on one device; a DDP trainer on SLURM
    needs those tasks (Lightning's own launcher does not start ranks inside a SLURM job)."""
    launcher = cfg.hydra.launcher
    if not str(launcher.get("_target_")).endswith("SlurmLauncher"):
        return
    per_node, nodes = launcher.tasks_per_node, launcher.nodes
    tasks = f"hydra.launcher.tasks_per_node={per_node} and hydra.launcher.nodes={nodes}"
    if not distributed.is_ddp(cfg.trainer):
        if per_node * nodes > 1:
            raise ConfigError(f"{tasks} start {per_node * nodes} tasks per job, which run as one DDP group: add "
                              f"trainer=ddp")
        return
    if per_node * nodes == 1:
        raise ConfigError(f"trainer=ddp on SLURM runs one rank per task, and {tasks} start one: set "
                          f"hydra.launcher.tasks_per_node to the devices of a node (and hydra.launcher.gpus_per_node)")
    if launcher.get("gpus_per_task"):
        raise ConfigError(f"hydra.launcher.gpus_per_task={launcher.gpus_per_task} hides the node's other GPUs from "
                          f"each task, and a DDP rank takes the GPU of its local rank: set "
                          f"hydra.launcher.gpus_per_node={per_node} instead")
    distributed.placement(cfg.trainer.devices, cfg.trainer.get("num_nodes", 1), tasks=(per_node, nodes))


def check_faiss() -> None:
    """FAISS comes with the cpu or the gpu extra (pip cannot install one wheel or the other by itself): without it,
    one line naming them before any work."""
    if util.find_spec("faiss") is None:
        raise ConfigError(FAISS_MISSING)


def check_output_dir(cfg: DictConfig, key: str) -> None:
    """A run or sweep dir that cannot be created (under a file, a read-only or forbidden folder) fails here in one
    line; Hydra would fail creating it with a traceback. Nothing is left behind."""
    raw = str(OmegaConf.to_container(cfg.hydra, resolve=False)[key.split(".")[1]]["dir"])
    path = Path(raw.split("${", 1)[0] or ".").absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise WriteError(f"{key}={raw} cannot be created: {existing} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ssat-probe-", dir=existing))
    except OSError as err:
        raise WriteError(f"{key}={raw} cannot be created: {existing}: {err.strerror}") from None


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
