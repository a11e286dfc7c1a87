"""The evaluation stage: PGD variants, the AutoAttack wrapper, resuming, and the sanity checks that must fire on a
model that masks its gradients (and on a randomised one) and stay quiet on a normal one."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from conftest import train_digits_cnn
from ssat.attacks import AutoAttack, pgd_attack
from ssat.stages import evaluate as evaluate_module
from ssat.stages.evaluate import correct_flags, evaluate

PGD = {"eps": 0.1, "alpha": 0.025, "steps": 10, "random_start": True, "loss": "ce", "restarts": 1}
SANITY = {"num_points": 200, "eps_scales": [0.5, 1.0, 2.0], "noise_samples": 10, "tolerance": 0.01}
OFF = {"enabled": False}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    """uint8 images (N, 1, 8, 8) as the pipeline stores them: the first 1400 to train, the rest to evaluate."""
    data = load_digits()
    images = np.round(data.images / 16.0 * 255).astype(np.uint8)[:, None]
    return images[:1400], data.target[:1400], images[1400:], data.target[1400:]


@pytest.fixture(scope="module")
def trained(digits):
    """A standard-trained (not robust) SmallCNN, well above chance."""
    images, labels, _, _ = digits
    return train_digits_cnn(torch.from_numpy(images).float() / 255, torch.from_numpy(labels))


@pytest.fixture
def model(trained):
    return copy.deepcopy(trained)


class Quantized(nn.Module):
    """Rounds its input to 16 grey levels before the classifier: the rounding has zero gradient, so PGD does not
    move, while random and black-box perturbations still change the rounded image (gradient masking)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 16) / 16)


class Randomised(nn.Module):
    """Adds fresh noise to the input at every call: two passes over the same image disagree."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 0.3 * torch.randn_like(x))


def test_pgd_with_zero_eps_equals_clean_accuracy_for_every_loss(model, digits):
    _, _, images, labels = digits
    clean = correct_flags(model, images, labels, 128)
    for loss in ("ce", "cw"):
        attack = lambda m, x, y: pgd_attack(m, x, y, **{**PGD, "eps": 0.0, "loss": loss, "restarts": 2})
        np.testing.assert_array_equal(correct_flags(model, images, labels, 128, attack=attack), clean)


def test_cw_loss_hurts_and_restarts_only_add_fooled_points(model, digits):
    _, _, images, labels = digits
    clean = correct_flags(model, images, labels, 128)
    flags = {}
    for loss in ("ce", "cw"):
        for restarts in (1, 3):
            torch.manual_seed(0)  # the first restart draws the same start in both runs
            attack = lambda m, x, y: pgd_attack(m, x, y, **{**PGD, "loss": loss, "restarts": restarts})
            flags[loss, restarts] = correct_flags(model, images, labels, 1000, attack=attack)
    for loss in ("ce", "cw"):
        assert flags[loss, 1].mean() < clean.mean() - 0.1
        assert not (flags[loss, 3] & ~flags[loss, 1]).any(), "a restart un-fooled a point"
        assert flags[loss, 3].sum() <= flags[loss, 1].sum()


def test_autoattack_wrapper_on_a_tiny_model(model, digits):
    _, _, images, labels = digits
    x = torch.from_numpy(images[:24]).float() / 255
    y = torch.from_numpy(labels[:24])
    model.train()  # the wrapper must attack in eval mode and restore the mode
    attack = AutoAttack(eps=0.1, seed=0)
    x_adv = attack(model, x, y)
    assert model.training
    model.eval()
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        robust = model(x_adv).argmax(1) == y
        pgd = model(pgd_attack(model, x, y, **PGD)).argmax(1) == y
    assert not (robust & ~clean).any()
    assert robust.sum() < clean.sum(), "AutoAttack at eps 0.1 fools some digits of a standard-trained model"
    assert robust.sum() <= pgd.sum()
    assert torch.equal(x_adv[robust], x[robust]), "unfooled points come back unchanged"


def test_sanity_checks_pass_on_a_normal_model(model, digits, tmp_path):
    _, _, images, labels = digits
    result = evaluate(model, images, labels, tmp_path, 256, PGD, OFF, SANITY, chunk_size=200)
    sanity = result["sanity"]
    assert sanity["passed"] and sanity["failed"] == [], sanity
    assert set(sanity["checks"]) == {"pgd_eps0_equals_clean", "robust_acc_falls_with_eps", "pgd_beats_random_noise"}
    eps0 = sanity["checks"]["pgd_eps0_equals_clean"]
    assert eps0["mismatched_points"] == 0 and eps0["pgd_eps0_acc"] == eps0["clean_acc"]
    assert sanity["checks"]["robust_acc_falls_with_eps"]["eps"] == pytest.approx([0.05, 0.1, 0.2])
    assert result["robust_acc"] < result["clean_acc"]


def test_sanity_checks_fire_on_a_model_that_masks_its_gradients(model, digits, tmp_path, caplog):
    _, _, images, labels = digits
    masked = Quantized(model)
    with caplog.at_level("WARNING", logger="ssat"):
        result = evaluate(masked, images, labels, tmp_path, 256, PGD, OFF, SANITY, chunk_size=200)
    sanity = result["sanity"]
    assert not sanity["passed"]
    assert "pgd_beats_random_noise" in sanity["failed"], sanity
    check = sanity["checks"]["pgd_beats_random_noise"]
    assert check["random_noise_acc"] < check["pgd_acc"]
    assert "SANITY CHECK FAILED: pgd_beats_random_noise" in caplog.text
    assert sanity["checks"]["pgd_eps0_equals_clean"]["passed"], "the model is deterministic"


def test_sanity_checks_fire_on_a_randomised_model(model, digits, tmp_path):
    _, _, images, labels = digits
    result = evaluate(Randomised(model), images, labels, tmp_path, 256, PGD, OFF, SANITY, chunk_size=200)
    assert "pgd_eps0_equals_clean" in result["sanity"]["failed"]
    assert result["sanity"]["checks"]["pgd_eps0_equals_clean"]["mismatched_points"] > 0


def test_autoattack_check_and_warnings_on_the_masked_model(model, digits, tmp_path):
    """Square (black-box) fools what PGD cannot: AutoAttack lands far below PGD, and its own checks warn."""
    _, _, images, labels = digits
    images, labels = images[:32], labels[:32]
    result = evaluate(Quantized(model), images, labels, tmp_path, 256, PGD, {"enabled": True, "eps": 0.1},
                      {**SANITY, "num_points": 32})
    assert result["autoattack_acc"] < result["robust_acc"] - 0.1
    assert result["sanity"]["checks"]["autoattack_not_above_pgd"]["passed"]
    assert any("zero gradient" in w for w in result["autoattack_warnings"]), result["autoattack_warnings"]


class Interrupt(Exception):
    pass


def test_an_interrupted_evaluation_resumes_with_the_points_still_to_attack(model, digits, tmp_path, monkeypatch):
    _, _, images, labels = digits
    images, labels = images[:24], labels[:24]
    attacked: list[int] = []

    class CountingAutoAttack(AutoAttack):
        """Counts the points it is called on; PGD in AutoAttack's place (what is resumed is the chunks, whatever
        attack fills them: the real AutoAttack is tested above)."""
        fail_at_call = None

        def __call__(self, model, x, y):
            if len(attacked) == self.fail_at_call:
                raise Interrupt
            attacked.append(len(x))
            return pgd_attack(model, x, y, **PGD)

    monkeypatch.setattr(evaluate_module, "AutoAttack", CountingAutoAttack)
    aa = {"enabled": True, "eps": 0.1}
    run = lambda: evaluate(model, images, labels, tmp_path, 256, PGD, aa, {**SANITY, "num_points": 8}, chunk_size=8)

    CountingAutoAttack.fail_at_call = 1  # killed while attacking the second chunk
    with pytest.raises(Interrupt):
        run()
    assert attacked == [8]
    assert len(list((tmp_path / "flags" / "autoattack").glob("*.npy"))) == 1
    CountingAutoAttack.fail_at_call = None
    resumed = run()
    assert attacked == [8, 8, 8], "only the two chunks still to attack ran"
    saved = np.concatenate([np.load(p) for p in sorted((tmp_path / "flags" / "autoattack").glob("*.npy"))])
    assert resumed["autoattack_acc"] == pytest.approx(saved.mean())
    again = run()
    assert attacked == [8, 8, 8] and again == resumed, "a finished evaluation is read back whole"


def test_resumed_chunks_give_the_numbers_of_an_uninterrupted_run(model, digits, tmp_path):
    """Each chunk is seeded from its position: deleting chunks and recomputing them reproduces them bit for bit."""
    _, _, images, labels = digits
    whole = evaluate(model, images, labels, tmp_path / "a", 256, PGD, OFF, SANITY, chunk_size=100)
    for path in sorted((tmp_path / "a" / "flags").glob("*/*.npy"))[1::2]:
        path.unlink()
    resumed = evaluate(model, images, labels, tmp_path / "a", 256, PGD, OFF, SANITY, chunk_size=100)
    assert resumed == whole


def test_a_failed_check_is_repeated_under_the_final_table():
    from ssat.pipeline import format_summary

    summary = {"selector": "lcs_km", "budget": 0.2, "clean_acc": 0.9, "robust_acc": 0.8, "autoattack_acc": 0.7,
               "sizes": {"labeled": 300, "pool": 987, "selected": 197, "boundary": 79, "random": 118},
               "timings": {"evaluate": 1.0}, "cached": {"evaluate": False}, "total_seconds": 1.0,
               "sanity": {"passed": False, "failed": ["pgd_beats_random_noise"]}}
    table = format_summary(summary)
    assert "autoattack_acc" in table and "0.7000" in table
    assert "SANITY CHECKS FAILED: pgd_beats_random_noise" in table.splitlines()[-1]
    summary["sanity"] = {"passed": True, "failed": []}
    assert "SANITY" not in format_summary(summary)
