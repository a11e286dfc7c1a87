"""The stage graph: every stage reads only the config it declares (so its cache key is complete), the plan follows
the selector's capabilities, and any stage runs alone with what it needs."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from conftest import TINY, run_in_process
from forked import run_module
from ssat.pipeline import plan
from ssat.pipeline.stage import UndeclaredRead, When
from ssat.stages import intermediate

GENERATION = ["generation.pretrain.epochs=1", "generation.finetune.epochs=1", "generation.num_images=32",
              "generation.sampler.num_inference_steps=2", "generation.unet.block_out_channels=[8,16]",
              "generation.unet.norm_num_groups=4"]

# Every path through the stages: the selectors (score-based, generative, re-choosing during training, training their
# own scoring model), both selection targets, adversarial intermediate training, EMA and early stopping.
PATHS = {
    "lcs_km": [],
    "lcs_gmm_balanced": ["selector=lcs_gmm", "selector.class_balanced=true"],
    "pcs_labeled_target": ["selector=pcs", "selection.target=labeled", "budget=0.5"],
    "full_ema_early_stop": ["selector=full", "ssat.ema.decay=0.9", "ssat.early_stopping.patience=1",
                            "ssat.epochs=2"],
    "adversarial_intermediate": ["intermediate.adversarial=true", "selector=random"],
    "coreset": ["selector=coreset_gradmatch", "selector.kappa=0.5", "ssat.epochs=2", "selector.select_every=1"],
    "extrapolation": ["selector=extrapolation", "selector.epochs=3", "selector.window=2", "selector.neighbours=2"],
    "lcg_km_plain": ["selector=lcg_km", "generation.plain_fraction=0.5", *GENERATION],
    "pcg": ["selector=pcg", *GENERATION],
}


@pytest.mark.parametrize("overrides", PATHS.values(), ids=PATHS.keys())
def test_every_stage_reads_only_what_it_declares(overrides, tmp_path):
    """A stage that read an undeclared value would raise UndeclaredRead: its key would miss that value."""
    results = run_in_process(*overrides, tmp_path=tmp_path)
    assert set(results["stage_keys"]) >= {"intermediate", "embed", "select", "pseudo_label", "ssat", "evaluate"}


def test_a_declaration_that_leaves_out_what_the_stage_reads_fails(monkeypatch, tmp_path):
    """With intermediate.adversarial=true the intermediate model trains with the attack group's settings: its
    declaration reads them (When), and without that the stage cannot run, instead of reusing a stale model."""
    declared = intermediate.STAGE
    assert When("intermediate.adversarial", "attack") in declared.reads
    monkeypatch.setattr(intermediate, "STAGE", replace(declared, reads=tuple(
        r for r in declared.reads if not isinstance(r, When))))
    with pytest.raises(UndeclaredRead, match="stage intermediate: a stage read attack"):
        run_in_process("intermediate.adversarial=true", tmp_path=tmp_path)
    run_in_process("intermediate.adversarial=false", "selector=random", tmp_path=tmp_path)  # not read: runs


def test_the_attack_enters_the_intermediate_key_only_when_it_trains_with_it(tmp_path):
    """The runs stop at the stages compared (``+stage``): their keys are the ones a whole run computes."""
    def keys(*overrides: str) -> dict[str, str]:
        stages = run_in_process(*overrides, "selector=random", tmp_path=tmp_path)["stages"]
        return {name: record["key"] for name, record in stages.items()}

    standard = [keys("+stage=ssat", f"attack.eps={eps}") for eps in (0.1, 0.2)]
    adversarial = [keys("+stage=intermediate", "intermediate.adversarial=true", f"attack.eps={eps}")
                   for eps in (0.1, 0.2)]
    assert standard[0]["intermediate"] == standard[1]["intermediate"]
    assert standard[0]["ssat"] != standard[1]["ssat"]
    assert adversarial[0]["intermediate"] != adversarial[1]["intermediate"]


def test_locations_and_loader_workers_are_in_no_key(tmp_path):
    first = run_in_process(tmp_path=tmp_path)
    moved = run_in_process("loader.num_workers=1", "loader.pin_memory=false", tmp_path=tmp_path)
    assert moved["stage_keys"] == first["stage_keys"] and all(moved["cached"].values())


def test_the_plan_follows_the_selector_capabilities():
    from conftest import compose
    from ssat.config import build

    names = {}
    for selector in ("lcs_km", "lcg_km", "pcg"):
        cfg = compose(f"selector={selector}", "dataset.num_classes=10")
        names[selector] = [s.name for s in plan(build(cfg.selector), cfg)]
    assert names["lcs_km"] == ["data", "pool", "intermediate", "embed", "select", "pseudo_label", "ssat", "evaluate"]
    assert names["lcg_km"][:6] == ["data", "ddpm_pretrain", "ddpm_source", "ddpm_finetune", "sample", "pool"]
    cfg = compose("selector=pcg", "generation.pretrained=google/ddpm-cifar10-32")
    assert "ddpm_pretrain" not in [s.name for s in plan(build(cfg.selector), cfg)]


@pytest.mark.parametrize("stage", ["intermediate", "embed", "select", "pseudo_label", "ssat", "evaluate"])
def test_any_stage_runs_alone_with_what_it_needs_and_the_full_run_reuses_it(stage, tmp_path):
    alone = run_in_process(f"+stage={stage}", tmp_path=tmp_path)
    assert alone["stage"] == stage and not (tmp_path / "run" / "results.json").exists()
    whole = run_in_process(tmp_path=tmp_path)
    order = ["intermediate", "embed", "select", "pseudo_label", "ssat", "evaluate"]
    assert [name for name in order if whole["cached"][name]] == order[:order.index(stage) + 1]


@pytest.mark.slow
def test_a_sweep_of_one_stage_jobs_shares_the_cache_with_the_whole_pipeline_sweep(tmp_path):
    """The GPU-heavy stages in their own jobs (``-m +stage=embed,ssat``), then the whole-pipeline sweep over two
    selectors on the same cache: the stages the one-stage jobs computed are reused under the same keys, and only
    what they did not run (pcs's selection and training, both evaluations) is computed."""
    cache = tmp_path / "cache"

    def sweep(name: str, *overrides: str) -> list[dict]:
        proc = run_module("ssat.run", ["-m", *TINY, *overrides, f"cache_dir={cache}",
                                       f"hydra.sweep.dir={tmp_path / name}"], env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        jobs = [job for job in (tmp_path / name).iterdir() if job.is_dir()]  # <job number>_<selector>_<budget>
        return [json.loads(next(job.glob("*.json")).read_text())
                for job in sorted(jobs, key=lambda job: int(job.name.split("_")[0]))]

    embed_job, ssat_job = sweep("stages", "+stage=embed,ssat", "selector=random")
    assert embed_job["stage"] == "embed" and set(embed_job["stages"]) == {"intermediate", "embed"}
    assert ssat_job["stages"]["intermediate"]["cached"] and ssat_job["stages"]["embed"]["cached"]
    assert not ssat_job["stages"]["ssat"]["cached"]
    random_run, pcs_run = sweep("whole", "selector=random,pcs")
    for name, record in ssat_job["stages"].items():
        assert random_run["stage_keys"][name] == record["key"] and random_run["cached"][name], name
    assert not random_run["cached"]["evaluate"]
    assert [pcs_run["cached"][s] for s in ("intermediate", "embed", "select", "ssat")] == [True, True, False, False]
