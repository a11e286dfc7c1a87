"""The README's "Adding a selector": its two files, taken from the README as they stand, make a selector that the
command line runs."""

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


def test_the_readme_entropy_selector_runs(tmp_path, monkeypatch):
    package = tmp_path / "code" / "ssat_extra"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    code = readme_block("# ssat/selection/entropy.py").replace("# ssat/selection/entropy.py", "")
    (package / "entropy.py").write_text(code)
    yaml = readme_block("# ssat/conf/selector/entropy.yaml")
    (tmp_path / "conf" / "selector").mkdir(parents=True)
    (tmp_path / "conf" / "selector" / "entropy.yaml").write_text(
        yaml.replace("ssat.selection.entropy.EntropySelector", "ssat_extra.entropy.EntropySelector"))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    assert compose("selector=entropy", search).selector.name == "entropy"
    results = run_in_process("selector=entropy", search, tmp_path=tmp_path)
    sys.modules.pop("ssat_extra.entropy", None)
    assert results["selector"] == "entropy" and results["sizes"]["boundary"] == round(0.4 * results["n_selected"])
