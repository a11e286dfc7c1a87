"""Stage 4: pseudo-labels of the selected points, the intermediate model's argmax."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ssat.artifacts import Embedding, PseudoLabels, SelectionFiles
from ssat.pipeline.runner import StageContext
from ssat.pipeline.stage import Stage
from ssat.selection.labels import TrainingLabels
from ssat.selection.target import selection_target


def pseudo_label(logits: np.ndarray, selection: np.ndarray, out_dir: Path,
                 hidden_labels: np.ndarray | None = None, known_labels: np.ndarray | None = None,
                 file_labels: np.ndarray | None = None, kind: str = "hard", temperature: float = 1.0) -> dict[str, Any]:
    """Writes the training labels of the selection (PseudoLabels), aligned with it: the intermediate model's
    argmax and, with ``kind`` soft, its softmax at ``temperature``, unless the candidates come with labels to train
    on: labeled candidates (``known_labels``, selection.target=labeled) keep their true labels, and with
    pool.labels=file a pool keeps its files' labels (``file_labels``, as the release trains on the DDPM files'
    labels); given labels are hard. pseudo_label_acc is always the intermediate model's argmax against the hidden
    labels, when those exist."""
    given = known_labels if known_labels is not None else file_labels
    labels, probabilities = TrainingLabels(kind, temperature, given).of(logits, selection)
    PseudoLabels.save(out_dir, labels, probabilities)
    info: dict[str, Any] = {"labeled": int(len(labels)), "soft": probabilities is not None}
    if hidden_labels is not None:
        predicted = np.asarray(logits[selection]).argmax(axis=1)
        info["pseudo_label_acc"] = float((predicted == hidden_labels[selection]).mean())
    return info


def pool_labels(ctx: StageContext) -> str | None:
    """What the selected pool points train with: the intermediate model's labels, or (pool.labels=file) those of
    the pool's files; None when the candidates are the labeled set."""
    target, data = selection_target(ctx.cfg.selection.target), ctx.value("pool")
    if target.known_labels(data) is not None:
        return None
    return ctx.cfg.pool.get("labels", "intermediate") if data.pool_hidden_labels is not None else "intermediate"


def given_labels(ctx: StageContext) -> np.ndarray | None:
    """Labels of every candidate that train instead of a model's: the labeled target's, or pool.labels=file."""
    target, data = selection_target(ctx.cfg.selection.target), ctx.value("pool")
    known = target.known_labels(data)
    return known if known is not None else data.pool_hidden_labels if pool_labels(ctx) == "file" else None


def _run(ctx: StageContext, out: Path) -> dict[str, Any]:
    target, data, ssat_cfg = selection_target(ctx.cfg.selection.target), ctx.value("pool"), ctx.cfg.ssat
    info = pseudo_label(Embedding.load(ctx.path("embed")).logits, SelectionFiles.indices(ctx.path("select")),
                        out, target.hidden_labels(data), given_labels(ctx), None, ssat_cfg.pseudo_labels,
                        ssat_cfg.pseudo_label_temperature)
    return {**info, "pool_labels": pool_labels(ctx)}


STAGE = Stage("pseudo_label", _run, needs=("embed", "select", "pool"),
              reads=("selection.target", "pool.labels", "ssat.pseudo_labels", "ssat.pseudo_label_temperature"),
              describe=lambda ctx: f"{ctx.inputs['select'].info['selected']} selected points "
                                   f"({pool_labels(ctx) or 'true'} labels)")
