"""The pseudo-label stage: the intermediate model's argmax at the selected pool points, in selection order."""

from __future__ import annotations

import numpy as np
import pytest

from ssat.stages.pseudo_label import pseudo_label


@pytest.fixture
def pool():
    """Logits of a 200-point pool, a boundary-first (unsorted) selection and hidden labels right on 13 of 30."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 10)).astype(np.float32)
    selection = rng.choice(200, size=30, replace=False)  # not sorted, as a boundary-first selection is
    argmax = logits.argmax(axis=1)
    hidden = (argmax + 1) % 10  # wrong everywhere ...
    right = selection[rng.choice(30, size=13, replace=False)]
    hidden[right] = argmax[right]  # ... except at 13 selected points
    return logits, selection, hidden


def test_labels_follow_the_selection_order(tmp_path, pool):
    logits, selection, hidden = pool
    info = pseudo_label(logits, selection, tmp_path, hidden)
    labels = np.load(tmp_path / "pseudo_labels.npy")
    assert labels.dtype == np.int64 and labels.shape == (30,)
    for row, index in enumerate(selection):
        assert labels[row] == int(np.argmax(logits[index]))
    assert info["labeled"] == 30


def test_reported_accuracy_is_the_match_rate_with_hidden_labels(tmp_path, pool):
    logits, selection, hidden = pool
    info = pseudo_label(logits, selection, tmp_path, hidden)
    assert info["pseudo_label_acc"] == pytest.approx(13 / 30)
    labels = np.load(tmp_path / "pseudo_labels.npy")
    assert info["pseudo_label_acc"] == pytest.approx(float(np.mean(labels == hidden[selection])))


def test_without_hidden_labels_no_accuracy_is_reported(tmp_path, pool):
    logits, selection, _ = pool
    info = pseudo_label(logits, selection, tmp_path)
    assert "pseudo_label_acc" not in info
    assert (tmp_path / "pseudo_labels.npy").exists()


def test_memory_mapped_logits(tmp_path, pool):
    """Logits saved as .npy and opened memory-mapped (as the embed stage's pool is) give the same labels."""
    logits, selection, hidden = pool
    np.save(tmp_path / "logits.npy", logits)
    mapped = np.load(tmp_path / "logits.npy", mmap_mode="r")
    out = tmp_path / "out"
    out.mkdir()
    info = pseudo_label(mapped, selection, out, hidden)
    np.testing.assert_array_equal(np.load(out / "pseudo_labels.npy"), logits[selection].argmax(axis=1))
    assert info["pseudo_label_acc"] == pytest.approx(13 / 30)
