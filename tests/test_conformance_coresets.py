"""Adversarial coresets against their references (hmdolatabadi/ACS and the GRAD-MATCH / CRAIG code it calls):
small independent references written here in numpy / torch from those files' formulas, compared with ssat's
result on fixed inputs built from the real config tree, and the compute a coreset run spends, counted on real
digits runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from scipy.optimize import nnls

from conftest import run_in_process
from ssat.attacks import TradesLoss
from ssat.config import build
from ssat.models import SmallCNN
from ssat.selection.coreset import last_layer_gradients

pytestmark = pytest.mark.usefixtures("one_thread")


def selector_config(name: str, *overrides: str):
    with initialize_config_module(config_module="ssat.conf", version_base="1.3"):
        return compose("config", overrides=[f"selector={name}", *overrides]).selector


@pytest.fixture(scope="module")
def gradients() -> np.ndarray:
    """40 gradient-like rows in 6 dimensions, a common direction plus noise (as real gradients of one class)."""
    rng = np.random.default_rng(3)
    return (rng.normal(size=(40, 6)) + np.array([2.0, -1.0, 0.5, 0.0, 0.0, 1.0])).astype(np.float32)


# ---------------------------------------------------------------- CRAIG


def reference_facility_location(grads: np.ndarray, k: int, squared: bool = True) -> tuple[list[int], np.ndarray]:
    """Exact greedy facility location as ACS runs it: hmdolatabadi/ACS
    cords/robustselectionstrategies/supervisedlearning/craigstrategy.py (``distance``: squared Euclidean, exp=2;
    ``compute_score``: similarity = max(dist) - dist; apricot's greedy maximises sum_i max_{j in S} sim_ij;
    ``compute_gamma``: a centre's weight counts the points whose most similar chosen centre it is)."""
    g = grads.astype(np.float64)
    dist = ((g[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    if not squared:
        dist = np.sqrt(dist)
    sim = dist.max() - dist
    current = np.zeros(len(g))
    chosen: list[int] = []
    for _ in range(k):
        gains = np.maximum(sim - current[None, :], 0).sum(1)  # row j: the gain of adding j
        gains[chosen] = -np.inf
        j = int(np.argmax(gains))
        chosen.append(j)
        current = np.maximum(current, sim[j])
    rep = np.argmax(sim[chosen], axis=0)
    return chosen, np.bincount(rep, minlength=k).astype(np.float32)


@pytest.mark.parametrize("epsilon", ["null", "1.0e-6"])
def test_craig_is_exact_greedy_facility_location_on_squared_distances(gradients, epsilon):
    """hmdolatabadi/ACS craigstrategy.py: with an epsilon whose sample is every candidate (null, or
    (N / k) log(1 / epsilon) >= N) the stochastic greedy is the exact greedy: the same centres in the same order
    and the same weights."""
    craig = build(selector_config("coreset_craig", f"selector.algorithm.epsilon={epsilon}").algorithm)
    k = 6
    indices, weights = craig(gradients, k, np.random.default_rng(0))
    chosen, expected = reference_facility_location(gradients, k)
    assert indices.tolist() == chosen
    np.testing.assert_array_equal(weights, expected)
    assert reference_facility_location(gradients, k, squared=False)[0] != chosen, \
        "these inputs tell the squared distance from the plain one"


def test_craig_euclidean_option_is_the_papers_distance(gradients):
    """The option: |g_i - g_j| (Mirzasoleiman et al. 2020), the same exact greedy otherwise."""
    craig = build(selector_config("coreset_craig", "selector.algorithm.epsilon=null",
                                  "selector.algorithm.distance=euclidean").algorithm)
    indices, weights = craig(gradients, 6, np.random.default_rng(0))
    chosen, expected = reference_facility_location(gradients, 6, squared=False)
    assert indices.tolist() == chosen
    np.testing.assert_array_equal(weights, expected)


# ---------------------------------------------------------------- GradMatch


def reference_omp(grads: np.ndarray, k: int, lam: float = 0.0, tol: float = 1e-6) -> tuple[list[int], np.ndarray]:
    """GRAD-MATCH's OrthogonalMP_REG with positive=True (decile-team/cords, selectionstrategies/helpers/
    omp_solvers.py), as hmdolatabadi/ACS ompgradmatchstrategy.py calls it (A = gradients transposed, b = their
    sum), then ACS's ``ompwrapper``: only the indices with a nonzero weight are kept."""
    a = grads.astype(np.float64).T
    b = a.sum(1)
    resid, indices, x_i = b.copy(), [], np.zeros(0)
    for _ in range(k):
        if np.linalg.norm(resid) / np.linalg.norm(b) < tol:
            break
        projections = a.T @ resid
        index = int(np.argmax(projections))
        if index in indices:
            break
        indices.append(index)
        a_i = a[:, indices].T
        if len(indices) == 1:
            x_i = np.array([projections[index] / (a_i[0] @ a_i[0])])
        else:
            x_i = nnls(a_i @ a_i.T + lam * np.eye(len(indices)), a_i @ b)[0]
        resid = b - a_i.T @ x_i
    keep = x_i > 0
    return [i for i, kept in zip(indices, keep) if kept], x_i[keep]


@pytest.mark.parametrize("k", [3, 5])
def test_gradmatch_is_grad_matchs_omp_with_acs_regulariser(gradients, k):
    """The config's default (ACS: lam 0) against the reference OMP: the same points in the same order, the same
    weights; any points OMP leaves over are a random fill of weight 1 (ACS's top-up)."""
    cfg = selector_config("coreset_gradmatch")
    assert cfg.algorithm.lam == 0
    indices, weights = build(cfg.algorithm)(gradients, k, np.random.default_rng(0))
    chosen, expected = reference_omp(gradients, k)
    assert len(chosen) >= 2, "the reference went past its first step"
    assert indices[:len(chosen)].tolist() == chosen
    np.testing.assert_allclose(weights[:len(chosen)], expected, rtol=1e-5)
    assert len(indices) == len(np.unique(indices)) == k and (weights[len(chosen):] == 1).all()


def test_gradmatch_ridge_option_follows_the_regularised_normal_equations(gradients):
    """lam > 0 (ssat's earlier default 0.5) is the reference's ``lam``: nnls(A A^T + lam I, A b) from the second
    point on."""
    gm = build(selector_config("coreset_gradmatch", "selector.algorithm.lam=50.0").algorithm)
    indices, weights = gm(gradients, 4, np.random.default_rng(0))
    chosen, expected = reference_omp(gradients, 4, lam=50.0)
    assert indices[:len(chosen)].tolist() == chosen
    np.testing.assert_allclose(weights[1:len(chosen)], expected[1:], rtol=1e-5)  # step 1: the reference skips lam


# ---------------------------------------------------------------- the TRADES gradient


def test_trades_gradients_sum_the_clean_and_adversarial_parts_as_acs():
    """hmdolatabadi/ACS dataselectionstrategy.py ``compute_gradients``: l0_grads = the gradient of the per-point
    TRADES loss w.r.t. the clean logits plus that w.r.t. the adversarial logits, i.e. the gradient w.r.t. the
    last layer's bias, which both forward passes share (computed here point by point with autograd). (ACS's
    code multiplies its KL parts by beta twice; ssat's loss has beta once, as TRADES.)"""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, mean=[0.3], std=[0.4], width=8).eval()
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8).numpy()
    labels = np.arange(6) % 10
    loss = TradesLoss(eps=0.1, alpha=0.025, steps=2, beta=6.0)
    gradient = selector_config("coreset_craig").gradient
    torch.manual_seed(1)
    ours = last_layer_gradients(model, loss, [(images, labels)], combine=gradient)
    torch.manual_seed(1)
    x, y = torch.from_numpy(images).float() / 255, torch.from_numpy(labels)
    x_adv = loss.attack(model, x, y)
    expected = []
    for i in range(len(x)):
        logits, logits_adv = model(x[i:i + 1]), model(x_adv[i:i + 1])
        log_p, log_q = torch.log_softmax(logits, 1), torch.log_softmax(logits_adv, 1)
        point = torch.nn.functional.nll_loss(log_p, y[i:i + 1]) + loss.beta * (log_p.exp() * (log_p - log_q)).sum()
        expected.append(torch.autograd.grad(point, model.head.bias)[0].numpy())
    assert ours.shape == (6, 10)
    np.testing.assert_allclose(ours, np.stack(expected), rtol=1e-4, atol=1e-6)
    concat = last_layer_gradients(model, loss, [(images, labels)], combine="concat")
    assert concat.shape == (6, 20), "the option keeps one block per logit vector"


# ---------------------------------------------------------------- compute: ACS's schedule


def ssat_record(results: dict, cache) -> dict:
    return json.loads((cache / "ssat" / results["stage_keys"]["ssat"] / "record.json").read_text())["info"]


@pytest.mark.parametrize("batches_per_epoch", ["8", "null"])
def test_coreset_run_trains_a_share_c_of_full_ssats_examples_plus_the_warm_start(tmp_path, shared_cache,
                                                                                   batches_per_epoch):
    """hmdolatabadi/ACS scripts/robust_train_TRADES.py: kappa_epochs = int(kappa E), full_epochs =
    round(kappa_epochs c) epochs on all the data, nothing until kappa_epochs, then epochs over the coreset (a
    share c of the data). Counted as the batches the Lightning trainer stepped (global_step; every batch holds
    ssat.batch_size examples), for a fixed epoch (8 batches) and for one-pass epochs, against selector=full."""
    epochs, c, kappa = 6, 0.3, 0.6
    common = [f"ssat.batches_per_epoch={batches_per_epoch}", f"ssat.epochs={epochs}", "attack.steps=1"]
    # In process on the tiny schedule but SSAT's epochs, with a one-step attack: what is counted is the steps, not
    # what they learn.
    full = run_in_process("selector=full", *common, tmp_path=tmp_path / "full", cache_dir=shared_cache)
    coreset = run_in_process("selector=coreset_craig", f"budget={c}", *common, tmp_path=tmp_path / "coreset",
                             cache_dir=shared_cache)
    full_steps, steps = ssat_record(full, shared_cache)["steps"], ssat_record(coreset, shared_cache)["steps"]
    per_epoch = full_steps // epochs
    if batches_per_epoch == "null":
        sizes = full["sizes"]
        assert per_epoch == math.ceil((sizes["labeled"] + sizes["pool"]) / 128)  # digits: batch 128
    else:
        assert per_epoch == 8
    start = int(kappa * epochs)
    fraction = coreset["n_selected"] / coreset["sizes"]["pool"]
    warm, coreset_batches = round(fraction * start), round(fraction * per_epoch)
    assert steps == warm * per_epoch + (epochs - start) * coreset_batches
    assert abs(steps - c * full_steps) <= epochs, (steps, c * full_steps)  # about c of full SSAT's, rounding aside
    assert coreset["coreset_schedule"] == {
        "warm_start_epochs": warm, "skipped_epochs": start - warm, "first_coreset_epoch": start,
        "trained_epochs": warm + epochs - start, "batches_per_full_epoch": per_epoch,
        "batches_per_coreset_epoch": coreset_batches}
    assert [r["epoch"] for r in coreset["reselections"]] == [start]
    assert coreset["ssat_epochs"] == warm + epochs - start and full["coreset_schedule"] is None
    for run in (full, coreset):  # the learning-rate schedule counts the skipped epochs: it ends where full SSAT's does
        last = shared_cache / "ssat" / run["stage_keys"]["ssat"] / "checkpoints" / "last.ckpt"
        assert torch.load(last, map_location="cpu", weights_only=False)["lr_schedulers"][0]["last_epoch"] == epochs
