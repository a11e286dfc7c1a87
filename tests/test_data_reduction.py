"""The related data-reduction methods: selection target, class balance, importance extrapolation, adversarial
coresets (METHODS.md section 4), on small real problems and through the command line on digits."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from conftest import FAST, run_in_process, run_ssat
from ssat.attacks import PGDATLoss, TradesLoss
from ssat.attacks.losses import WeightedLoss
from ssat.data.datasets import load_digits
from ssat.data.sampler import SSATBatchSampler
from ssat.data.training_set import LabeledAndSelected
from ssat.lightning.coreset import CoresetReselection
from ssat.models import SmallCNN
from ssat.selection import PoolEmbedding, PredictionConfidenceSelector, RandomSelector
from ssat.selection.base import TrainingSetup
from ssat.selection.coreset import CoresetSelector, Craig, GradMatch, last_layer_gradients
from ssat.selection.extrapolation import dynamic_uncertainty, extrapolate


@pytest.fixture(scope="module")
def digits():
    data = load_digits(test_fraction=0.2, split_seed=0)
    return data.train_images[:240], data.train_labels[:240]


@pytest.fixture(scope="module")
def adversarial_gradients(digits):
    """Real last-layer TRADES gradients of a briefly trained small CNN on 240 digits."""
    images, labels = digits
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, mean=[0.3], std=[0.4], width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.from_numpy(images).float() / 255, torch.from_numpy(labels.astype(np.int64))
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    loss = TradesLoss(eps=0.1, alpha=0.025, steps=3)
    batches = [(images[s:s + 64], labels[s:s + 64]) for s in range(0, len(labels), 64)]
    return last_layer_gradients(model, loss, batches), labels


# ---------------------------------------------------------------- class balance


def _imbalanced_pool(seed: int = 0):
    """600 points, classes 0..3 with 300/150/100/50 members; class 0 is the least confident by far."""
    rng = np.random.default_rng(seed)
    classes = np.repeat(np.arange(4), [300, 150, 100, 50])
    logits = rng.normal(size=(600, 4)).astype(np.float32) * 0.1
    logits[np.arange(600), classes] += np.where(classes == 0, 0.5, 4.0)
    return PoolEmbedding(rng.normal(size=(600, 5)).astype(np.float32), logits), classes


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_class_balanced_selection_takes_the_same_share_of_every_class(budget):
    pool, classes = _imbalanced_pool()
    balanced = PredictionConfidenceSelector("pcs", boundary_fraction=1.0, class_balanced=True).select(pool, budget, 0)
    counts = np.bincount(classes[balanced.indices], minlength=4)
    assert counts.sum() == round(budget * 600) == len(np.unique(balanced.indices))
    np.testing.assert_allclose(counts / np.bincount(classes), budget, atol=1.0 / 50)
    # within each class the least confident points were taken
    conf = np.exp(pool.logits) / np.exp(pool.logits).sum(1, keepdims=True)
    for c in range(4):
        members = np.flatnonzero(classes == c)
        taken = np.intersect1d(balanced.indices, members)
        left = np.setdiff1d(members, taken)
        assert conf[taken].max(1).max() <= conf[left].max(1).min()
    plain = PredictionConfidenceSelector("pcs", boundary_fraction=1.0).select(pool, budget, 0)
    assert np.bincount(classes[plain.indices], minlength=4)[0] == round(budget * 600), \
        "without the option the score drains class 0 only: the balanced result is not an accident"


def test_class_balanced_uses_true_labels_when_the_candidates_have_them():
    pool, classes = _imbalanced_pool()
    labels = np.roll(classes, 7)  # true labels that disagree with the pseudo-classes
    labeled = PoolEmbedding(pool.features, pool.logits, labels=labels)
    sel = RandomSelector(class_balanced=True).select(labeled, 0.2, 3)
    np.testing.assert_array_equal(np.bincount(labels[sel.indices]), [60, 30, 20, 10])


# ---------------------------------------------------------------- importance extrapolation


def test_extrapolated_scores_are_the_mean_of_the_nearest_scored_neighbours():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(300, 6)).astype(np.float32)
    scored = np.sort(rng.choice(300, 40, replace=False))
    du = rng.random(40)
    got = extrapolate(features, scored, du, neighbours=12, batch_size=64)
    distances = ((features[:, None, :].astype(np.float64) - features[scored][None]) ** 2).sum(-1)
    brute = du[np.argsort(distances, axis=1)[:, :12]].mean(1)
    rest = np.setdiff1d(np.arange(300), scored)
    np.testing.assert_allclose(got[rest], brute[rest], rtol=1e-9)
    np.testing.assert_array_equal(got[scored], du)


def test_dynamic_uncertainty_is_zero_for_steady_probabilities():
    steady = np.tile(np.linspace(0.1, 0.9, 9), (14, 1))
    np.testing.assert_allclose(dynamic_uncertainty(steady, 10), 0.0, atol=1e-12)


# ---------------------------------------------------------------- adversarial coresets


def _weighted_error(grads, indices, weights):
    full = grads.sum(0)
    return np.linalg.norm(full - (weights[:, None] * grads[indices]).sum(0)) / np.linalg.norm(full)


@pytest.mark.parametrize("k", [10, 24])
def test_gradmatch_matches_the_full_gradient_better_than_random_subsets(adversarial_gradients, k):
    grads, _ = adversarial_gradients
    n = len(grads)
    indices, weights = GradMatch(lam=0.5)(grads, k, np.random.default_rng(0))
    assert len(indices) == len(np.unique(indices)) == k and (weights >= 0).all()
    gradmatch = _weighted_error(grads, indices, weights)
    random = [_weighted_error(grads, r, np.full(k, n / k)) for r in
              (np.random.default_rng(s).choice(n, k, replace=False) for s in range(20))]
    assert gradmatch < 0.5 * min(random), (gradmatch, min(random), np.mean(random))


def test_craig_weights_count_the_candidates_each_centre_covers(adversarial_gradients):
    grads, _ = adversarial_gradients
    indices, weights = Craig()(grads, 20, np.random.default_rng(0))
    assert len(np.unique(indices)) == 20
    assert weights.sum() == len(grads) and (weights >= 1).all()
    distances = ((grads[:, None, :] - grads[indices][None]) ** 2).sum(-1)
    np.testing.assert_array_equal(weights, np.bincount(distances.argmin(1), minlength=20))


@pytest.mark.parametrize("per_batch", [None, 8])
def test_per_class_coreset_keeps_class_shares_with_mean_one_weights(adversarial_gradients, per_batch):
    grads, labels = adversarial_gradients
    selector = CoresetSelector("coreset_gradmatch", GradMatch(), per_batch=per_batch)
    indices, weights = selector.choose(grads, labels, 72, np.random.default_rng(1))
    assert len(np.unique(indices)) == len(indices)
    assert abs(len(indices) - 72) <= (0 if per_batch is None else 8 * 10)
    np.testing.assert_allclose(weights.mean(), 1.0, rtol=1e-6)
    if per_batch is None:  # (per batch, whole mini-batches of a class are taken)
        counts = np.bincount(labels[indices], minlength=10)
        np.testing.assert_allclose(counts / np.bincount(labels, minlength=10), 72 / 240, atol=1 / 15)


@pytest.mark.parametrize("loss", [TradesLoss(eps=0.1, alpha=0.025, steps=2), PGDATLoss(eps=0.1, alpha=0.025, steps=2)])
def test_weighted_loss_with_equal_weights_is_the_loss(digits, loss):
    images, labels = digits
    model = SmallCNN(in_channels=1, num_classes=10, mean=[0.3], std=[0.4], width=8).eval()
    x, y = torch.from_numpy(images[:32]).float() / 255, torch.from_numpy(labels[:32].astype(np.int64))
    torch.manual_seed(1)
    plain, _ = loss(model, x, y)
    torch.manual_seed(1)
    weighted, _ = WeightedLoss(loss)(model, x, y, torch.full((32,), 3.0))
    torch.testing.assert_close(weighted, plain)
    torch.manual_seed(1)
    only_first, _ = WeightedLoss(loss)(model, x, y, torch.eye(32)[0])
    torch.manual_seed(1)
    per_point = loss.sample_losses(model, x, y, loss.attack(model, x, y))
    torch.testing.assert_close(only_first, per_point[0])


def test_sampler_draws_from_the_coreset_only():
    sampler = SSATBatchSampler(20, 100, 16, 0.5, num_batches=40, seed=0)
    unrestricted = [list(b) for b in sampler]
    sampler.unlabeled_subset = torch.tensor([3, 50, 97])
    assert {i - 20 for batch in sampler for i in batch if i >= 20} == {3, 50, 97}
    sampler.labeled_subset = torch.tensor([1, 4, 9, 16])
    assert {i for batch in sampler for i in batch if i < 20} == {1, 4, 9, 16}
    sampler.labeled_subset = sampler.unlabeled_subset = None
    assert [list(b) for b in sampler] == unrestricted


def test_coreset_callback_weights_and_resumes_from_its_state(digits, tmp_path):
    images, labels = digits
    parts = []
    for _ in range(2):
        train_set = LabeledAndSelected(images[:40], labels[:40], images[40:], np.arange(200), labels[40:240])
        sampler = SSATBatchSampler(40, 200, 32, 0.5, num_batches=5)
        selector = CoresetSelector("coreset_craig", Craig(), select_every=1, kappa=0.0)
        schedule = selector.schedule(4, 60 / 200, len(sampler))
        setup = TrainingSetup(train_set, sampler, PGDATLoss(0.1, 0.025, 1), images[40:], 60, 4, 0, tmp_path)
        parts.append((train_set, sampler, CoresetReselection(selector, setup, schedule)))
    (first_set, first_sampler, first), (second_set, second_sampler, second) = parts
    assert first_sampler.unlabeled_subset is None and (first_set.weights == 1).all()  # before any choice
    first.reselect(SmallCNN(in_channels=1, num_classes=10, mean=[0.3], std=[0.4], width=8), torch.device("cpu"), 2)
    first.apply()
    chosen = first_sampler.unlabeled_subset.numpy()
    assert len(np.unique(chosen)) == 60 and (first_set.weights[:40] == 1).all()
    np.testing.assert_allclose(first_set.weights[40 + chosen].mean(), 1.0, rtol=1e-6)
    assert (np.delete(first_set.weights[40:], chosen) == 0).all()
    assert len(first_set.__getitems__([0, 40 + chosen[0]])) == 3, "batches carry the weights"
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    np.testing.assert_array_equal(second_sampler.unlabeled_subset.numpy(), chosen)
    np.testing.assert_array_equal(second_set.weights, first_set.weights)
    assert second.history == first.history and first.history[0]["epoch"] == 2
    assert first_sampler.num_batches == second_sampler.num_batches == round(0.3 * 5), "kappa 0: no warm start"


# ---------------------------------------------------------------- through the command line


def run_fast(*overrides: str, tmp_path) -> dict:
    """The pipeline in process on conftest's FAST schedule (a trained model: robust accuracy above 0)."""
    return run_in_process(*FAST, *overrides, tmp_path=tmp_path, tiny=False)


def test_data_pruning_trains_on_the_reduced_labeled_set_alone(tmp_path):
    results = run_fast("selector=random", "selection.target=labeled", "budget=0.5", tmp_path=tmp_path)
    selection = np.load(tmp_path / "run" / "selection.npy")
    assert results["target"] == "labeled" and results["pseudo_label_acc"] is None
    assert results["sizes"]["candidates"] == 300 and results["n_selected"] == 150
    assert selection.max() < 300 and len(np.unique(selection)) == 150
    record = json.loads((tmp_path / "cache" / "ssat" / results["stage_keys"]["ssat"] / "record.json").read_text())
    assert record["info"]["num_labeled"] == 150 and record["info"]["num_unlabeled"] == 0
    assert 0 < results["robust_acc"] < results["clean_acc"]


def logged(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def test_coreset_is_reselected_at_the_configured_epochs(tmp_path, caplog):
    """6 epochs, kappa 0.5, budget 0.3: warm start on every candidate for round(0.3 x 3) = 1 epoch, epochs 1-2
    skipped, coreset chosen at 3 and 5."""
    with caplog.at_level(logging.INFO, logger="ssat"):
        results = run_fast("selector=coreset_gradmatch", "budget=0.3", "selector.select_every=2",
                           "selector.kappa=0.5", tmp_path=tmp_path)
    pool = results["sizes"]["pool"]
    assert results["n_selected"] == round(0.3 * pool) and results["sizes"]["candidates"] == pool
    assert [r["epoch"] for r in results["reselections"]] == [3, 5]
    assert all(r["size"] == results["n_selected"] for r in results["reselections"])
    assert results["selection_seconds"] >= sum(r["seconds"] for r in results["reselections"]) > 0
    assert results["total_seconds"] >= results["timings"]["ssat"] >= results["selection_seconds"] - \
        results["timings"]["select"]
    assert "coreset coreset_gradmatch: %d of %d candidates chosen at epoch 5" % (results["n_selected"], pool) \
        in logged(caplog)
    assert 0 < results["robust_acc"] < results["clean_acc"]


def test_coreset_of_the_labeled_set_is_plain_adversarial_training_on_a_weighted_subset(tmp_path, caplog):
    """ACS' own setting: no pool, CRAIG re-chooses half of the labeled set (by true labels) during training."""
    with caplog.at_level(logging.INFO, logger="ssat"):
        results = run_fast("selector=coreset_craig", "selection.target=labeled", "budget=0.5",
                           "selector.select_every=2", "selector.kappa=0.5", tmp_path=tmp_path)
    assert results["n_selected"] == 150 and [r["epoch"] for r in results["reselections"]] == [3, 5]
    assert "coreset coreset_craig: 150 of 300 candidates chosen at epoch 3" in logged(caplog)
    record = json.loads((tmp_path / "cache" / "ssat" / results["stage_keys"]["ssat"] / "record.json").read_text())
    assert record["info"]["num_unlabeled"] == 0 and record["info"]["coreset_size"] == 150
    assert 0 < results["robust_acc"] < results["clean_acc"]


@pytest.mark.slow
def test_multirun_of_new_selectors_beside_lcs(tmp_path):
    sweep = tmp_path / "sweep"
    run_ssat("-m", "selector=lcs_km,coreset_craig_pb,extrapolation", "budget=0.3", f"hydra.sweep.dir={sweep}",
             run_dir=tmp_path / "unused", cache_dir=tmp_path / "cache")
    found = {json.loads(p.read_text())["selector"]: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert set(found) == {"lcs_km", "coreset_craig_pb", "extrapolation"}
    for name, results in found.items():
        assert results["n_selected"] == round(0.3 * results["sizes"]["pool"])
        assert results["selection_seconds"] > 0 and 0 < results["robust_acc"] < results["clean_acc"]
    assert found["extrapolation"]["sizes"]["boundary"] == found["extrapolation"]["n_selected"]
    assert [r["epoch"] for r in found["coreset_craig_pb"]["reselections"]] == [3]  # ACS: int(0.6 x 6 epochs)
    run_dir = next(sweep.glob("*_extrapolation_*"))
    scores, selection = np.load(run_dir / "scores.npy"), np.load(run_dir / "selection.npy")
    assert np.isfinite(scores).all() and len(np.unique(scores)) > 10
    kept = found["extrapolation"]["n_selected"]
    assert scores[selection].max() <= np.delete(scores, selection).min(), "the highest DU (lowest score) is kept"
    assert len(selection) == kept
