"""The README's section "Using ssat with your own models and RobustBench", run as a newcomer would: its Python
blocks and its commands in order, in an empty folder, as they are written there; then what each step promises."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from forked import run_module

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using ssat with your own models and RobustBench"


def steps() -> list[tuple[str, str]]:
    """("python", code) for each ```python block, ("shell", command) for each command line of the indented
    blocks (the lines after a command, its output, are skipped), in the section's order."""
    text = README.read_text()
    section = text[text.index(SECTION):]
    section = section[:section.find("\n## ", len(SECTION))]
    found, lines, i = [], section.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            end = lines.index("```", i + 1)
            found.append(("python", "\n".join(lines[i + 1:end])))
            i = end
        elif lines[i].startswith("    python -m ssat."):
            command = lines[i].strip()
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + lines[i].strip()
            found.append(("shell", command))
        i += 1
    return found


def test_the_section_has_every_step():
    commands = [body.split()[2] for kind, body in steps() if kind == "shell"]
    assert commands == ["ssat.run", "ssat.evaluate", "ssat.export"]
    assert [kind for kind, _ in steps()].count("python") == 2


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path, robustbench):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    outputs = []
    for kind, body in steps():
        if kind == "python":
            proc = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=1800)
        else:  # python -m <module> <args>
            module, *args = body.split()[2:]
            proc = run_module(module, args, cwd=tmp_path, env=env, timeout=1800)
        assert proc.returncode == 0, f"{body}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        outputs.append(proc.stdout)

    run = tmp_path / "runs" / "lab_lcs_km"
    results = json.loads((run / "results.json").read_text())
    assert results["checkpoints"]["intermediate_checkpoint"]["path"] == "lab_wrn.pt"
    assert not (run / "logs" / "intermediate").exists(), "the lab's model was loaded, not trained"
    card = json.loads((run / "model_card.json").read_text())
    assert card["ssat"]["selector"] == "lcs_km" and card["ssat"]["budget"] == 0.2
    assert card["ssat"]["pool_size"] == results["n_pool"] and card["ssat"]["total_seconds"] == results["total_seconds"]
    assert card["eps"] == "8/255" and card["additional_data"] is False and card["ssat"]["num_test"] == 360
    assert card["ssat"]["autoattack_num_points"] == 10 and card["ssat"]["sanity_passed"]
    assert card["ssat"]["sanity"]["checks"]["autoattack_not_above_pgd"]["passed"]
    assert (run / "robustbench.pt").exists()
    printed = re.search(r"clean accuracy in RobustBench's class: ([\d.]+)", outputs[-1]).group(1)
    assert printed == card["clean_acc"], "the exported model in RobustBench's class is the evaluated one"
