"""The lightcurves stage's inputs: the targets table, the reduced products kept
by the reduce stage, and the per-pixel photon scale recovered from them."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from astropy.table import Table
from astropy.wcs import WCS

from calib.reduce import ReducedQuadrant
from tasks.io.reduced import keep_quadrant, open_reduced, reduced_exposures, write_reduced
from tasks.io.store import StoreError, write_group
from tasks.io.targets import TargetsError, read_targets
from tasks.lightcurves import _photon_scale


def _table(**cols):
    return Table({k: np.asarray(v) for k, v in cols.items()})


@pytest.mark.parametrize("fmt", ["ascii.ecsv", "ascii.csv", "fits"])
def test_targets_are_read_from_ecsv_csv_and_fits(tmp_path, fmt):
    path = tmp_path / f"t.{fmt.split('.')[-1]}"
    _table(
        name=["SN1", "SN2"], ra=[10.0, 359.5], dec=[-5.0, 20.0], no_flux_before=[1.0, 2.0]
    ).write(path, format=fmt)
    targets = read_targets(path)
    assert [t.name for t in targets] == ["SN1", "SN2"]
    assert targets[1].ra_deg == 359.5
    assert targets[0].no_flux_before == 1.0
    assert np.isnan(targets[0].no_flux_after)


@pytest.mark.parametrize(
    ("cols", "message"),
    [
        ({"name": ["a"], "ra": [1.0]}, "column 'dec' missing"),
        ({"name": ["a", "a"], "ra": [1.0, 2.0], "dec": [0.0, 0.0]}, "appears twice"),
        ({"name": ["a"], "ra": [400.0], "dec": [0.0]}, r"ra = 400.0 is not in \[0, 360\)"),
        ({"name": ["a"], "ra": [1.0], "dec": [-95.0]}, "dec = -95.0"),
        ({"name": ["../x"], "ra": [1.0], "dec": [0.0]}, "name '../x'"),
    ],
)
def test_bad_targets_say_which_file_row_and_column(tmp_path, cols, message):
    path = tmp_path / "t.ecsv"
    _table(**cols).write(path, format="ascii.ecsv")
    with pytest.raises(TargetsError, match=message) as err:
        read_targets(path)
    assert str(path) in str(err.value)


def test_unreadable_targets_file(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"\x00\x01 not a table")
    with pytest.raises(TargetsError, match=r"t\.csv"):
        read_targets(path)
    with pytest.raises(TargetsError, match="cannot be read"):
        read_targets(tmp_path / "missing.csv")


def _wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [10.0, 12.0]
    w.wcs.cd = [[-2.8e-4, 0.0], [0.0, 2.8e-4]]
    return w


def test_reduced_products_round_trip(tmp_path):
    """What the reduce stage keeps is what the lightcurves stage reads: fluence
    and its variance (surface brightness x area, variance x area^2), mask, WCS
    and read noise, region by region."""
    rng = np.random.default_rng(0)
    shape = (40, 50)
    area = 1.0 + 0.01 * rng.random(shape)
    red = ReducedQuadrant(
        surface_brightness=rng.normal(100, 10, shape).astype(np.float32),
        variance=rng.uniform(90, 110, shape).astype(np.float32),
        pixel_area=area,
        mask=(rng.random(shape) < 0.01).astype(np.uint8) * 8,
        gain=2.0,
        read_noise_e=5.0,
        apply_pixel_area=True,
    )
    store = str(tmp_path / "s.zarr")
    write_reduced(store, "2026-03-10", 7, {3: keep_quadrant(red, _wcs())})
    assert reduced_exposures(store) == [("2026-03-10", 7)]
    kept = open_reduced(store, "2026-03-10", 7)
    f, v, m = kept.region(3, 5, 25, 10, 30)
    np.testing.assert_allclose(f, (red.surface_brightness * area)[10:30, 5:25], rtol=1e-6)
    np.testing.assert_allclose(v, (red.variance * area**2)[10:30, 5:25], rtol=1e-6)
    np.testing.assert_array_equal(m, red.mask[10:30, 5:25])
    assert kept.read_noise_e(3) == 5.0
    x, y = np.array([0.0, 33.3]), np.array([0.0, 21.7])
    np.testing.assert_allclose(
        kept.wcs(3).all_pix2world(x, y, 0), _wcs().all_pix2world(x, y, 0), rtol=0, atol=1e-12
    )


def test_reduced_products_of_an_older_photocal_say_what_to_do(tmp_path):
    store = str(tmp_path / "s.zarr")
    old = xr.Dataset({"fluence": (("quadrant", "y", "x"), np.zeros((1, 4, 4), np.float32))})
    write_group(store, "nights/2026-03-10/reduced/7", old)
    with pytest.raises(StoreError, match="re-run reduce with --keep-reduced"):
        open_reduced(store, "2026-03-10", 7)


def test_photon_scale_inverts_the_reduction_variance():
    """variance = k max(e, 0) + k^2 rn^2 with k = area / flat and e the electrons:
    k is recovered exactly from fluence, variance and read noise."""
    rng = np.random.default_rng(1)
    k = rng.uniform(0.9, 1.1, 1000)
    electrons = rng.normal(500, 600, 1000)
    rn = 8.0
    fluence = electrons * k
    variance = (np.clip(electrons, 0, None) + rn**2) * k**2
    np.testing.assert_allclose(_photon_scale(fluence, variance, rn), k, rtol=1e-9)
