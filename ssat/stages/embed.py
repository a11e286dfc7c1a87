"""Stage 2: penultimate features and logits of the whole pool, streamed to .npy memory maps.

The stage is resumable: rows are written in order and the number of rows safely on disk is recorded in
``progress.json`` after each flush, so a crashed embed restarts where it stopped instead of at row 0.
Under DDP each rank embeds its contiguous share of the pool into its own folder (resumable the same way) and
rank 0 assembles the two memory maps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import nn

from ssat import distributed
from ssat.attacks import eval_mode
from ssat.artifacts import Embedding, ModelWeights
from ssat.cache import write_json_atomic
from ssat.config import build
from ssat.errors import ConfigError
from ssat.pipeline.runner import StageContext
from ssat.pipeline.stage import Stage
from ssat.progress import progress
from ssat.selection import PoolEmbedding
from ssat.selection.target import selection_target

DTYPES = Embedding.DTYPES
PROGRESS = "progress.json"


def _open_outputs(out_dir: Path, n: int, dim: int, classes: int, dtype: str):
    """The two output memory maps and the number of rows already written by an earlier attempt."""
    progress_file = out_dir / PROGRESS
    layout = {"rows": n, "feature_dim": dim, "classes": classes, "dtype": dtype}
    if progress_file.exists():
        progress = json.loads(progress_file.read_text())
        if {k: progress.get(k) for k in layout} == layout:
            return (*(np.load(path, mmap_mode="r+") for path in Embedding.paths(out_dir)),
                    progress["done"], layout)
    features_path, logits_path = Embedding.paths(out_dir)
    features = open_memmap(features_path, mode="w+", dtype=DTYPES[dtype], shape=(n, dim))
    logits = open_memmap(logits_path, mode="w+", dtype=np.float32, shape=(n, classes))
    write_json_atomic(progress_file, {**layout, "done": 0})
    return features, logits, 0, layout


class _Rows:
    """Rows [start, stop) of an image array or pool, read a slice at a time (a pool may be a lazy memory map)."""

    def __init__(self, images, start: int, stop: int):
        self.images, self.start, self.stop = images, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, rows: slice):
        return self.images[self.start + rows.start:self.start + rows.stop]


def embed_pool(model: nn.Module, images, out_dir: Path, batch_size: int, device: torch.device | str = "cpu",
               dtype: str = "float32", flush_seconds: float = 30.0) -> dict[str, Any]:
    """Writes features.npy (N, D) in ``dtype`` and logits.npy (N, K) float32, eval mode, no augmentation."""
    if dtype not in DTYPES:
        raise ConfigError(f"embed.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    rank, world_size = distributed.rank(), distributed.world_size()
    if world_size == 1:
        return _embed_rows(model, images, Path(out_dir), batch_size, device, dtype, flush_seconds)
    n = len(images)
    bounds = np.linspace(0, n, world_size + 1).astype(int)
    shards = distributed.shard_dirs(out_dir)
    shards[rank].mkdir(exist_ok=True)
    info = _embed_rows(model, _Rows(images, bounds[rank], bounds[rank + 1]), shards[rank], batch_size, device,
                       dtype, flush_seconds)
    distributed.barrier()
    if rank == 0:
        _assemble(shards, Path(out_dir), n, dtype)
    return {**info, "num_points": n, "ranks": world_size}


def _assemble(shards: list[Path], out_dir: Path, n: int, dtype: str, chunk: int = 65536) -> None:
    """Rank 0 copies the ranks' shards, in order, into the stage's two memory maps, then drops the shards."""
    parts = [Embedding.load(shard) for shard in shards]
    layout = {"rows": n, "feature_dim": parts[0].features.shape[1], "classes": parts[0].logits.shape[1],
              "dtype": dtype}
    features_path, logits_path = Embedding.paths(out_dir)
    features = open_memmap(features_path, mode="w+", dtype=DTYPES[dtype], shape=(n, layout["feature_dim"]))
    logits = open_memmap(logits_path, mode="w+", dtype=np.float32, shape=(n, layout["classes"]))
    row = 0
    for part in parts:
        for start in range(0, len(part.features), chunk):
            stop = min(start + chunk, len(part.features))
            features[row + start:row + stop] = part.features[start:stop]
            logits[row + start:row + stop] = part.logits[start:stop]
        row += len(part.features)
    features.flush()
    logits.flush()
    write_json_atomic(out_dir / PROGRESS, {**layout, "done": n})
    distributed.remove_shards(shards)


def _embed_rows(model: nn.Module, images, out_dir: Path, batch_size: int, device: torch.device | str,
                dtype: str, flush_seconds: float) -> dict[str, Any]:
    """One process's streamed, resumable embed of ``images`` into out_dir."""
    model = model.to(device)
    n = len(images)
    features, logits, done, layout = _open_outputs(out_dir, n, model.feature_dim, model.head.out_features, dtype)
    last_flush = time.monotonic()

    def flush(rows: int) -> None:
        features.flush()
        logits.flush()
        write_json_atomic(out_dir / PROGRESS, {**layout, "done": rows})

    with eval_mode(model), torch.no_grad(), progress(n, "embed", "img", done) as bar:
        for start in range(done, n, batch_size):
            stop = min(start + batch_size, n)
            x = torch.from_numpy(np.ascontiguousarray(images[start:stop])).to(device, non_blocking=True)
            z = model.features(x.float().div_(255.0))
            features[start:stop] = z.float().cpu().numpy()
            logits[start:stop] = model.head(z).float().cpu().numpy()
            bar.update(stop - start)
            if time.monotonic() - last_flush > flush_seconds:
                flush(stop)
                last_flush = time.monotonic()
    flush(n)
    return {"num_points": n, "feature_dim": int(model.feature_dim), "resumed_at": int(done)}


def selection_model(ctx: StageContext) -> nn.Module:
    """The intermediate model with its best weights (built from ``model``, which the intermediate stage reads)."""
    return ModelWeights.load_into(build(ctx.cfg.model), ctx.path("intermediate"))


def _run(ctx: StageContext, out: Path) -> dict[str, Any]:
    candidates = selection_target(ctx.cfg.selection.target).candidates(ctx.value("pool"))
    return embed_pool(selection_model(ctx), candidates, out, ctx.cfg.embed.batch_size, ctx.device,
                      ctx.cfg.embed.dtype)


def _describe(ctx: StageContext) -> str:
    target = selection_target(ctx.cfg.selection.target)
    return f"features of {len(target.candidates(ctx.value('pool')))} {target.name} images"


STAGE = Stage("embed", _run, needs=("intermediate", "pool"), every_rank=True, describe=_describe, code=("ssat.models",),
              reads=("embed", "selection.target", "trainer.accelerator"))
