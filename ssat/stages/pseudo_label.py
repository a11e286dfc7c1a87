"""Stage 4: pseudo-labels of the selected points, the intermediate model's argmax."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ssat.pipeline.runner import StageContext
from ssat.pipeline.stage import Stage
from ssat.selection.target import selection_target
from ssat.stages.embed import load_embedding


def pseudo_label(logits: np.ndarray, selection: np.ndarray, out_dir: Path,
                 hidden_labels: np.ndarray | None = None, known_labels: np.ndarray | None = None) -> dict[str, Any]:
    """Writes pseudo_labels.npy aligned with selection; reports their accuracy when the hidden labels exist.

    Labeled candidates (``known_labels``, selection.target=labeled) keep their true labels."""
    labels = (np.asarray(logits[selection]).argmax(axis=1) if known_labels is None
              else np.asarray(known_labels)[selection]).astype(np.int64)
    np.save(out_dir / "pseudo_labels.npy", labels)
    info: dict[str, Any] = {"labeled": int(len(labels))}
    if hidden_labels is not None:
        info["pseudo_label_acc"] = float((labels == hidden_labels[selection]).mean())
    return info


def _run(ctx: StageContext, out: Path) -> dict[str, Any]:
    target, data = selection_target(ctx.cfg.selection.target), ctx.value("pool")
    return pseudo_label(load_embedding(ctx.path("embed")).logits, np.load(ctx.path("select") / "selection.npy"),
                        out, target.hidden_labels(data), target.known_labels(data))


STAGE = Stage("pseudo_label", _run, needs=("embed", "select", "pool"), reads=("selection.target",),
              describe=lambda ctx: f"{ctx.inputs['select'].info['selected']} selected points")
