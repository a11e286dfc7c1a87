"""The pipeline through its command line on digits: every selector, the cache, determinism, sweeps."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from cifar_archive import extract_cifar_subset
from conftest import Run, compose, run_ssat

pytestmark = pytest.mark.slow  # real ssat.run processes (see pyproject's markers)

SELECTORS = ["full", "random", "pcs", "lcs_km", "lcs_gmm"]
BOUNDARY = {"full": 0.0, "random": 0.0, "pcs": 0.4, "lcs_km": 0.4, "lcs_gmm": 0.4}

# FAST's intermediate model (what the selection depends on) with a shorter SSAT: 24 fixed batches still train
# every selector well above chance (clean accuracy about 0.9 at seeds 0 and 1), and a cheaper evaluation.
INTERMEDIATE = ["intermediate.epochs=10"]
SCHEDULE = [*INTERMEDIATE, "ssat.epochs=3", "ssat.batches_per_epoch=8", "eval.pgd.steps=5", "eval.val_pgd.steps=2",
            "eval.sanity.num_points=60", "eval.sanity.noise_samples=2"]
# For the runs whose assertions are about the selection or the cache, not about the trained model.
PLUMBING = [*INTERMEDIATE, "ssat.epochs=1", "ssat.batches_per_epoch=2", "eval.pgd.steps=2", "eval.val_pgd.steps=1",
            "test_size=60", "eval.sanity.num_points=20", "eval.sanity.noise_samples=1"]


def in_process(*overrides: str, cache_dir, run_dir) -> dict:
    """The pipeline in this process on the composed config against ``cache_dir``: its results.json."""
    from ssat.pipeline import run_pipeline

    return run_pipeline(compose(*overrides, f"cache_dir={cache_dir}"), run_dir)


def job_output(proc, number: int) -> str:
    """The part of a basic-launcher multirun's output that job ``number`` printed (Hydra's `#n : ...` lines
    separate the jobs)."""
    text = proc.stdout + proc.stderr
    parts = re.split(r"^.*\[HYDRA\]\s+#(\d+) : .*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))[str(number)]


@pytest.fixture(scope="session")
def selector_runs(tmp_path_factory, shared_cache):
    """Each selector at budget 0.2, one after the other against one cache: one multirun process, as a sweep."""
    root = tmp_path_factory.mktemp("selector_runs")
    sweep = root / "sweep"
    proc = run_ssat("-m", f"selector={','.join(SELECTORS)}", "budget=0.2", *SCHEDULE, f"hydra.sweep.dir={sweep}",
                    fast=False, run_dir=root / "unused", cache_dir=shared_cache).proc
    runs = {}
    for number, selector in enumerate(SELECTORS):
        (job_dir,) = sweep.glob(f"{number}_*")
        run = Run(type(proc)(proc.args, proc.returncode, job_output(proc, number), ""), job_dir)
        assert run.results["selector"] == selector
        runs[selector] = run
    return runs


@pytest.mark.parametrize("selector", SELECTORS)
def test_selector_runs_end_to_end(selector_runs, selector):
    run = selector_runs[selector]
    results = run.results
    n_pool = results["sizes"]["pool"]
    expected = n_pool if selector == "full" else round(0.2 * n_pool)
    assert results["n_selected"] == expected
    assert results["sizes"]["boundary"] == round(BOUNDARY[selector] * expected)
    assert results["sizes"]["boundary"] + results["sizes"]["random"] == expected
    assert 0.5 < results["clean_acc"] <= 1.0, "digits has 10 classes: chance is 0.1"
    assert 0 < results["robust_acc"] < results["clean_acc"]
    assert 0.5 < results["pseudo_label_acc"] <= 1.0
    selection = run.selection
    assert len(selection) == expected == len(np.unique(selection))
    assert selection.min() >= 0 and selection.max() < n_pool
    assert np.load(run.run_dir / "scores.npy").shape == (n_pool,)
    assert (run.run_dir / "checkpoints" / "ssat" / "best.ckpt").exists()
    assert (run.run_dir / ".hydra" / "config.yaml").exists()
    assert set(results["timings"]) == {"intermediate", "embed", "select", "pseudo_label", "ssat", "evaluate"}
    table = run.proc.stdout + run.proc.stderr
    assert "clean_acc" in table and "robust_acc" in table and f"{results['robust_acc']:.4f}" in table


def test_sweep_trains_the_intermediate_model_and_embeds_the_pool_once(selector_runs):
    first, *others = [selector_runs[s].results for s in SELECTORS]
    assert not first["cached"]["intermediate"] and not first["cached"]["embed"]
    for results in others:
        assert results["cached"]["intermediate"] and results["cached"]["embed"]
        assert results["stage_keys"]["embed"] == first["stage_keys"]["embed"]
        assert not results["cached"]["select"] and not results["cached"]["ssat"]


def test_rerun_takes_every_stage_from_the_cache(selector_runs, shared_cache, tmp_path):
    again = in_process("selector=lcs_km", "budget=0.2", *SCHEDULE, cache_dir=shared_cache,
                        run_dir=tmp_path / "run")
    before = selector_runs["lcs_km"].results
    assert all(again["cached"].values())
    assert again["stage_keys"] == before["stage_keys"]
    assert again["robust_acc"] == before["robust_acc"]
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "selection.npy"), selector_runs["lcs_km"].selection)


def test_same_seed_selects_the_same_points_bit_for_bit(selector_runs, tmp_path):
    """A fresh cache recomputes everything (intermediate training included) and must land on the same selection."""
    fresh = in_process("selector=lcs_km", "budget=0.2", *PLUMBING, cache_dir=tmp_path / "cache",
                       run_dir=tmp_path / "fresh")
    assert not any(fresh["cached"].values())
    np.testing.assert_array_equal(np.load(tmp_path / "fresh" / "selection.npy"), selector_runs["lcs_km"].selection)
    np.testing.assert_array_equal(np.load(tmp_path / "fresh" / "scores.npy"),
                                  np.load(selector_runs["lcs_km"].run_dir / "scores.npy"))


def test_another_seed_selects_differently(selector_runs, shared_cache, tmp_path):
    other = in_process("selector=lcs_km", "budget=0.2", "seed=1", *PLUMBING, cache_dir=shared_cache,
                       run_dir=tmp_path / "run")
    assert other["seed"] == 1
    assert not np.array_equal(np.sort(np.load(tmp_path / "run" / "selection.npy")),
                              np.sort(selector_runs["lcs_km"].selection))


def test_multirun_over_selectors_and_budgets(selector_runs, shared_cache, tmp_path):
    """Hydra's sweep grammar (choice(...) here) reaches Hydra's sweeper whole: ssat's checks parse it the same way."""
    sweep = tmp_path / "sweep"
    run_ssat("-m", "selector=choice(random,lcs_gmm)", "budget=0.1,0.2", *PLUMBING, f"hydra.sweep.dir={sweep}",
             fast=False, run_dir=tmp_path / "unused", cache_dir=shared_cache)
    found = {}
    for path in sorted(sweep.glob("*/results.json")):
        results = json.loads(path.read_text())
        found[(results["selector"], results["budget"])] = results
        assert results["n_selected"] == round(results["budget"] * results["sizes"]["pool"])
        assert results["cached"]["intermediate"] and results["cached"]["embed"]
    assert set(found) == {("random", 0.1), ("random", 0.2), ("lcs_gmm", 0.1), ("lcs_gmm", 0.2)}


def test_image_folder_of_real_cifar10_jpegs_with_preact_resnet18(tmp_path):
    """The issue's `dataset=image_folder dataset.root=<dir> model=preact_resnet18`, on a small real subset, with
    AutoAttack on (its default) over 4 classes: APGD-T and FAB-T then target the 3 other classes, not 9."""
    root = extract_cifar_subset(tmp_path / "cifar", per_class_train=15, per_class_test=4,
                                classes=["airplane", "cat", "ship", "truck"])
    run = run_ssat("dataset=image_folder", f"dataset.root={root}", "model=preact_resnet18", "val_size=8",
                   "pool.num_labeled=24", "budget=0.5", "intermediate.epochs=1", "ssat.epochs=1",
                   "ssat.batch_size=32", "ssat.batches_per_epoch=null", "attack.steps=1", "eval.pgd.steps=2",
                   "eval.val_pgd.steps=1", "eval.autoattack.num_points=4", "eval.sanity.num_points=16", fast=False,
                   run_dir=tmp_path / "run", cache_dir=tmp_path / "cache")
    results = run.results
    assert results["dataset"] == "image_folder" and results["model"] == "preact_resnet18"
    assert results["sizes"] == {"labeled": 24, "val": 8, "pool": 28, "test": 16, "candidates": 28, "selected": 14,
                                "boundary": 6, "random": 8}
    assert 0 <= results["robust_acc"] <= results["clean_acc"] <= 1
    assert results["autoattack_num_points"] == 4 and 0 <= results["autoattack_acc"] <= 1
    assert (tmp_path / "cache" / "image_folder").is_dir(), "decoded images are cached for the next run"


def test_npz_pool_in_parts_selects_exactly_as_the_pool_held_in_memory(selector_runs, tmp_path):
    """The digits pool written as three .npz parts (stored and compressed) and run with pool=npz: same selection."""
    from ssat.data.datasets import load_digits
    from ssat.data.splits import split_pool

    data = split_pool(load_digits(test_fraction=0.2, split_seed=0), val_size=150, num_labeled=300,
                      num_unlabeled=None, split_seed=0)
    parts = []
    for i, rows in enumerate(np.array_split(np.arange(len(data.pool_images)), 3)):
        path = tmp_path / f"part{i}.npz"
        save = np.savez_compressed if i == 1 else np.savez
        save(path, image=data.pool_images[rows, 0], label=data.pool_hidden_labels[rows])
        parts.append(str(path))
    results = in_process("pool=npz", f"pool.paths=[{','.join(parts)}]", "selector=lcs_km", "budget=0.2",
                         *PLUMBING, "test_size=null", cache_dir=tmp_path / "cache", run_dir=tmp_path / "run")
    in_memory = selector_runs["lcs_km"]
    assert results["sizes"] == in_memory.results["sizes"]
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "selection.npy"), in_memory.selection)
    assert results["pseudo_label_acc"] == in_memory.results["pseudo_label_acc"]
    assert (tmp_path / "cache" / "pools").is_dir()


GENERATION_FAST = ["generation.pretrain.epochs=2", "generation.finetune.epochs=1", "generation.num_images=64",
                   "generation.sampler.num_inference_steps=4"]


def test_guided_generation_runs_the_whole_chain(selector_runs, shared_cache, tmp_path):
    """selector=lcg_km on digits: a small DDPM is pretrained, fine-tuned with guidance, sampled and trained on."""
    results = in_process("selector=lcg_km", "generation.plain_fraction=0.25", *GENERATION_FAST, *PLUMBING,
                         cache_dir=shared_cache, run_dir=tmp_path / "run")
    assert results["n_generated"] == results["n_selected"] == results["sizes"]["pool"] == 64
    assert results["guidance"] == {"name": "lcg_km"}
    assert results["budget"] == 0.2, "the budget that sized the generated pool, not 1 for using it whole"
    assert {"ddpm_pretrain", "ddpm_finetune", "sample", "sample_plain", "embed", "ssat", "evaluate"} <= set(
        results["timings"])
    assert results["cached"]["intermediate"], "the intermediate model is shared with the selection runs"
    assert results["pseudo_label_acc"] is None, "generated images have no hidden labels"
    assert 0 <= results["robust_acc"] <= results["clean_acc"] <= 1
    assert results["total_seconds"] == pytest.approx(sum(results["timings"].values()))


def test_unreachable_ddpm_fails_before_any_training(tmp_path, monkeypatch):
    """The hub offline (HF_HUB_OFFLINE=1: the same failure as no network, without the hub client's 23 s of
    retries) fails before any training, with one line naming the model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = run_ssat("selector=pcg", "generation.pretrained=google/ddpm-cifar10-32", run_dir=tmp_path / "run",
                   cache_dir=tmp_path / "cache", check=False)
    assert run.proc.returncode == 2
    assert run.proc.stderr.strip().splitlines()[-1].startswith("ssat: error: ")
    assert "google/ddpm-cifar10-32" in run.proc.stderr
    assert not (tmp_path / "cache" / "intermediate").exists()


def test_full_evaluation_with_ema_and_early_stopping(shared_cache, tmp_path):
    """experiment=autoattack (on a few test points), PGD with the CW loss and restarts, EMA and early stopping:
    everything lands in results.json and the printed table."""
    run = run_ssat("experiment=autoattack", "eval.autoattack.num_points=8", "eval.pgd.loss=cw",
                   "eval.pgd.restarts=2", "ssat.ema.decay=0.9", "ssat.early_stopping.patience=2", *INTERMEDIATE,
                   "ssat.epochs=4", "ssat.batches_per_epoch=4", "eval.pgd.steps=5", "eval.val_pgd.steps=2",
                   "eval.sanity.num_points=40", "eval.sanity.noise_samples=2", fast=False,
                   run_dir=tmp_path / "run", cache_dir=shared_cache)
    results = run.results
    assert results["ssat_ema"] is True
    assert 1 <= results["ssat_epochs_to_convergence"] == results["ssat_best_epoch"] + 1 <= results["ssat_epochs"]
    assert results["ssat_early_stopped"] == (results["ssat_epochs"] < 4)
    assert results["autoattack_num_points"] == 8
    assert 0 <= results["autoattack_acc"] <= 1
    sanity = results["sanity"]
    assert results["sanity_passed"] == sanity["passed"] and sanity["num_points"] == 40
    assert set(sanity["checks"]) == {"pgd_eps0_equals_clean", "robust_acc_falls_with_eps", "pgd_beats_random_noise",
                                     "autoattack_not_above_pgd"}
    assert sanity["checks"]["pgd_eps0_equals_clean"]["passed"]
    assert "autoattack_acc" in run.proc.stdout + run.proc.stderr
    flags = sorted(p.name for p in (shared_cache / "evaluate").glob("*/flags/*"))
    assert {"clean", "pgd", "autoattack", "sanity_pgd_eps0"} <= set(flags)
