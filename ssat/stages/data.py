"""The data of a run, split into labeled, validation, pool and test; and the pool that the selection chooses from.

Both are computed in memory on every run (the loaders cache decoded images and converted pools themselves); their
keys hash the config they read and a fingerprint of what was read, so the data's location is in no key.
"""

from __future__ import annotations

from pathlib import Path

from ssat.config import build
from ssat.data.splits import SemiSupervisedData
from ssat.errors import DataError
from ssat.pipeline.runner import StageContext
from ssat.pipeline.stage import Stage


def load_data(cfg) -> SemiSupervisedData:
    """The data set through its loader and the pool group, checked against the config."""
    dataset = build(cfg.dataset.loader)
    channels = dataset.train_images.shape[1]
    if channels != cfg.dataset.channels:
        raise DataError(f"dataset.channels={cfg.dataset.channels} but the images have {channels} channels")
    if cfg.dataset.num_classes is not None and cfg.dataset.num_classes != len(dataset.classes):
        raise DataError(f"dataset.num_classes={cfg.dataset.num_classes} but the data set has "
                        f"{len(dataset.classes)} classes")
    return build(cfg.pool, dataset=dataset, val_size=cfg.val_size)


def _data(ctx: StageContext, out: Path | None):
    data = load_data(ctx.cfg)
    return data, data.fingerprint()


# pool.labels (npz pools: train on the files' labels or the intermediate model's) is checked by the pool's loader
# and changes no image: it is the pseudo_label stage's setting.
DATA = Stage("data", _data, reads=("dataset", "pool", "val_size"), cached=False, code=("ssat.data",),
             unkeyed=("pool.labels",))


def _data_pool(ctx: StageContext, out: Path | None):
    return ctx.value("data"), None


# The data with the unlabeled pool the selection chooses from: the data's own, unless a generative selector's
# stages make one (they declare their own "pool" stage, whose value is the data with the generated pool).
POOL = Stage("pool", _data_pool, needs=("data",), cached=False)
