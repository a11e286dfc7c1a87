"""trainer=ddp on CPU with two processes (gloo): the whole pipeline, training and embed sharded over the ranks."""

from __future__ import annotations

import pytest

import json

import numpy as np
from hydra import compose, initialize_config_module

from conftest import run_ssat
from ssat.config import build
from ssat.pipeline import load_data
from ssat.stages.embed import embed_pool
from ssat.artifacts import ModelWeights

pytestmark = pytest.mark.slow  # real ssat.run processes (see pyproject's markers)

DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.precision=32-true"]


def test_ddp_two_cpu_processes_run_the_whole_pipeline(tmp_path):
    cache = tmp_path / "cache"
    run = run_ssat(*DDP, "ssat.epochs=2", "ssat.batches_per_epoch=4", run_dir=tmp_path / "run", cache_dir=cache)
    results = run.results
    assert results["ssat_epochs"] == 2 and not any(results["cached"].values())
    assert run.proc.stdout.count("results in") + run.proc.stderr.count("results in") == 1  # rank 0 reports
    records = {stage: json.loads(next((cache / stage).glob("*/record.json")).read_text())["info"]
               for stage in ("intermediate", "embed", "ssat")}
    assert records["intermediate"]["world_size"] == records["ssat"]["world_size"] == 2
    assert records["ssat"]["steps"] == 2 * 4  # the global batch count: each step one shard per rank
    assert records["embed"]["ranks"] == 2
    assert not list(cache.glob("*/*.partial")) and not list(cache.glob("embed/*/rank*"))

    # The embedding the two ranks assembled is the one a single process computes with the same model.
    with initialize_config_module(config_module="ssat.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"cache_dir={cache}"])
    data = load_data(cfg)
    model = ModelWeights.load_into(build(cfg.model), next((cache / "intermediate").glob("*/model.pt")).parent)
    single = tmp_path / "single"
    single.mkdir()
    embed_pool(model, data.pool_images, single, 512)
    stage = next((cache / "embed").glob("*/record.json")).parent
    for name in ("features.npy", "logits.npy"):
        np.testing.assert_allclose(np.load(stage / name), np.load(single / name), rtol=1e-5, atol=1e-5)
