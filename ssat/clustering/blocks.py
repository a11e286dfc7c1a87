"""Pool features read in row blocks, so that a memory-mapped pool larger than RAM goes through the page cache.

A float32 array or memory map is handed out as views (no copy: the pages stay file-backed, reclaimable). Other
dtypes (float16 features) are converted block by block into one reused float32 buffer: a fresh buffer per block
would be page-faulted anew every time (on this machine that costs more than the conversion itself).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch

BLOCK_ROWS = 65536


def float32_blocks(features: np.ndarray, batch_size: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """(start, rows as float32) for consecutive blocks; a converted block is overwritten by the next one."""
    n = len(features)
    if features.dtype == np.float32:
        for start in range(0, n, batch_size):
            yield start, np.ascontiguousarray(features[start:start + batch_size])
        return
    buffer = torch.empty((min(batch_size, n), *features.shape[1:]), dtype=torch.float32)
    for start in range(0, n, batch_size):
        block = np.asarray(features[start:start + batch_size])
        out = buffer[:len(block)]
        with warnings.catch_warnings():  # torch cannot protect a read-only memory map; it is only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            source = torch.from_numpy(block)
        out.copy_(source)  # vectorised and threaded, unlike numpy's float16 cast
        yield start, out.numpy()


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` of ``n`` row indices drawn uniformly without replacement, in file order."""
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def take_rows(features: np.ndarray, rows: np.ndarray, batch_size: int = BLOCK_ROWS) -> np.ndarray:
    """features[rows] as one float32 array, rows in increasing order: one sequential pass over the blocks that hold
    them (a fancy index into a memory map would read the file page by page in random order)."""
    out = np.empty((len(rows), *features.shape[1:]), dtype=np.float32)
    bounds = np.searchsorted(rows, np.arange(0, len(features) + batch_size, batch_size))
    for i, (start, block) in enumerate(float32_blocks(features, batch_size)):
        lo, hi = bounds[i], bounds[i + 1]
        if hi > lo:
            out[lo:hi] = block[rows[lo:hi] - start]
    return out
