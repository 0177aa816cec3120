"""Deviations are data on each method; docs/deviations.md is generated from them and must not drift."""

import dataclasses
from pathlib import Path

import pytest

from tokenprune.methods import METHODS
from tokenprune.methods.base import Deviation
from tokenprune.methods.deviations import ALL_METHODS, main, render

PAGE = Path(__file__).resolve().parents[1] / "docs" / "deviations.md"


def test_committed_page_is_the_generators_output():
    assert PAGE.read_text(encoding="utf-8") == render(), (
        "docs/deviations.md is out of date: run `python -m tokenprune.methods.deviations`"
    )


def test_check_mode_reports_a_stale_page(tmp_path, capsys):
    stale = tmp_path / "deviations.md"
    stale.write_text(render().replace("## visionzip", "## visionzip (edited)"), encoding="utf-8")
    assert main([str(stale), "--check"]) == 1
    assert main([str(stale)]) == 0 and main([str(stale), "--check"]) == 0
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(METHODS))
def test_declarations_are_well_formed(name):
    cls = METHODS[name]
    assert isinstance(cls.deviations, tuple) and all(isinstance(d, Deviation) for d in cls.deviations)
    fields = {f.name for f in dataclasses.fields(cls)}
    for d in cls.deviations:
        assert d.what.strip() and d.why.strip(), (name, d)
        if d.restore is not None:  # "option=value": an option the method really has
            option = d.restore.split("=")[0].strip()
            assert option in fields, f"{name}: restore {d.restore!r} names no option of {cls.__name__}"
    assert f"## {name}\n" in render()


def test_page_lists_every_declaration():
    page = render()
    for d in ALL_METHODS + tuple(d for cls in METHODS.values() for d in cls.deviations):
        assert " ".join(d.what.split()).replace("|", "\\|") in page


def test_the_user_protecting_floors_are_declared():
    """FEATHER's and TransPrune's floor of one token and SparseVLM's no-forced-drop stay declared."""
    assert any("at least one token" in d.what for d in METHODS["feather"].deviations)
    assert any("at least one visual token" in d.what for d in METHODS["transprune"].deviations)
    assert any("nothing is pruned" in d.what for d in METHODS["sparsevlm"].deviations)
