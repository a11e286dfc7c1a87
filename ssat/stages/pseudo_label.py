"""Stage 4: pseudo-labels of the selected points, the intermediate model's argmax."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ssat.artifacts import Embedding, PseudoLabels, SelectionFiles
from ssat.pipeline.runner import StageContext
from ssat.pipeline.stage import Stage
from ssat.selection.target import selection_target


def pseudo_label(logits: np.ndarray, selection: np.ndarray, out_dir: Path,
                 hidden_labels: np.ndarray | None = None, known_labels: np.ndarray | None = None,
                 file_labels: np.ndarray | None = None) -> dict[str, Any]:
    """Writes the training labels of the selection, pseudo_labels.npy, aligned with it: the intermediate model's
    argmax, unless the candidates come with labels to train on: labeled candidates (``known_labels``,
    selection.target=labeled) keep their true labels, and with pool.labels=file a pool keeps its files' labels
    (``file_labels``, as the release trains on the DDPM files' labels). pseudo_label_acc is always the intermediate
    model's argmax against the hidden labels, when those exist."""
    predicted = np.asarray(logits[selection]).argmax(axis=1)
    given = known_labels if known_labels is not None else file_labels
    labels = (predicted if given is None else np.asarray(given)[selection]).astype(np.int64)
    PseudoLabels.save(out_dir, labels)
    info: dict[str, Any] = {"labeled": int(len(labels))}
    if hidden_labels is not None:
        info["pseudo_label_acc"] = float((predicted == hidden_labels[selection]).mean())
    return info


def pool_labels(ctx: StageContext) -> str | None:
    """What the selected pool points train with: the intermediate model's labels, or (pool.labels=file) those of
    the pool's files; None when the candidates are the labeled set."""
    target, data = selection_target(ctx.cfg.selection.target), ctx.value("pool")
    if target.known_labels(data) is not None:
        return None
    return ctx.cfg.pool.get("labels", "intermediate") if data.pool_hidden_labels is not None else "intermediate"


def _run(ctx: StageContext, out: Path) -> dict[str, Any]:
    target, data, labels = selection_target(ctx.cfg.selection.target), ctx.value("pool"), pool_labels(ctx)
    info = pseudo_label(Embedding.load(ctx.path("embed")).logits, SelectionFiles.indices(ctx.path("select")),
                        out, target.hidden_labels(data), target.known_labels(data),
                        data.pool_hidden_labels if labels == "file" else None)
    return {**info, "pool_labels": labels}


STAGE = Stage("pseudo_label", _run, needs=("embed", "select", "pool"), reads=("selection.target", "pool.labels"),
              describe=lambda ctx: f"{ctx.inputs['select'].info['selected']} selected points "
                                   f"({pool_labels(ctx) or 'true'} labels)")
