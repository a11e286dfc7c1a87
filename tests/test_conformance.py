"""Conformance: every method is what its reference says.

Each test writes the reference's formula out in plain numpy / torch from the paper or the released code it names
(the docstring says which repository and file), runs it on small fixed inputs and compares ssat's result. The
references are written here, never imported from ssat, so that a change to ssat's method shows up as a failure.
(LCS-GMM against scikit-learn's GaussianMixture, CRAIG and GradMatch have their own files.)
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.mixture import GaussianMixture

from ssat.attacks import PGDATLoss, TradesLoss, pgd_attack
from ssat.clustering.gmm import fit_gmm
from ssat.data.sampler import SSATBatchSampler
from ssat.generation.guidance import CentroidGapGuidance, ConfidenceGuidance, GMMGapGuidance
from ssat.models import SmallCNN
from ssat.selection import KMeansMarginSelector, PoolEmbedding, PredictionConfidenceSelector
from ssat.selection.extrapolation import dynamic_uncertainty

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """128 digits in [0, 1] (many pixels exactly 0 or 1, as in real images) and their labels."""
    data = load_digits()
    x = torch.from_numpy(data.images[:128] / 16).float()[:, None]
    return x, torch.from_numpy(data.target[:128]).long()


@pytest.fixture(scope="module")
def model(digits) -> torch.nn.Module:
    """A SmallCNN (with BatchNorm, so train and eval mode differ) after 100 seeded Adam steps on the digits."""
    x, y = digits
    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, num_classes=10, mean=[0.3], std=[0.4], width=8)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.zero_grad(set_to_none=True)
    return net.eval()


# ---------------------------------------------------------------- selection orders


def test_pcs_order_is_the_releases_predconf():
    """TrustMLRG/EfficientSSAT datasets.py, method 'predconf': the pool sorted by max softmax ascending, the first
    numboundary points, then numrandom drawn from the rest."""
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(200, 10)).astype(np.float32)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    confidence = probabilities.max(1)
    numboundary = round(0.4 * 50)
    reference = [index for index, _ in sorted(enumerate(confidence), key=lambda pair: pair[1])][:numboundary]
    selection = PredictionConfidenceSelector("pcs", boundary_fraction=0.4).select(
        PoolEmbedding(np.zeros((200, 2), np.float32), logits), budget=0.25, seed=0)
    np.testing.assert_array_equal(selection.indices[:numboundary], reference)
    rest = selection.indices[numboundary:]
    assert len(rest) == 50 - numboundary and not set(rest.tolist()) & set(reference)


def test_lcs_km_boundary_is_the_releases_margin_rule_on_sklearn_kmeans():
    """TrustMLRG/EfficientSSAT datasets.py, method 'lcs-km': sklearn KMeans(n_clusters) on the features, Euclidean
    distances to the centroids, order by (second smallest - smallest distance) ascending, the first numboundary
    points. ssat fits k-means with FAISS; on these clusters both reach the same partition (n_init=10 here, so that
    the reference's one fit is not a poor local optimum), so the margins and the boundary set must agree."""
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=4.0, size=(4, 8))
    features = np.concatenate([c + rng.normal(size=(150, 8)) for c in centres]).astype(np.float32)
    features = features[rng.permutation(len(features))]
    centroids = KMeans(n_clusters=4, random_state=42, n_init=10).fit(features.astype(np.float64)).cluster_centers_
    distances = np.linalg.norm(features[:, None].astype(np.float64) - centroids, axis=2)
    margin = np.partition(distances, 1)[:, 1] - distances.min(axis=1)
    numboundary = round(0.4 * 120)
    reference = np.argsort(margin)[:numboundary]
    selector = KMeansMarginSelector(boundary_fraction=0.4, n_clusters=4)
    selection = selector.select(PoolEmbedding(features, np.zeros((len(features), 4), np.float32)), 0.2, seed=0)
    np.testing.assert_allclose(selection.scores, margin, atol=1e-3)
    np.testing.assert_array_equal(np.sort(selection.indices[:numboundary]), np.sort(reference))


def test_gmm_log_posteriors_are_sklearns_log_responsibilities():
    """scikit-learn GaussianMixture._estimate_log_prob_resp (log p(k | x)) for the same parameters: what
    selector.score=posterior_gap ranks by (largest minus second largest)."""
    rng = np.random.default_rng(2)
    features = np.concatenate([c + rng.normal(size=(200, 3)) for c in ([0, 0, 0], [30, 0, 0], [0, 30, 0])])
    fit = fit_gmm(features.astype(np.float32), 3, "full", seed=0)
    reference = GaussianMixture(3, covariance_type="full")
    reference.weights_, reference.means_, reference.covariances_ = fit.weights, fit.means, fit.covariances
    reference.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(fit.covariances))
    _, log_resp = reference._estimate_log_prob_resp(features)
    got = fit.log_posteriors(features.astype(np.float32))
    np.testing.assert_allclose(got, log_resp, rtol=1e-4, atol=1e-3)
    assert np.nanmax(-log_resp) > 100, "posteriors far below float64's resolution of 1, where logs still rank"


# ---------------------------------------------------------------- dynamic uncertainty


def nieth_dynamic_uncertainty(predictions: np.ndarray, J: int) -> np.ndarray:
    """BjoernNieth/LS-Dataset-pruning-in-AT core/data/dynamic_uncertainty.py, written out as its loop."""
    K = predictions.shape[0]
    windows = np.zeros((K - J, predictions.shape[1]))
    for i in range(0, K - J):
        mean = predictions[i:i + J].sum(axis=0) / J
        windows[i] = np.sqrt(np.square(predictions[i:i + J] - mean).sum(0) / (J - 1))
    return windows.sum(0) / (K - J)


@pytest.mark.parametrize("epochs, window", [(14, 10), (30, 10), (11, 10), (6, 2)])
def test_dynamic_uncertainty_is_nieth_et_als(epochs, window):
    """K - J windows (the last window start is K - J - 1) and the sample standard deviation (ddof 1)."""
    p = np.random.default_rng(epochs).random((epochs, 9))
    np.testing.assert_allclose(dynamic_uncertainty(p, window), nieth_dynamic_uncertainty(p, window), rtol=1e-12)


# ---------------------------------------------------------------- guidance losses on fixed logits


def test_pcg_loss_is_the_papers_and_the_releases_confidence_term():
    """Main paper / METHODS.md section 3: L_reg = + mean max softmax (minimised: confidence down). The release
    (TrustMLRG/EfficientSSAT diffusionm.py, confidence_minimization_loss) returns - mean max softmax."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 5.0, 1.0], [9.0, 9.0, -9.0]])
    confidence = F.softmax(logits, dim=1).max(dim=1)[0].mean()
    assert ConfidenceGuidance()(logits).item() == pytest.approx(confidence.item(), abs=1e-7)
    assert ConfidenceGuidance(sign="release")(logits).item() == pytest.approx(-confidence.item(), abs=1e-7)


@pytest.mark.parametrize("guidance_class", [CentroidGapGuidance, GMMGapGuidance])
def test_lcg_loss_is_the_releases_boundary_margin(guidance_class):
    """TrustMLRG/EfficientSSAT diffusionmgmm.py, boundary_margin_loss_from_logits: per sample c = argmax, the
    Euclidean distances to class c's centres, |d_(1) - d_(2)| of the two smallest, mean over the batch.
    The centres are given (the module's buffers), so only the loss is compared, with its gradient."""
    rng = np.random.default_rng(3)
    classes, components = 4, 3
    centres = torch.from_numpy(rng.normal(scale=3.0, size=(classes, components, classes))).float()
    logits = torch.from_numpy(rng.normal(scale=3.0, size=(32, classes))).float()
    guidance = guidance_class(components=components)
    guidance.centres, guidance.valid = centres, torch.ones(classes, components, dtype=torch.bool)
    ours = logits.clone().requires_grad_(True)
    loss = guidance(ours)
    loss.backward()

    reference_logits = logits.clone().requires_grad_(True)
    margins = []
    for row in reference_logits:
        d = torch.cdist(row[None], centres[int(row.argmax())], p=2)[0]
        top2 = torch.topk(d, k=2, largest=False).values
        margins.append(torch.abs(top2[0] - top2[1]))
    reference = torch.stack(margins).mean()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(ours.grad, reference_logits.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- TRADES and PGD


def trades_reference_attack(model, x_natural, step_size, epsilon, perturb_steps):
    """yaodongyu/TRADES trades.py (as copied into yaircarmon/semisup-adv losses.py): eval mode, a 0.001 Gaussian
    start, K sign steps on KL(p(x) || p(x_adv)) (sum), projected on the eps-ball and [0, 1]."""
    model.eval()
    criterion_kl = torch.nn.KLDivLoss(reduction="sum")
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return torch.clamp(x_adv, 0.0, 1.0).detach()


def trades_reference_loss(model, x_natural, x_adv, y, beta):
    """yaircarmon/semisup-adv losses.py trades_loss after the attack: train mode, CE ignoring label -1, plus beta
    times KL(p(x) || p(x_adv)) summed and divided by the batch size (p(x) not detached)."""
    model.train()
    criterion_kl = torch.nn.KLDivLoss(reduction="sum")
    logits_adv = F.log_softmax(model(x_adv), dim=1)
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y, ignore_index=-1)
    loss_robust = criterion_kl(logits_adv, F.softmax(logits, dim=1)) / len(x_natural)
    return loss_natural + beta * loss_robust


def test_trades_attack_is_the_reference_loop_from_the_same_random_start(model, digits):
    """yaodongyu/TRADES trades.py: the same seed gives the same 0.001 N(0, I) start, then the same 10 steps."""
    x, _ = digits
    trades = TradesLoss(eps=0.1, alpha=0.02, steps=10)
    torch.manual_seed(5)
    ours = trades.adversarial_examples(copy.deepcopy(model), x)
    torch.manual_seed(5)
    reference = trades_reference_attack(copy.deepcopy(model), x, 0.02, 0.1, 10)
    assert (ours - x).abs().max() > 0.05, "the attack moved"
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_trades_loss_and_gradient_are_the_reference_formula_at_a_fixed_x_adv(model, digits):
    """yaircarmon/semisup-adv losses.py trades_loss (from yaodongyu/TRADES): the loss value and every parameter
    gradient, for the x_adv ssat's own attack makes with this seed, and labels -1 on half the batch (RST's
    unlabeled points without pseudo-labels: no CE, but KL)."""
    x, y = digits
    y = y.clone()
    y[::2] = -1
    trades = TradesLoss(eps=0.1, alpha=0.02, steps=5, beta=6.0)
    torch.manual_seed(6)
    x_adv = trades.adversarial_examples(copy.deepcopy(model), x)

    ours_model = copy.deepcopy(model).train()
    torch.manual_seed(6)
    loss, logs = trades(ours_model, x, y)
    loss.backward()
    reference_model = copy.deepcopy(model)
    reference = trades_reference_loss(reference_model, x, x_adv, y, beta=6.0)
    reference.backward()
    assert logs["robust"] > 0
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for (name, p), q in zip(ours_model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def madry_reference_pgd(model, x, y, epsilon, alpha, steps):
    """Madry et al. 2018, MadryLab/mnist_challenge pgd_attack.py: a uniform start in the eps-ball clipped to the
    image range, then steps of alpha sign(grad CE) projected on the eps-ball and [0, 1]; model in eval mode."""
    model.eval()
    x_adv = torch.clamp(x + torch.empty_like(x).uniform_(-epsilon, epsilon), 0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.clamp(torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - epsilon), x + epsilon),
                            0.0, 1.0)
    return x_adv.detach()


def test_pgd_is_the_reference_loop_from_the_same_random_start(model, digits):
    """PGD evaluation and PGD-AT's attack against the reference loop, from the same seeded random start."""
    x, y = digits
    torch.manual_seed(7)
    ours = pgd_attack(copy.deepcopy(model), x, y, eps=0.1, alpha=0.02, steps=10)
    torch.manual_seed(7)
    training = PGDATLoss(eps=0.1, alpha=0.02, steps=10).attack(copy.deepcopy(model).train(), x, y)
    torch.manual_seed(7)
    reference = madry_reference_pgd(copy.deepcopy(model), x, y, 0.1, 0.02, 10)
    assert (ours - x).abs().max() > 0.05, "the attack moved"
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(training, reference, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the RST batch sampler


def rst_batch_composition(num_labeled: int, batch_size: int, unsup_fraction: float, num_batches: int):
    """yaircarmon/semisup-adv datasets.py SemiSupervisedSampler: int(B f) unlabeled per batch; the labeled part
    walks a permutation in chunks of B - int(B f) (the last chunk short, topped up with unlabeled); a new
    permutation when it runs out; exactly num_batches batches. Returns the labeled count of every batch."""
    sup_batch_size = batch_size - int(batch_size * unsup_fraction)
    counts = []
    while len(counts) < num_batches:
        for start in range(0, num_labeled, sup_batch_size):
            if len(counts) == num_batches:
                break
            counts.append(len(range(num_labeled)[start:start + sup_batch_size]))
    return counts


@pytest.mark.parametrize("num_labeled, batch_size, unsup_fraction", [(50, 16, 0.5), (23, 10, 0.35),
                                                                      (40, 256, 0.3), (100, 12, 0.75)])
def test_sampler_batches_are_rst_semisupervised_sampler(num_labeled, batch_size, unsup_fraction):
    """Batch by batch: the labeled count of RST's sampler, B - that count unlabeled, every batch B long; each
    pass over the labeled set a permutation; unlabeled indices uniform with replacement."""
    num_unlabeled, num_batches = 30, 60
    sampler = SSATBatchSampler(num_labeled, num_unlabeled, batch_size, unsup_fraction, num_batches=num_batches,
                               seed=0)
    batches = [np.asarray(b) for b in sampler]
    expected = rst_batch_composition(num_labeled, batch_size, unsup_fraction, num_batches)
    assert len(batches) == len(sampler) == num_batches
    assert [int((b < num_labeled).sum()) for b in batches] == expected
    assert all(len(b) == batch_size for b in batches)
    labeled = np.concatenate([b[b < num_labeled] for b in batches])
    passes = len(labeled) // num_labeled
    for k in range(passes):
        assert sorted(labeled[k * num_labeled:(k + 1) * num_labeled].tolist()) == list(range(num_labeled))
    unlabeled = np.concatenate([b[b >= num_labeled] for b in batches]) - num_labeled
    assert unlabeled.min() >= 0 and unlabeled.max() < num_unlabeled
    counts = np.bincount(unlabeled, minlength=num_unlabeled)
    assert (counts > 0).all(), "every unlabeled index is drawn"
    assert any(len(np.unique(b[b >= num_labeled])) < int((b >= num_labeled).sum()) for b in batches), \
        "with replacement: some batch repeats an unlabeled index"
