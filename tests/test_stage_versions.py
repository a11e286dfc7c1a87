"""A change to the code a stage runs must bump the stage's version (part of its key), or a shared cache serves
results of the old code: ssat/pipeline/versions.json holds each stage's version and a hash of its code."""

from __future__ import annotations

import json

from ssat.pipeline import versions


def test_every_stage_version_matches_the_checked_in_table():
    table = json.loads(versions.TABLE.read_text())
    assert set(table) == set(versions.all_stages())
    problems = versions.problems(table)
    assert not problems, "\n".join(problems)


def test_changing_a_selector_without_a_version_bump_is_caught(monkeypatch, tmp_path):
    """k-means margin scores computed as d2 - d1 + 0: the select stage's code changed, its version did not."""
    table = json.loads(versions.TABLE.read_text())
    latent = versions._module_file("ssat.selection.latent")
    edited = tmp_path / "latent.py"
    edited.write_text(latent.read_text().replace("return (fit.d2 - fit.d1).astype(np.float64)",
                                                 "return (fit.d2 - fit.d1 + 0).astype(np.float64)"))
    assert edited.read_text() != latent.read_text()
    real = versions._module_file
    monkeypatch.setattr(versions, "_module_file", lambda name: edited if name == "ssat.selection.latent" else real(name))
    found = versions.problems(table)
    version = versions.all_stages()["select"].version
    assert any(p.startswith(f"the code of stage select changed but its version ({version}) did not")
               for p in found), found
    assert "bump `version` in its Stage declaration" in found[0]
    assert not any("stage evaluate" in p for p in found)  # evaluation does not run the selectors


def test_docstrings_and_comments_are_not_code(monkeypatch, tmp_path):
    table = json.loads(versions.TABLE.read_text())
    latent = versions._module_file("ssat.selection.latent")
    edited = tmp_path / "latent.py"
    edited.write_text(latent.read_text().replace('"""Latent clustering selection', '"""Latent  clustering selection')
                      + "\n# a comment\n")
    real = versions._module_file
    monkeypatch.setattr(versions, "_module_file", lambda name: edited if name == "ssat.selection.latent" else real(name))
    assert versions.problems(table) == []
