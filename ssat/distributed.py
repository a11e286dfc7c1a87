"""The ranks of a ``trainer=ddp`` run. Every rank runs the whole pipeline in step; these are the places they meet.

The ranks are started once, at the top of the run (Lightning's launcher runs the same command again per rank), so
that every stage sees the process group: training and embed split their work over the ranks, the other stages
run on rank 0 while the rest wait, and only rank 0 commits a stage to the cache.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig


def launch(trainer: DictConfig) -> None:
    """Start the other ranks and join the process group when the trainer asks for DDP on several devices."""
    if "ddp" not in str(trainer.get("strategy") or ""):
        return
    import lightning as L

    fabric = L.Fabric(accelerator=trainer.accelerator, devices=trainer.devices, strategy=trainer.strategy,
                      num_nodes=trainer.get("num_nodes", 1))
    if fabric.world_size > 1:
        fabric.launch()
        if fabric.global_rank > 0:  # rank 0 reports; the others only warn
            logging.getLogger("ssat").setLevel(logging.WARNING)
            _exit_with_parent()


def _exit_with_parent(period: float = 2.0) -> None:
    """A rank started by rank 0's launcher ends when rank 0 is gone (killed or failed) instead of waiting forever
    at the next barrier."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-rank-0").start()


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def barrier() -> None:
    if initialized():
        dist.barrier()


def shard_dirs(out_dir: Path) -> list[Path]:
    """The folders in which the ranks write their shares of a stage's output, which rank 0 then assembles."""
    return [Path(out_dir) / f"rank{r}of{world_size()}" for r in range(world_size())]


def remove_shards(shards: list[Path]) -> None:
    for shard in shards:
        shutil.rmtree(shard, ignore_errors=True)
