"""Stage 4: pseudo-labels of the selected points, the intermediate model's argmax."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


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
    np.save(out_dir / "pseudo_labels.npy", labels)
    info: dict[str, Any] = {"labeled": int(len(labels))}
    if hidden_labels is not None:
        info["pseudo_label_acc"] = float((predicted == hidden_labels[selection]).mean())
    return info
