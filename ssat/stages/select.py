"""Stage 3: choose a budget of the pool with a selector."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ssat.artifacts import Embedding, SelectionFiles
from ssat.config import build
from ssat.errors import check_finite
from ssat.pipeline.runner import StageContext
from ssat.pipeline.stage import Stage
from ssat.selection import PoolEmbedding, Selector
from ssat.selection.target import selection_target


def select_pool(selector: Selector, pool: PoolEmbedding, budget: float, seed: int, out_dir: Path) -> dict[str, Any]:
    """Writes the selection (SelectionFiles: pool indices, boundary part first, scores, weights, boundary flags)."""
    check_finite(pool.features, "the pool's features")
    check_finite(pool.logits, "the pool's logits")
    selection = selector.select(pool, budget, seed)
    SelectionFiles.save(out_dir, selection)
    # What training uses: the selection, or the coreset an adaptive selector draws from it during training.
    used = min(len(selection.indices), selector.num_selected(budget, len(pool)))
    return {
        "candidates": int(len(pool)),
        "selected": int(used),
        "boundary": selection.num_boundary,
        "random": int(used - selection.num_boundary),
    }


def _candidates(ctx: StageContext):
    target = selection_target(ctx.cfg.selection.target)
    return target, ctx.value("pool")


def _run(ctx: StageContext, out: Path) -> dict[str, Any]:
    target, data = _candidates(ctx)
    embedding = replace(Embedding.load(ctx.path("embed")), images=target.candidates(data),
                        labels=target.known_labels(data))
    return select_pool(build(ctx.cfg.selector), embedding, ctx.cfg.budget, ctx.cfg.seed, out)


def _describe(ctx: StageContext) -> str:
    target, data = _candidates(ctx)
    selector, n = build(ctx.cfg.selector), len(target.candidates(data))
    return (f"{selector.name}, budget {ctx.cfg.budget} ({selector.num_selected(ctx.cfg.budget, n)} of {n} "
            f"{target.name} points)")


STAGE = Stage("select", _run, needs=("embed", "pool"), reads=("selector", "budget", "seed"), describe=_describe,
              # 2: k-means restarts on a sample then streamed passes; lcs_gmm's PCA on its fit sample
              # 3: lcs_gmm below 256 dimensions prunes with a spectral bound and sums whitened rows (float32)
              version=3,
              code=("ssat.selection", "ssat.clustering", "ssat.models", "ssat.attacks", "ssat.lightning"))
