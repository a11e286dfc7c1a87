"""The ranks of a ``trainer=ddp`` run. Every rank runs the whole pipeline in step; these are the places they meet.

The ranks are started once, at the top of the run, so that every stage sees the process group: training and embed
split their work over the ranks, the other stages run on rank 0 while the rest wait, and only rank 0 commits a
stage to the cache. On one machine Lightning's launcher starts them (it runs the same command again per rank); in
a SLURM job of several tasks (``hydra.launcher.tasks_per_node``, ``hydra.launcher.nodes``) every task is one rank
and SLURM's environment says which (Lightning's SLURMEnvironment), on one node or several.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

from ssat.errors import ConfigError


def launch(trainer: DictConfig) -> None:
    """Start the other ranks (or, in a SLURM job of several tasks, meet them) and join the process group when the
    trainer asks for DDP on several devices."""
    if not is_ddp(trainer):
        return
    import lightning as L

    fabric = L.Fabric(accelerator=trainer.accelerator, strategy=trainer.strategy,
                      **placement(trainer.devices, trainer.get("num_nodes", 1)))
    if fabric.world_size > 1:
        fabric.launch()
        if fabric.global_rank > 0:  # rank 0 reports; the others only warn
            logging.getLogger("ssat").setLevel(logging.WARNING)
            if slurm_tasks() is None:  # SLURM's srun ends the other tasks itself (--kill-on-bad-exit)
                _exit_with_parent()


def is_ddp(trainer: Mapping[str, Any]) -> bool:
    return "ddp" in str(trainer.get("strategy") or "")


def slurm_tasks() -> tuple[int, int] | None:
    """(tasks per node, nodes) when this process is one of several tasks of a SLURM job step (srun), else None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect() or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return None
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", os.environ["SLURM_NTASKS"])  # "8", or "8(x2)"
    return int(per_node.split("(")[0]), int(os.environ.get("SLURM_NNODES", "1"))


def placement(devices: Any, num_nodes: int = 1, tasks: tuple[int, int] | None = None) -> dict[str, Any]:
    """The trainer's ``devices`` and ``num_nodes``; in a SLURM job of several tasks (``tasks``: its tasks per node
    and nodes, by default this process's job's), SLURM's: one rank per task. ``devices`` -1 or auto takes the
    job's tasks per node; a number that SLURM contradicts stops in one line."""
    tasks = tasks or slurm_tasks()
    if tasks is None:
        return {"devices": devices, "num_nodes": num_nodes}
    per_node, nodes = tasks
    if str(devices) not in ("-1", "auto", str(per_node)):
        raise ConfigError(f"trainer.devices={devices} but the SLURM job runs {per_node} tasks per node, one DDP rank "
                          f"each: set trainer.devices=-1 (or hydra.launcher.tasks_per_node={devices})")
    if num_nodes not in (1, nodes):
        raise ConfigError(f"trainer.num_nodes={num_nodes} but the SLURM job runs on {nodes} nodes: leave "
                          f"trainer.num_nodes out (the job's nodes are taken) or set hydra.launcher.nodes={num_nodes}")
    return {"devices": per_node, "num_nodes": nodes}


def _exit_with_parent(period: float = 2.0) -> None:
    """A rank started by rank 0's launcher ends when rank 0 is gone (killed or failed) instead of waiting forever
    at the next barrier."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-rank-0").start()


def torch_distributed():
    """torch.distributed, imported on first use rather than with this module: the command line's checks use is_ddp
    and placement before torch is needed."""
    import torch.distributed

    return torch.distributed


def initialized() -> bool:
    """Whether this process is in a process group."""
    dist = torch_distributed()
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return torch_distributed().get_rank() if initialized() else 0


def world_size() -> int:
    return torch_distributed().get_world_size() if initialized() else 1


def barrier() -> None:
    if initialized():
        torch_distributed().barrier()


def shard_dirs(out_dir: Path) -> list[Path]:
    """The folders in which the ranks write their shares of a stage's output, which rank 0 then assembles."""
    return [Path(out_dir) / f"rank{r}of{world_size()}" for r in range(world_size())]


def remove_shards(shards: list[Path]) -> None:
    for shard in shards:
        shutil.rmtree(shard, ignore_errors=True)
