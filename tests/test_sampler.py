"""SSATBatchSampler: the robust self-training batch sampler (labeled permutation + unlabeled with replacement)."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from ssat.data.sampler import SSATBatchSampler
from ssat.errors import ConfigError


def batches(sampler) -> list[list[int]]:
    return [list(b) for b in sampler]


def split(batch, num_labeled):
    labeled = [i for i in batch if i < num_labeled]
    unlabeled = [i for i in batch if i >= num_labeled]
    return labeled, unlabeled


@pytest.mark.parametrize("num_labeled, num_unlabeled, batch_size, frac",
                         [(64, 500, 16, 0.5), (42, 100, 10, 0.7), (96, 300, 32, 0.25)])
def test_batch_composition_when_labeled_divides_evenly(num_labeled, num_unlabeled, batch_size, frac):
    """Every batch has batch_size indices, round(B * f) of them unlabeled, all within the dataset."""
    sampler = SSATBatchSampler(num_labeled, num_unlabeled, batch_size, frac, num_batches=30, seed=1)
    n_unl = round(batch_size * frac)
    assert (num_labeled % (batch_size - n_unl)) == 0  # the case without partial chunks
    out = batches(sampler)
    assert len(out) == len(sampler) == 30
    for batch in out:
        labeled, unlabeled = split(batch, num_labeled)
        assert len(batch) == batch_size
        assert len(unlabeled) == n_unl
        assert all(0 <= i < num_labeled + num_unlabeled for i in batch)
        assert len(set(labeled)) == len(labeled)


def test_partial_labeled_chunk_is_topped_up_with_unlabeled():
    """RST: when the permutation's last chunk is short, the batch is that chunk plus B - len(chunk) unlabeled."""
    num_labeled, batch_size = 10, 8  # 4 labeled per batch: chunks of 4, 4, 2, then a new permutation
    sampler = SSATBatchSampler(num_labeled, 50, batch_size, 0.5, num_batches=9, seed=3)
    out = batches(sampler)
    labeled_counts = [len(split(b, num_labeled)[0]) for b in out]
    assert labeled_counts == [4, 4, 2, 4, 4, 2, 4, 4, 2]
    for batch in out:
        labeled, unlabeled = split(batch, num_labeled)
        assert len(batch) == batch_size
        assert len(unlabeled) == batch_size - len(labeled)


def test_labeled_indices_walk_a_permutation():
    """Within the first ceil(L / labeled_per_batch) batches each labeled index appears exactly once, and again after."""
    num_labeled, batch_size = 23, 10  # 5 labeled per batch -> 5 batches per pass, the last with 3
    sampler = SSATBatchSampler(num_labeled, 40, batch_size, 0.5, num_batches=15, seed=0)
    out = batches(sampler)
    per_pass = math.ceil(num_labeled / sampler.labeled_per_batch)
    assert per_pass == 5
    passes = [sorted(i for b in out[k:k + per_pass] for i in split(b, num_labeled)[0])
              for k in range(0, 15, per_pass)]
    for labeled in passes:
        assert labeled == list(range(num_labeled))
    # a fresh permutation each pass, not the same order again
    orders = [[i for b in out[k:k + per_pass] for i in b if i < num_labeled] for k in range(0, 15, per_pass)]
    assert orders[0] != orders[1] or orders[1] != orders[2]


def test_unlabeled_drawn_with_replacement_over_the_whole_pool():
    """With a small pool, duplicates occur within the epoch; every unlabeled index is in range and all get drawn."""
    num_labeled, num_unlabeled = 20, 6
    sampler = SSATBatchSampler(num_labeled, num_unlabeled, 10, 0.5, num_batches=200, seed=5)
    drawn = [i for b in batches(sampler) for i in split(b, num_labeled)[1]]
    assert len(drawn) == 200 * 5
    assert all(num_labeled <= i < num_labeled + num_unlabeled for i in drawn)
    counts = Counter(drawn)
    assert set(counts) == set(range(num_labeled, num_labeled + num_unlabeled))
    # uniform: each of 6 values expected 166.7 times (sd ~ 11.8)
    assert max(counts.values()) - min(counts.values()) < 100
    assert any(len(set(u)) < len(u) for u in (split(b, num_labeled)[1] for b in batches(sampler)))


def test_batches_are_shuffled():
    """Labeled indices are not always in front: the batch is shuffled after concatenation."""
    sampler = SSATBatchSampler(50, 50, 10, 0.5, num_batches=20, seed=2)
    first_is_labeled = [b[0] < 50 for b in batches(sampler)]
    assert any(first_is_labeled) and not all(first_is_labeled)


def test_number_of_batches():
    """None gives ceil((L + U) / B) batches; an int gives that many."""
    assert len(batches(SSATBatchSampler(30, 71, 10, 0.5))) == math.ceil(101 / 10) == 11
    assert len(SSATBatchSampler(30, 71, 10, 0.5)) == 11
    assert len(batches(SSATBatchSampler(30, 71, 10, 0.5, num_batches=4))) == 4
    assert len(batches(SSATBatchSampler(30, 71, 10, 0.5, num_batches=25))) == 25


def test_no_unlabeled_gives_pure_labeled_batches():
    """num_unlabeled = 0: batches hold only labeled indices, B at a time, one pass = a permutation."""
    sampler = SSATBatchSampler(30, 0, 10, 0.5)
    out = batches(sampler)
    assert len(out) == 3
    assert all(len(b) == 10 for b in out)
    assert sorted(i for b in out for i in b) == list(range(30))


def test_same_seed_and_epoch_repeat_set_epoch_changes():
    """Batches depend only on (seed, epoch): a new sampler reproduces them; set_epoch and the seed change them."""
    make = lambda seed: SSATBatchSampler(40, 200, 16, 0.5, num_batches=10, seed=seed)  # noqa: E731
    a, b = make(7), make(7)
    assert batches(a) == batches(b)
    assert batches(a) == batches(a)  # iterating twice gives the same epoch
    epoch0 = batches(a)
    a.set_epoch(1)
    epoch1 = batches(a)
    assert epoch1 != epoch0
    b.set_epoch(1)
    assert batches(b) == epoch1
    assert batches(make(8)) != epoch0


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("batch_size", [16, 15])
def test_ddp_shards_are_disjoint_and_complete(batch_size, world_size):
    """The ranks' batches split each global batch (the one a single process draws) between them, point for point,
    every rank with its share of labeled and of unlabeled indices; over the epoch the ranks see different indices."""
    kwargs = dict(num_labeled=30, num_unlabeled=100, batch_size=batch_size, unsup_fraction=0.5,
                  num_batches=12, seed=4)
    ranks = [SSATBatchSampler(**kwargs, rank=r, world_size=world_size) for r in range(world_size)]
    for s in ranks:
        s.set_epoch(3)
    single = SSATBatchSampler(**kwargs)
    single.set_epoch(3)
    global_batches = batches(single)
    shards = [batches(s) for s in ranks]
    assert all(len(shard) == 12 for shard in shards)
    for i, g in enumerate(global_batches):
        parts = [shard[i] for shard in shards]
        assert sum((Counter(p) for p in parts), Counter()) == Counter(g)  # the ranks split the batch slot for slot
        for kind in (lambda j: j < 30, lambda j: j >= 30):
            counts = [sum(map(kind, p)) for p in parts]
            assert max(counts) - min(counts) <= 1
            assert sum(counts) == sum(map(kind, g))
    seen = [set().union(*shard) for shard in shards]
    assert all(a != b for a in seen for b in seen if a is not b)


def test_no_unsupervised_share_means_no_top_up():
    """unsup_fraction = 0 with a pool (as RST): labeled-only batches, the last chunk of a permutation left short."""
    sampler = SSATBatchSampler(num_labeled=10, num_unlabeled=50, batch_size=4, unsup_fraction=0.0, num_batches=3)
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert all(i < 10 for b in batches for i in b)


def test_zero_batches_per_epoch_is_a_config_error():
    with pytest.raises(ConfigError, match="ssat.batches_per_epoch=0"):
        SSATBatchSampler(num_labeled=10, num_unlabeled=5, batch_size=4, unsup_fraction=0.5, num_batches=0)
