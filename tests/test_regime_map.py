"""experiments/regime_map.py --quick: every method of the map runs at two labeled-set sizes on one fixed pool, at
equal SSAT compute, and the table, its verdicts and the plot are written from the runs' results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
