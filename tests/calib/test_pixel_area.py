"""Pixel-area maps: the WCS Jacobian matches the simulator's truth, both
evaluations agree, and the cache serves every pointing of a quadrant."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from astropy.wcs import WCS

from calib.pixel_area import PixelAreaCache, pixel_area_key, pixel_area_map
from tasks.io.raw import read_quadrants


def _science_frames(tiny_survey, n=1):
    ex = xr.open_zarr(tiny_survey.truth, group="exposures", consolidated=False).load()
    paths = ex.path.values[ex.imagetyp.values == "SCIENCE"][:n]
    return [read_quadrants(tiny_survey.raw / str(p)) for p in paths]


def test_analytic_area_matches_simulator_truth(tiny_survey):
    truth = xr.open_zarr(tiny_survey.truth, group="maps/area", consolidated=False).area.load()
    (frames,) = _science_frames(tiny_survey)
    worst = 0.0
    for frame in frames:
        area = pixel_area_map(frame.wcs, frame.data.shape, method="analytic")
        expected = truth.sel(quadrant=frame.header.quadrant).values.astype(np.float64)
        worst = max(worst, float(np.abs(area - expected).max()))
    # The truth is stored as float32 (6e-8 at 1.03); the issue asks for ~1e-5.
    assert worst < 2e-7, worst


def test_numeric_agrees_with_analytic(tiny_survey):
    (frames,) = _science_frames(tiny_survey)
    for frame in frames[:3]:
        analytic = pixel_area_map(frame.wcs, frame.data.shape, method="analytic")
        numeric = pixel_area_map(frame.wcs, frame.data.shape, method="numeric")
        np.testing.assert_allclose(numeric, analytic, atol=5e-7)


def _header(ctype: str, crpix=(512.5, 512.5), scale=1.0 / 3600) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = [f"RA---{ctype}", f"DEC--{ctype}"]
    w.wcs.crval = [150.0, 30.0]
    w.wcs.crpix = list(crpix)
    w.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    return w


def test_equal_area_projection_has_unit_area():
    """ZEA preserves area: the numeric path must return 1 everywhere, even over
    a wide field (10 arcsec pixels, 3 deg across)."""
    w = _header("ZEA", scale=10.0 / 3600)
    area = pixel_area_map(w, (1024, 1024))
    np.testing.assert_allclose(area, 1.0, atol=1e-6)


def test_tan_without_distortion_is_cos_cubed():
    w = _header("TAN", scale=10.0 / 3600)
    area = pixel_area_map(w, (1024, 1024))
    yy, xx = np.mgrid[:1024, :1024]
    rho = np.deg2rad(10.0 / 3600) * np.hypot(xx + 1 - 512.5, yy + 1 - 512.5)
    np.testing.assert_allclose(area, (1 + rho**2) ** -1.5, rtol=1e-10)
    np.testing.assert_allclose(pixel_area_map(w, (1024, 1024), method="numeric"), area, atol=1e-6)


def test_cache_serves_every_pointing_of_a_quadrant(tiny_survey):
    frames = _science_frames(tiny_survey, n=3)
    cache = PixelAreaCache()
    maps = [cache.get(fr[0].wcs, fr[0].data.shape) for fr in frames]
    # Dithered pointings differ in CRVAL only: one computation, two hits.
    assert (cache.misses, cache.hits) == (1, 2)
    assert maps[0] is maps[2]
    assert not maps[0].flags.writeable
    assert pixel_area_key(frames[0][0].wcs, (128, 128)) != pixel_area_key(
        frames[0][1].wcs, (128, 128)
    )


def test_bad_inputs_are_named():
    w = _header("ZEA")
    with pytest.raises(ValueError, match="analytic"):
        pixel_area_map(w, (10, 10), method="analytic")
    with pytest.raises(ValueError, match="shape"):
        pixel_area_map(w, (0, 10))
    with pytest.raises(ValueError, match="method"):
        pixel_area_map(w, (10, 10), method="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="maxsize"):
        PixelAreaCache(maxsize=0)


def test_cache_keeps_within_its_byte_budget_and_stays_correct(tiny_survey):
    frames = _science_frames(tiny_survey, n=2)
    shape = frames[0][0].data.shape
    one_map = int(np.prod(shape)) * 8
    cache = PixelAreaCache(max_bytes=2 * one_map)  # two of tiny's quadrant maps
    quadrants = [fr.wcs for fr in frames[0]]
    assert len(quadrants) > 2
    for wcs in quadrants * 2:  # a focal plane's cyclic order: every map evicted before reuse
        area = cache.get(wcs, shape)
        np.testing.assert_array_equal(area, pixel_area_map(wcs, shape))
        assert sum(m.nbytes for m in cache._maps.values()) <= 2 * one_map
    assert (cache.misses, cache.hits) == (2 * len(quadrants), 0)
    assert cache.get(quadrants[-1], shape) is area  # the newest stays
    with pytest.raises(ValueError, match="max_bytes"):
        PixelAreaCache(max_bytes=-1)
