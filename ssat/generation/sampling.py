"""Sampling a DDPM into a resumable uint8 memory map.

Batch b draws all its noise from its own generator seeded from (seed, b), so which images come out depends
only on (seed, batch size, sampler), not on how often the run was interrupted: a resumed run writes exactly the
images an uninterrupted one would, with no duplicates and no gaps. For the same reason, under DDP each rank
samples its contiguous share of the batches (each batch with its own generator) into its own folder and rank 0
assembles them: the pool is the one a single process samples, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from numpy.lib.format import open_memmap

from ssat import distributed
from ssat.artifacts import GeneratedImages
from ssat.attacks import eval_mode
from ssat.cache import write_json_atomic
from ssat.choices import SAMPLERS as SAMPLER_NAMES
from ssat.errors import ConfigError
from ssat.progress import progress

SAMPLERS = dict(zip(SAMPLER_NAMES, (DDPMScheduler, DDIMScheduler), strict=True))
PROGRESS = "progress.json"


def make_sampler(scheduler_config: dict, scheduler: str = "ddpm", num_inference_steps: int | None = None):
    """Ancestral DDPM or deterministic DDIM (eta 0) on the training schedule; None steps = the training count."""
    if scheduler not in SAMPLERS:
        raise ConfigError(f"generation.sampler.scheduler={scheduler!r} is not one of {', '.join(SAMPLERS)}")
    sampler = SAMPLERS[scheduler].from_config(scheduler_config)
    train_steps = sampler.config.num_train_timesteps
    steps = train_steps if num_inference_steps is None else num_inference_steps
    if not 1 <= steps <= train_steps:
        raise ConfigError(f"generation.sampler.num_inference_steps={num_inference_steps} is outside "
                          f"[1, {train_steps}] (the training step count)")
    sampler.set_timesteps(steps)
    return sampler


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """A CPU generator for batch ``batch`` alone (CPU so that a run gives the same noise on any device)."""
    state = np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state))


@torch.no_grad()
def denoise(unet: UNet2DModel, sampler, n: int, generator: torch.Generator,
            device: torch.device | str) -> np.ndarray:
    """n images (n, C, H, W) uint8 from pure noise through every timestep of ``sampler``."""
    channels, size = unet.config.in_channels, unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    dtype = next(unet.parameters()).dtype
    x = randn_tensor((n, channels, height, width), generator=generator, device=torch.device(device), dtype=dtype)
    for t in sampler.timesteps:
        eps = unet(x, t).sample
        x = sampler.step(eps, t, x, generator=generator).prev_sample
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def _open_pool(out_dir: Path, layout: dict[str, Any]):
    """The images memory map and the rows already written by an earlier attempt with the same layout."""
    progress_file = out_dir / PROGRESS
    if progress_file.exists() and (GeneratedImages.path(out_dir)).exists():
        progress = json.loads(progress_file.read_text())
        if {k: progress.get(k) for k in layout} == layout:
            return np.load(GeneratedImages.path(out_dir), mmap_mode="r+"), progress["done"]
    images = open_memmap(GeneratedImages.path(out_dir), mode="w+", dtype=np.uint8, shape=(layout["rows"], *layout["shape"]))
    write_json_atomic(progress_file, {**layout, "done": 0})
    return images, 0


def generate_pool(unet: UNet2DModel, scheduler_config: dict, out_dir: Path, n: int, batch_size: int, seed: int,
                  scheduler: str = "ddpm", num_inference_steps: int | None = None,
                  device: torch.device | str = "cpu") -> dict[str, Any]:
    """Writes out_dir/images.npy (n, C, H, W) uint8 batch by batch, recording finished rows in progress.json."""
    if n < 1 or batch_size < 1:
        raise ConfigError(f"generation needs at least one image and batch_size >= 1, got n={n}, "
                          f"batch_size={batch_size}")
    sampler = make_sampler(dict(scheduler_config), scheduler, num_inference_steps)
    size = unet.config.sample_size
    shape = [unet.config.in_channels, *((size, size) if isinstance(size, int) else size)]
    layout = {"shape": shape, "batch_size": batch_size, "seed": seed, "scheduler": scheduler,
              "num_inference_steps": len(sampler.timesteps)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"num_images": n, "scheduler": scheduler, "steps": len(sampler.timesteps)}
    rank, world_size = distributed.rank(), distributed.world_size()
    if world_size == 1:
        return {**info, "resumed_at": _sample_rows(unet, sampler, out_dir, 0, n, layout, device)}
    batches = -(-n // batch_size)
    cuts = [min(n, int(b) * batch_size) for b in np.linspace(0, batches, world_size + 1).round()]
    shards = distributed.shard_dirs(out_dir)
    resumed_at = 0
    if cuts[rank + 1] > cuts[rank]:
        shards[rank].mkdir(exist_ok=True)
        resumed_at = _sample_rows(unet, sampler, shards[rank], cuts[rank], cuts[rank + 1] - cuts[rank], layout,
                                  device)
    distributed.barrier()
    if rank == 0:
        images = open_memmap(GeneratedImages.path(out_dir), mode="w+", dtype=np.uint8, shape=(n, *shape))
        for r, shard in enumerate(shards):
            if cuts[r + 1] > cuts[r]:
                images[cuts[r]:cuts[r + 1]] = np.load(GeneratedImages.path(shard), mmap_mode="r")
        images.flush()
        write_json_atomic(out_dir / PROGRESS, {**layout, "first_row": 0, "rows": n, "done": n})
        distributed.remove_shards(shards)
    return {**info, "resumed_at": resumed_at, "ranks": world_size}


def _sample_rows(unet: UNet2DModel, sampler, out_dir: Path, first_row: int, rows: int, layout: dict[str, Any],
                 device: torch.device | str) -> int:
    """Rows [first_row, first_row + rows) of the pool into out_dir/images.npy; returns where it resumed."""
    batch_size = layout["batch_size"]
    layout = {**layout, "first_row": first_row, "rows": rows}
    images, done = _open_pool(out_dir, layout)
    unet = unet.to(device)
    with eval_mode(unet), progress(rows, f"sample ({layout['scheduler']})", "img", done) as bar:
        for start in range(done, rows, batch_size):
            stop = min(start + batch_size, rows)
            generator = batch_generator(layout["seed"], (first_row + start) // batch_size)
            images[start:stop] = denoise(unet, sampler, stop - start, generator, device)
            images.flush()
            write_json_atomic(out_dir / PROGRESS, {**layout, "done": stop})
            bar.update(stop - start)
    return int(done)
