"""The README's "Adding a selector": its examples' files, taken from the README as they stand, make selectors that
the pipeline runs: a score-based one (two files) and one that re-chooses during training (two files)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from conftest import compose, run_in_process

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(header: str) -> str:
    """The fenced block of the README whose first line is ``header``."""
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", README.read_text(), re.S)
    return next(block for block in blocks if block.startswith(header))


def install_readme_selector(tmp_path: Path, monkeypatch, module: str, class_name: str) -> str:
    """The README's ``ssat/selection/<module>.py`` and ``ssat/conf/selector/<module>.yaml`` as a package on the path
    and a config folder on Hydra's search path; returns the search-path override."""
    package = tmp_path / "code" / "ssat_extra"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    code = readme_block(f"# ssat/selection/{module}.py").replace(f"# ssat/selection/{module}.py", "")
    (package / f"{module}.py").write_text(code)
    yaml = readme_block(f"# ssat/conf/selector/{module}.yaml")
    (tmp_path / "conf" / "selector").mkdir(parents=True, exist_ok=True)
    (tmp_path / "conf" / "selector" / f"{module}.yaml").write_text(
        yaml.replace(f"ssat.selection.{module}.{class_name}", f"ssat_extra.{module}.{class_name}"))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.delitem(sys.modules, f"ssat_extra.{module}", raising=False)
    monkeypatch.delitem(sys.modules, "ssat_extra", raising=False)
    return f"hydra.searchpath=[file://{tmp_path / 'conf'}]"


def test_the_readme_entropy_selector_runs(tmp_path, monkeypatch):
    search = install_readme_selector(tmp_path, monkeypatch, "entropy", "EntropySelector")
    assert compose("selector=entropy", search).selector.name == "entropy"
    results = run_in_process("selector=entropy", search, tmp_path=tmp_path)
    assert results["selector"] == "entropy" and results["sizes"]["boundary"] == round(0.4 * results["n_selected"])


def test_the_readme_selector_that_rechooses_during_training_runs(tmp_path, monkeypatch):
    """Every candidate goes to SSAT; the callback re-chooses the budget's share of them at epochs 0, 2 and 4 of
    five, and results.json lists the re-selections (none would be listed if the pipeline ignored
    ``during_training``) and counts their seconds in selection_seconds."""
    search = install_readme_selector(tmp_path, monkeypatch, "current_margin", "CurrentMarginSelector")
    results = run_in_process("selector=current_margin", search, "budget=0.25", "ssat.epochs=5",
                             "ssat.batches_per_epoch=2", tmp_path=tmp_path)
    size = round(0.25 * results["sizes"]["candidates"])
    assert results["n_selected"] == size
    assert [(r["epoch"], r["size"]) for r in results["reselections"]] == [(0, size), (2, size), (4, size)]
    assert results["selection_seconds"] > results["timings"]["select"]
