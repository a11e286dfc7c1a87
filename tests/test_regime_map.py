"""experiments/regime_map.py: the quick map (every method at two labeled-set sizes on one fixed pool, at equal SSAT
compute) writes the table, its verdicts and the plot; the GPU preset runs on the CPU at tiny sizes; every preset
composes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cifar_archive import extract_cifar_subset

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "regime_map.py"


@pytest.mark.slow
def test_the_quick_regime_map_runs_every_method_and_writes_the_table_and_plot(tmp_path):
    out = tmp_path / "map"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--quiet", "--out", str(out)], check=True, timeout=1800)
    rows = json.loads((out / "table.json").read_text())
    methods = ["random", "pcs", "lcs_km", "lcs_km_adaptive", "lcs_km_adaptive_relabel", "lcs_km_soft"]
    assert [(r["labeled"], r["method"]) for r in rows] == [(n, m) for n in (30, 200) for m in methods]
    assert all(r["gain_over_random"] == [0.0] for r in rows if r["method"] == "random")
    assert [r["reselections"] for r in rows if "adaptive" in r["method"]] == [[2]] * 4  # epochs 1 and 2 of 3
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*/*/results.json")]
    assert {r["sizes"]["pool"] for r in runs} == {300}
    assert len({r["stage_keys"]["intermediate"] for r in runs}) == 2  # one intermediate model per size, shared
    assert {r["ssat_epochs"] for r in runs} == {3}  # equal SSAT compute: no early stop, fixed batches
    table = (out / "table.md").read_text()
    assert "- 30 labeled (intermediate val acc" in table and "- 200 labeled" in table
    assert (out / "regime_map.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_gpu_preset_runs_on_the_cpu_at_tiny_sizes(tmp_path):
    """The map's strong end (preset cifar10_gpu: PreAct ResNet-18 in bf16, re-selection every 2 epochs) through the
    script on real CIFAR-10 JPEGs at tiny sizes, on trainer=cpu with the GPU run's precision (bf16-mixed)."""
    root = extract_cifar_subset(tmp_path / "cifar", per_class_train=12, per_class_test=2)
    out = tmp_path / "map"
    tiny = ["trainer=cpu", "trainer.precision=bf16-mixed", "loader.num_workers=0", "val_size=16", "test_size=20",
            "intermediate.epochs=1", "intermediate.batch_size=32", "embed.batch_size=64", "ssat.epochs=3",
            "ssat.batch_size=16", "ssat.batches_per_epoch=2", "attack.steps=1", "eval.pgd.steps=1",
            "eval.batch_size=20", "eval.sanity.num_points=10", "eval.sanity.noise_samples=1"]
    subprocess.run([sys.executable, str(SCRIPT), "--dataset", "cifar10_gpu", "--data", str(root), "--labeled", "40",
                    "--pool", "40", "--methods", "lcs_km_adaptive", "--quiet", "--out", str(out), "--", *tiny],
                   check=True, timeout=1200)
    rows = json.loads((out / "table.json").read_text())
    assert [(r["labeled"], r["method"], r["reselections"]) for r in rows] == [
        (40, "random", [0]), (40, "lcs_km_adaptive", [1])]  # re-selected at epoch 2 of 3
    for config in (out / "runs").glob("*/*/.hydra/config.yaml"):
        cfg = yaml.safe_load(config.read_text())
        assert cfg["model"]["_target_"].endswith("PreActResNet18") and cfg["trainer"]["precision"] == "bf16-mixed"


@pytest.mark.parametrize("preset", ["digits", "cifar10", "cifar10_gpu", "quick"])
def test_every_preset_and_method_composes_and_passes_the_schema(preset, tmp_path):
    """The presets' runs, the GPU one included (on trainer=cpu here: no GPU), are valid configs whose selector and
    model build, at the preset's largest labeled size."""
    sys.path.insert(0, str(SCRIPT.parent))
    from regime_map import METHODS, PRESETS, method_overrides

    from conftest import compose
    from ssat.config import build
    from ssat.schema import check_config

    settings = PRESETS[preset]
    for method in settings.get("methods", list(METHODS)):
        overrides = method_overrides(method, settings, tmp_path)
        cfg = compose(*overrides, f"pool.num_labeled={max(settings['labeled'])}", "trainer=cpu")
        check_config(cfg)
        if cfg.dataset.num_classes is None:
            cfg.dataset.num_classes = 10  # filled in from the class folders when the data is read
        assert build(cfg.selector).name == cfg.selector.name
        build(cfg.model)
        assert cfg.ssat.early_stopping.patience is None and cfg.ssat.batches_per_epoch is not None
