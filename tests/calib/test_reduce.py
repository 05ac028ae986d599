"""Reduction: the arithmetic of overscan/bias/gain/flat/area, the masks, and
cosmic-ray detection scored against the simulator's truth."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from calib.pixel_area import pixel_area_map
from calib.reduce import (
    MASK_BAD_FLAT,
    MASK_COSMIC,
    MASK_DEAD,
    MASK_HOT,
    MASK_SATURATED,
    detect_cosmic_rays,
    reduce_quadrant,
    to_fluence,
)
from tasks.io.raw import read_quadrants


def _frame(shape=(40, 50), seed=0):
    rng = np.random.default_rng(seed)
    electrons = rng.uniform(100.0, 5000.0, shape)
    flat = rng.uniform(0.8, 1.2, shape).astype(np.float32)
    bias = rng.normal(0.0, 3.0, shape).astype(np.float32)
    area = rng.uniform(1.0, 1.03, shape)
    gain, level = 2.5, 1000.0
    # Noiseless raw: what the flat sees is electrons * flat.
    data = (electrons * flat / gain + bias + level).astype(np.float32)
    overscan = np.full((shape[0], 8), level, np.float32)
    return data, overscan, bias, flat, area, electrons, gain


def test_arithmetic_and_seed_003_images():
    data, overscan, bias, flat, area, electrons, gain = _frame()
    common = {"bias_adu": bias, "flat": flat, "gain": gain, "read_noise_e": 5.0}
    red = reduce_quadrant(data, overscan, saturate_adu=6e4, pixel_area=area, **common)
    np.testing.assert_allclose(red.surface_brightness, electrons, rtol=2e-5)
    np.testing.assert_allclose(red.pixel_area, area)
    fluence, var = to_fluence(red.surface_brightness, red.pixel_area, red.variance)
    np.testing.assert_allclose(fluence, electrons * area, rtol=2e-5)
    # Photon + read variance of electrons * flat, divided by flat^2, times area^2.
    expected = (electrons * flat + 25.0) / flat**2 * area**2
    np.testing.assert_allclose(var, expected, rtol=1e-4)
    off = reduce_quadrant(
        data, overscan, saturate_adu=6e4, pixel_area=None, apply_pixel_area=False, **common
    )
    np.testing.assert_array_equal(off.pixel_area, 1.0)
    assert not off.apply_pixel_area


def test_masks():
    data, overscan, bias, flat, area, _, gain = _frame()
    defects = np.zeros(data.shape, np.uint8)
    defects[3, 4] = 1
    defects[5, 6] = 2
    flat[7, 8] = 0.0
    flat[9, 10] = np.nan
    data[20, 20] = 7e4
    red = reduce_quadrant(
        data, overscan, bias_adu=bias, flat=flat, gain=gain, read_noise_e=5.0,
        saturate_adu=6e4, pixel_area=area, defects=defects, detect_cosmics=False,
    )  # fmt: skip
    assert red.mask[3, 4] & MASK_HOT
    assert red.mask[5, 6] & MASK_DEAD
    assert red.mask[7, 8] & MASK_BAD_FLAT
    assert red.mask[9, 10] & MASK_BAD_FLAT
    assert red.surface_brightness[9, 10] == 0.0
    # Saturation grows by one pixel: bleed and charge spill around the core.
    assert np.all(red.mask[19:22, 19:22] & MASK_SATURATED)
    assert not red.mask[23, 23]


def test_inputs_are_checked():
    data, overscan, bias, flat, area, _, gain = _frame()
    kw = {"bias_adu": bias, "flat": flat, "read_noise_e": 5.0, "saturate_adu": 6e4}
    with pytest.raises(ValueError, match="gain"):
        reduce_quadrant(data, overscan, gain=0.0, pixel_area=area, **kw)
    with pytest.raises(ValueError, match="pixel_area"):
        reduce_quadrant(data, overscan, gain=gain, pixel_area=None, **kw)
    with pytest.raises(ValueError, match="flat"):
        reduce_quadrant(data, overscan, gain=gain, pixel_area=area, **{**kw, "flat": flat[:5]})
    with pytest.raises(ValueError, match="variance"):
        detect_cosmic_rays(data, data[:3])


def test_cosmic_rays_found_and_stars_spared(tiny_survey):
    """Against the truth hits: nearly all found; stars' cores are not taken for
    cosmic rays (tiny's Moffat stars up to saturation)."""
    tr = tiny_survey.truth
    load = lambda g: xr.open_zarr(tr, group=g, consolidated=False).load()  # noqa: E731
    ex, cosmics = load("exposures"), load("cosmics").to_dataframe()
    obs = load("observations").to_dataframe()
    flat, defects = load("maps/flat/r").flat, load("maps/defects").defects
    found = total = false_on_stars = stars = 0
    for k in np.nonzero(ex.imagetyp.values == "SCIENCE")[0][:4]:
        e = ex.isel(exposure=int(k))
        bias = load(f"maps/bias/{e.night.values}").bias
        for frame in read_quadrants(tiny_survey.raw / str(e.path.values)):
            q = frame.header.quadrant
            red = reduce_quadrant(
                frame.data, frame.overscan, bias_adu=bias.sel(quadrant=q).values,
                flat=flat.sel(quadrant=q).values, gain=frame.header.gain,
                read_noise_e=frame.header.rdnoise_e, saturate_adu=frame.header.saturate_adu,
                pixel_area=pixel_area_map(frame.wcs, frame.data.shape),
                defects=defects.sel(quadrant=q).values,
            )  # fmt: skip
            hit = (red.mask & MASK_COSMIC) != 0
            truth = np.zeros_like(hit)
            c = cosmics[(cosmics.expid == int(e.expid)) & (cosmics.quadrant == q)]
            truth[c.y.values, c.x.values] = True
            usable = (red.mask & ~MASK_COSMIC) == 0  # defects/saturation are masked anyway
            total += int((truth & usable).sum())
            found += int((truth & usable & hit).sum())
            here = obs[(obs.expid == int(e.expid)) & (obs.quadrant == q) & (obs.mag < 19)]
            for s in here.itertuples():
                iy, ix = round(s.y), round(s.x)
                if 0 <= iy < 128 and 0 <= ix < 128 and not truth[iy, ix]:
                    stars += 1
                    false_on_stars += int(hit[iy, ix])
    assert total > 100
    assert found / total > 0.95, (found, total)
    assert stars > 100
    assert false_on_stars / stars < 0.02, (false_on_stars, stars)
