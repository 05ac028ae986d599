"""Nothing asked for is skipped in silence: `photocal run --stages ubercal` on
named nights runs the night that has its input and exits non-zero naming the
group of each night that has not (missing, or written without the completion
marker)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from astropy.table import Table

from flows.cli import main
from tasks.ingest import ingest_table
from tasks.io.raw import read_refcat
from tasks.io.store import group_exists, read_group

pytestmark = pytest.mark.integration


def ingest_stars(store: str, refcat: str, night: str, *, n_exp: int = 5, seed: int = 0) -> None:
    """A night of 5 exposures of the catalog's 60 brightest r stars (m_inst =
    r - 25 + N(0, 0.01)), through the ingest."""
    ref = read_refcat(refcat)
    stars = np.argsort(np.nan_to_num(ref.r_mag, nan=99.0))[:60]
    rng = np.random.default_rng(seed)
    e, s = (a.ravel() for a in np.meshgrid(np.arange(n_exp), stars, indexing="ij"))
    table = Table(
        {
            "expid": 900_000 + e,
            "source_id": ref.source_id[s],
            "x": rng.uniform(0, 127, e.size),
            "y": rng.uniform(0, 127, e.size),
            "mag": ref.r_mag[s] - 25.0 + rng.normal(0, 0.01, e.size),
            "mag_err": np.full(e.size, 0.01),
            "airmass": 1.0 + 0.05 * e,
        }
    )
    path = f"{store}.{night}.fits"
    table.write(path, overwrite=True)
    ingest_table(
        path,
        store,
        band="r",
        refcat_path=refcat,
        night=night,
        constants={"mjd": "61110.3", "exptime": "30", "quad_nx": "128", "quad_ny": "128"},
        site_longitude_deg=-116.865,
        overwrite=True,
    )


def test_a_stage_asked_for_on_a_missing_night_exits_non_zero_naming_the_group(
    tiny_survey, tmp_path, capsys
):
    store, refcat = str(tmp_path / "s.zarr"), str(tiny_survey.refcat)
    ingest_stars(store, refcat, "2026-03-10")
    # A catalog written by hand, without the attrs only the code names.
    xr.Dataset({"expid": ("obs", np.zeros(3, np.int64))}).to_zarr(
        store, group="nights/2026-03-11/catalog", mode="w", consolidated=False, zarr_format=3
    )
    config = tmp_path / "c.toml"
    config.write_text("[ubercal]\nplots = false\n[ubercal.options]\nstarflat = false\n")
    argv = ["run", "--store", store, "--refcat", refcat, "--stages", "ubercal", "--workers", "1"]
    argv += ["--config", str(config)]
    for night in ("2026-03-10", "2026-03-11", "2026-03-12"):
        argv += ["--night", night]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "ubercal on 2026-03-11: nights/2026-03-11/catalog is incomplete" in captured.err
    assert "ubercal on 2026-03-12: nights/2026-03-12/catalog is missing" in captured.err
    # The night that had its input was calibrated all the same, with the file's settings.
    assert group_exists(store, "ubercal/r")
    ub = read_group(store, "ubercal/r")
    assert ub.attrs["inputs"]["nights"] == ["2026-03-10"]
    assert ub.attrs["config"]["options"]["starflat"] is False
    assert "ubercal/r" in captured.out
