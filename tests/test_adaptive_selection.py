"""Adaptive selection (selector.reselect_every) and soft pseudo-labels (ssat.pseudo_labels=soft)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from conftest import compose, run_in_process, run_ssat, train_digits_cnn
from ssat.artifacts import Embedding, PseudoLabels, Reselections
from ssat.attacks.losses import PGDATLoss, TradesLoss
from ssat.config import build
from ssat.data.sampler import SSATBatchSampler
from ssat.data.training_set import LabeledAndSelected
from ssat.lightning import EMA, RobustClassifierModule
from ssat.lightning.ema import evaluated_model
from ssat.lightning.reselection import AdaptiveReselection
from ssat.models import SmallCNN
from ssat.selection.base import PoolView, TrainingSetup
from ssat.selection.labels import TrainingLabels
from ssat.stages.embed import embed_pool

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_schedule_starts_after_the_warm_up_and_repeats_every_m_epochs():
    lcs = build(compose("selector=lcs_km", "selector.reselect_every=3").selector)
    assert lcs.reselect_epochs(10) == [3, 6, 9]
    warm = build(compose("selector=pcs", "selector.reselect_every=3", "selector.reselect_warmup=1").selector)
    assert warm.reselect_epochs(10) == [1, 4, 7]
    assert build(compose("selector=lcs_gmm").selector).reselect_epochs(10) == []


def test_reselections_happen_at_the_scheduled_epochs_logged_and_in_results(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ssat"):
        results = run_in_process("selector=lcs_km", "selector.reselect_every=2", "ssat.epochs=5",
                                 "ssat.batches_per_epoch=2", tmp_path=tmp_path)
    size = results["n_selected"]
    assert [(r["epoch"], r["size"]) for r in results["reselections"]] == [(2, size), (4, size)]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reselect lcs_km")]
    assert [line.split("for epoch ")[1].split(" ")[0] for line in logged] == ["2", "4"]
    assert results["selection_seconds"] == pytest.approx(
        results["timings"]["select"] + sum(r["seconds"] for r in results["reselections"]))
    saved = Reselections.load(Path(results["stage_dirs"]["ssat"]))
    assert sorted(saved) == [2, 4] and all(len(v) == size for v in saved.values())
    assert not (Path(results["stage_dirs"]["ssat"]) / "reselect").exists()  # the scratch embedding is gone


def digits_pool() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return (digits.images / 16 * 255).round().astype(np.uint8)[:, None], digits.target.astype(np.int64)


def small_cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(in_channels=1, num_classes=10, mean=[0.3], std=[0.4], width=8).eval()


@pytest.mark.parametrize("relabel", [False, True])
def test_a_reselection_is_the_current_models_selection_and_labels(tmp_path, relabel):
    """The case is built so that the current model must change the selection's labels: the intermediate model is
    an untrained network (labels near chance), the current one a trained classifier. The re-selection equals the
    selector's choice on a fresh embedding of the pool by the current model; with relabel its labels are the
    current model's, far more accurate than the intermediate model's, which it keeps without relabel."""
    images, labels = digits_pool()
    labeled, pool, pool_labels = images[:200], images[200:], labels[200:]
    intermediate = small_cnn(1)
    current = train_digits_cnn(torch.from_numpy(images).float() / 255, torch.from_numpy(labels))
    for name in ("intermediate", "current", "stage"):
        (tmp_path / name).mkdir()
    embed_pool(intermediate, pool, tmp_path / "intermediate", 256)
    first = Embedding.load(tmp_path / "intermediate")
    selector = build(compose("selector=lcs_km", "selector.reselect_every=3", f"selector.relabel={relabel}").selector)
    size = 300
    initial = selector.choose_n(first, size, seed=0)
    train_set = LabeledAndSelected(labeled, labels[:200], pool, initial.indices,
                                   np.asarray(first.logits).argmax(1)[initial.indices])
    sampler = SSATBatchSampler(train_set.num_labeled, size, 64, 0.5, 2)
    setup = TrainingSetup(train_set, sampler, TradesLoss(), pool, size, 10, 0, tmp_path / "stage",
                          PoolView(first.logits, TrainingLabels(), pool_labels, 256))
    reselection = AdaptiveReselection(selector, setup, [3])
    reselection.reselect(current, torch.device("cpu"), 3)

    embed_pool(current, pool, tmp_path / "current", 256)
    now = Embedding.load(tmp_path / "current")
    expected = selector.choose_n(now, size, seed=3)  # the re-selection's seed: seed * 1_000_003 + epoch
    assert np.array_equal(np.sort(expected.indices), train_set.selection)
    assert not np.array_equal(np.sort(initial.indices), train_set.selection)
    by_index = dict(zip(train_set.selection.tolist(), train_set.pseudo_labels.tolist()))
    source = now if relabel else first
    assert [by_index[i] for i in expected.indices.tolist()] == np.asarray(source.logits)[expected.indices].argmax(
        1).tolist()
    accuracy = reselection.history[0]["pseudo_label_acc"]
    assert accuracy > 0.8 if relabel else accuracy < 0.3
    assert Reselections.load(tmp_path / "stage")[3].tolist() == expected.indices.tolist()


def test_the_reselection_model_is_the_ema_average_when_the_ema_is_on():
    live, averaged = small_cnn(0), small_cnn(1)
    module = RobustClassifierModule(live, TradesLoss(), {"lr": 0.1}, 1)
    ema = EMA(0.9)
    ema.ema = {f"model.{k}": v.clone() for k, v in averaged.state_dict().items()}
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(evaluated_model(L.Trainer(callbacks=[ema], logger=False), module)(x), averaged(x))
        assert evaluated_model(L.Trainer(logger=False), module) is live


def test_soft_cross_entropy_equals_hard_when_the_probabilities_are_one_hot():
    """Each target on its own copy of the network (train-mode forwards move batch-norm statistics)."""
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    one_hot = F.one_hot(y, 10).float()
    for loss in (TradesLoss(eps=0.1, alpha=0.03, steps=3), PGDATLoss(eps=0.1, alpha=0.03, steps=3)):
        values = []
        for target in (y, one_hot):
            model = small_cnn(0).train()
            torch.manual_seed(5)
            value, _ = loss(model, x, target)
            grads = torch.autograd.grad(value, list(model.parameters()))
            torch.manual_seed(5)
            x_adv = loss.attack(model, x, target)
            values.append((value, grads, loss.sample_losses(model, x, target, x_adv)))
        (hard, hard_grads, hard_points), (soft, soft_grads, soft_points) = values
        assert torch.allclose(hard, soft, rtol=1e-6, atol=1e-7)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(hard_grads, soft_grads))
        assert torch.allclose(hard_points, soft_points, rtol=1e-6, atol=1e-7)


def test_soft_batches_carry_the_probabilities_and_one_hot_labeled_points():
    images = np.arange(5 * 4, dtype=np.uint8).reshape(5, 1, 2, 2)
    probabilities = np.array([[0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    data = LabeledAndSelected(images[:2], np.array([1, 0]), images[2:], np.array([2, 0]), np.array([1, 0]),
                              probabilities)
    _, targets = data.__getitems__([0, 1, 2, 3])
    # the selection is kept sorted by pool index: position 2 is pool row 0 (probabilities [0.6, 0.4])
    assert np.allclose(targets.numpy(), [[0, 1], [1, 0], [0.6, 0.4], [0.2, 0.8]])


def test_soft_pseudo_labels_at_a_tiny_temperature_train_as_the_hard_ones(tmp_path):
    """At temperature 1e-4 the stored probabilities are the one-hot argmax labels, and SSAT trains to the hard
    run's weights (within float rounding: the soft loss sums its terms in another order)."""
    common = ["ssat.epochs=2", "ssat.batches_per_epoch=3"]
    hard = run_in_process(*common, tmp_path=tmp_path)
    soft = run_in_process(*common, "ssat.pseudo_labels=soft", "ssat.pseudo_label_temperature=1e-4",
                          tmp_path=tmp_path)
    folder = Path(soft["stage_dirs"]["pseudo_label"])
    probabilities, labels = PseudoLabels.load_soft(folder), PseudoLabels.load(folder)
    assert np.array_equal(probabilities, np.eye(10, dtype=np.float32)[labels])
    assert PseudoLabels.load_soft(Path(hard["stage_dirs"]["pseudo_label"])) is None
    weights = [torch.load(Path(r["stage_dirs"]["ssat"]) / "model.pt", weights_only=True) for r in (hard, soft)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.allclose(weights[0][k].float(), weights[1][k].float(), rtol=1e-4, atol=1e-5)
               for k in weights[0])
    assert soft["clean_acc"] == hard["clean_acc"]


ADAPTIVE = ["intermediate.epochs=5", "ssat.epochs=5", "eval.pgd.steps=5", "eval.val_pgd.steps=2", "seed=3",
            "selector=lcs_km", "selector.reselect_every=2", "selector.reselect_warmup=1", "selector.relabel=true"]


def selections(run_dir: Path) -> dict:
    """What the re-selections chose and what came of them: results.json's list less its seconds, each
    re-selection's indices, and the SSAT weights' hash."""
    results = json.loads((run_dir / "results.json").read_text())
    folder = Path(results["stage_dirs"]["ssat"])
    return {"reselections": [{k: v for k, v in r.items() if k != "seconds"} for r in results["reselections"]],
            "indices": {e: v.tolist() for e, v in Reselections.load(folder).items()},
            "model": hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest(),
            "robust_acc": results["robust_acc"]}


@pytest.mark.slow
def test_kill_9_mid_schedule_then_rerun_ends_with_the_uninterrupted_selections(tmp_path):
    """Killed right after the second re-selection was written (before the checkpoint that would hold it), then
    after the next checkpoint of the resumed attempt; the rerun ends with the uninterrupted run's selections."""
    from test_faults import kill_in

    straight = run_ssat(*ADAPTIVE, run_dir=tmp_path / "straight", cache_dir=tmp_path / "cache1", fast=False)
    cache, run_dir = tmp_path / "cache2", tmp_path / "run"
    kill_in("ssat", "reselections/epoch_00003.npy", ADAPTIVE, cache, run_dir, tmp_path / "attempt0.log")
    kill_in("ssat", "checkpoints/last.ckpt", ADAPTIVE, cache, run_dir, tmp_path / "attempt1.log")
    assert "Restoring states from the checkpoint path" in (tmp_path / "attempt1.log").read_text()
    rerun = run_ssat(*ADAPTIVE, run_dir=run_dir, cache_dir=cache, fast=False)
    assert "Restoring states from the checkpoint path" in rerun.proc.stdout + rerun.proc.stderr
    expected = selections(straight.run_dir)
    assert [r["epoch"] for r in expected["reselections"]] == [1, 3]
    assert selections(run_dir) == expected


@pytest.mark.slow
def test_reselection_under_ddp_embeds_on_both_ranks_and_trains_on_one_selection(tmp_path):
    """trainer=ddp with two CPU processes: each re-selection's embedding is sharded over the ranks (the ranks meet
    at its barriers), rank 0 chooses, and the SSAT stage records the re-selections once."""
    ddp = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.precision=32-true"]
    run = run_ssat(*ddp, "selector.reselect_every=1", "ssat.epochs=3", "ssat.batches_per_epoch=2",
                   run_dir=tmp_path / "run", cache_dir=tmp_path / "cache")
    results = run.results
    assert [r["epoch"] for r in results["reselections"]] == [1, 2]
    output = run.proc.stdout + run.proc.stderr
    assert output.count("reselect lcs_km:") == 2  # rank 0 logs; the other rank only warns
    folder = Path(results["stage_dirs"]["ssat"])
    assert sorted(Reselections.load(folder)) == [1, 2] and not list(folder.glob("reselect/rank*"))
