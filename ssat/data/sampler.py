"""The batch sampler of robust self-training (Carmon et al. 2019), sharded for DDP."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

from ssat.errors import ConfigError


class SSATBatchSampler(Sampler[list[int]]):
    """Batches of labeled and unlabeled indices in a fixed proportion.

    Dataset indices ``[0, num_labeled)`` are labeled, ``[num_labeled, num_labeled + num_unlabeled)`` unlabeled.
    Each batch holds int(batch_size * unsup_fraction) unlabeled indices (RST's rounding, down) and the rest
    labeled. Labeled indices walk a fresh permutation (a new one when it runs out); each batch is topped up with
    unlabeled indices drawn uniformly with replacement, then shuffled. An epoch is ``num_batches`` batches
    (RST: a fixed number whatever the pool size) or, when None, one pass over labeled plus unlabeled.
    The draw depends only on (seed, epoch), so a resumed run sees the same batches. With ``world_size > 1``
    each rank yields its share of every global batch: a strided slice of its labeled and of its unlabeled
    indices, so the ranks' shards are disjoint, together make up the global batch, and each keeps its proportion.
    """

    def __init__(self, num_labeled: int, num_unlabeled: int, batch_size: int, unsup_fraction: float,
                 num_batches: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_labeled < 1:
            raise ValueError("the sampler needs at least one labeled index")
        if num_batches is not None and num_batches < 1:
            raise ConfigError(f"ssat.batches_per_epoch={num_batches} must be at least 1 (or null for one pass)")
        self.num_labeled = num_labeled
        self.num_unlabeled = num_unlabeled
        self.batch_size = batch_size
        unlabeled = int(batch_size * unsup_fraction) if num_unlabeled > 0 else 0  # RST truncates, int(B f)
        self.labeled_per_batch = max(1, batch_size - unlabeled)
        one_pass = math.ceil((num_labeled + num_unlabeled) / batch_size)
        self.num_batches = num_batches if num_batches is not None else one_pass
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        # Positions to draw from within each part (an adaptive coreset's); None: the whole part.
        self.labeled_subset: torch.Tensor | None = None
        self.unlabeled_subset: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self):
        """Every global batch of this epoch, before sharding."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        labeled_ids = torch.arange(self.num_labeled) if self.labeled_subset is None else self.labeled_subset
        order = labeled_ids[torch.randperm(len(labeled_ids), generator=gen)]
        position = 0
        for _ in range(self.num_batches):
            if position >= len(labeled_ids):
                order, position = labeled_ids[torch.randperm(len(labeled_ids), generator=gen)], 0
            labeled = order[position:position + self.labeled_per_batch]
            position += len(labeled)
            parts = [labeled]
            if self.labeled_per_batch < self.batch_size:  # as RST: no unlabeled share, no top-up
                fill = self.batch_size - len(labeled)
                subset = self.unlabeled_subset
                drawn = torch.randint(self.num_unlabeled if subset is None else len(subset), (fill,), generator=gen)
                parts.append(self.num_labeled + (drawn if subset is None else subset[drawn]))
            batch = torch.cat(parts)
            yield batch[torch.randperm(len(batch), generator=gen)]

    def __iter__(self):
        for batch in self.global_batches():
            if self.world_size == 1:
                yield batch.tolist()
                continue
            labeled = batch < self.num_labeled  # every rank an equal share of each kind (within one point)
            yield torch.cat([batch[labeled][self.rank::self.world_size],
                             batch[~labeled][self.rank::self.world_size]]).tolist()

    def __len__(self) -> int:
        return self.num_batches
