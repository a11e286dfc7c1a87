"""Stage 2: penultimate features and logits of the whole pool, streamed to .npy memory maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import nn
from tqdm.auto import tqdm

from ssat.attacks import eval_mode


def embed_pool(model: nn.Module, images: np.ndarray, out_dir: Path, batch_size: int,
               device: torch.device | str = "cpu") -> dict[str, Any]:
    """Writes features.npy (N, D) and logits.npy (N, K), float32, in eval mode without augmentation."""
    model = model.to(device)
    n = len(images)
    features = open_memmap(out_dir / "features.npy", mode="w+", dtype=np.float32, shape=(n, model.feature_dim))
    logits = open_memmap(out_dir / "logits.npy", mode="w+", dtype=np.float32,
                         shape=(n, model.head.out_features))
    with eval_mode(model), torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc="embed", unit="batch", leave=False):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
            z = model.features(x.float().div_(255.0))
            features[start:start + len(x)] = z.float().cpu().numpy()
            logits[start:start + len(x)] = model.head(z).float().cpu().numpy()
    features.flush()
    logits.flush()
    return {"num_points": n, "feature_dim": int(model.feature_dim)}


def load_embedding(stage_dir: Path):
    """The pool embedding written by embed_pool, memory-mapped read-only."""
    from ssat.selection import PoolEmbedding

    return PoolEmbedding(np.load(stage_dir / "features.npy", mmap_mode="r"),
                         np.load(stage_dir / "logits.npy", mmap_mode="r"))
