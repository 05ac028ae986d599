"""`photocal run` end to end, as an operator types it: every stage on tiny, then a
resumed run that keeps what is complete."""

from __future__ import annotations

import pytest

from flows.cli import main
from tasks.io.store import list_groups, read_group

pytestmark = pytest.mark.integration


def test_photocal_run_all_stages_then_resume(tiny_survey, tmp_path, capsys):
    store = tmp_path / "photocal.zarr"
    argv = [
        "run",
        "--store",
        str(store),
        "--raw",
        str(tiny_survey.raw),
        "--refcat",
        str(tiny_survey.refcat),
        "--workers",
        "2",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "rejected files (5)" in out
    assert "masters/bias/2026-03-05" in out
    nights = [n for n in list_groups(store, "index") if n != "unknown-night"]
    assert nights == list(tiny_survey.nights)
    for night in nights:
        cat = read_group(store, f"nights/{night}/catalog")
        assert {
            "expid",
            "quadrant",
            "source_id",
            "x",
            "y",
            "flux",
            "flux_err",
            "mag_inst",
            "mag_inst_err",
            "flags",
        } <= set(cat.data_vars) | set(cat.coords)
        assert cat.sizes["obs"] > 100
        assert f"nights/{night}/catalog" in out
    assert main([*argv, "--no-overwrite"]) == 0
    again = capsys.readouterr().out
    assert "kept (already complete)" in again
    assert "nights/2026-03-10/catalog" in again.split("kept (already complete):")[1]


def test_photocal_run_refuses_photometry_without_refcat(tmp_path, capsys):
    assert main(["run", "--store", str(tmp_path / "s.zarr"), "--raw", str(tmp_path)]) == 2
    assert "--refcat" in capsys.readouterr().err
