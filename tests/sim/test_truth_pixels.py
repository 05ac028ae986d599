"""The truth store agrees with the pixels: reducing the raw frames with the true
bias, gain, flat and pixel area, aperture photometry of bright isolated stars
recovers truth mag + zp + starflat within the photon + read + background noise."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import xarray as xr
from photutils.aperture import CircularAnnulus, CircularAperture, aperture_photometry

from sim.config import make_config
from tasks.io.raw import read_quadrants
from tasks.simulate import simulate_survey


@pytest.fixture(scope="module")
def sparse_survey(tmp_path_factory):
    """Domain B (Gaussian PSF: no wings to leak out of the aperture or in from
    neighbours) on a sparse field, two nights (one cloudy)."""
    cfg = make_config("tiny", seed=21, domain="B")
    cfg = cfg.replace(
        sky=dataclasses.replace(cfg.sky, stars_per_quadrant=20.0, mag_range=(13.0, 21.5)),
        schedule=dataclasses.replace(cfg.schedule, n_science=16),
    )
    return simulate_survey(tmp_path_factory.mktemp("sparse"), cfg)


def _truth(store, group):
    return xr.open_zarr(store, group=group, consolidated=False).load()


def _fluence(frame, bias, flat, area):
    """Raw ADU -> electrons on the fluence image, and the per-pixel variance."""
    data = frame.data - np.median(frame.overscan, axis=1)[:, None] - bias
    elec = data * frame.header.gain
    var = np.clip(elec, 0, None) + frame.header.rdnoise_e**2
    factor = area / flat
    return elec * factor, var * factor**2


def _photometry(tiny_survey):
    tr = tiny_survey.truth
    obs = _truth(tr, "observations").to_dataframe()
    ex = _truth(tr, "exposures").swap_dims({"exposure": "expid"})
    area = _truth(tr, "maps/area").area
    defects = _truth(tr, "maps/defects").defects
    cosmics = _truth(tr, "cosmics").to_dataframe()
    rows = []
    for expid in np.unique(obs.expid):
        e = ex.sel(expid=expid)
        night, band = str(e.night.values), str(e.band.values)
        flat = _truth(tr, f"maps/flat/{band}").flat
        bias = _truth(tr, f"maps/bias/{night}").bias
        fwhm = float(e.seeing_arcsec)  # 1 arcsec pixels
        # 3 FWHM = 7 sigma: a Gaussian loses e^-24 of its light outside.
        r = 3.0 * fwhm
        frames = read_quadrants(tiny_survey.raw / str(e.path.values))
        for fr in frames:
            q = fr.header.quadrant
            img, var = _fluence(
                fr,
                bias.sel(quadrant=q).values,
                flat.sel(quadrant=q).values,
                area.sel(quadrant=q).values,
            )
            here = obs[(obs.expid == expid) & (obs.quadrant == q)]
            hits = cosmics[(cosmics.expid == expid) & (cosmics.quadrant == q)]
            bad = defects.sel(quadrant=q).values != 0
            bad[hits.y.values, hits.x.values] = True
            ny, nx = img.shape
            for s in here.itertuples():
                # Domain B saturates (120 ke- full well, sharp PSF) brighter than ~14.5.
                if not (14.6 < s.mag < 17.5):
                    continue
                if not (r + 11 < s.x < nx - r - 11 and r + 11 < s.y < ny - r - 11):
                    continue
                d = np.hypot(here.x - s.x, here.y - s.y)
                if np.any((d > 0) & (d < r + 4 * fwhm) & (here.mag < s.mag + 7)):
                    continue
                ap = CircularAperture((s.x, s.y), r)
                ann = CircularAnnulus((s.x, s.y), r + 3, r + 10)
                if ap.to_mask(method="exact").multiply(bad.astype(float)).sum() > 0:
                    continue
                ann_vals = ann.to_mask(method="center").get_values(img)
                sky = np.median(ann_vals)
                sky_err = 1.2533 * np.std(ann_vals) / np.sqrt(ann_vals.size)
                tab = aperture_photometry(img, ap, error=np.sqrt(var), method="exact")
                flux = float(tab["aperture_sum"][0]) - sky * ap.area
                err = np.hypot(float(tab["aperture_sum_err"][0]), sky_err * ap.area)
                rows.append((s.mag, s.zp, s.dzp_starflat, s.flux_e, flux, err))
    return np.array(rows)


def test_bright_isolated_stars_match_truth_within_noise(sparse_survey):
    rows = _photometry(sparse_survey)
    mag, zp, dzp, flux_true, flux, err = rows.T
    assert len(rows) >= 40, f"only {len(rows)} usable stars"
    pull = (flux - flux_true) / err
    m_inst = -2.5 * np.log10(flux / 30.0)
    resid = m_inst + zp + dzp - mag
    # Pulls: unit width (the error model is right) and centred (no bias).
    assert 0.75 < np.std(pull) < 1.3, np.std(pull)
    assert abs(np.mean(pull)) < 4 / np.sqrt(len(pull)) + 0.1
    # In magnitudes: the weighted mean residual is zero within its own error
    # (~0.8 mmag here, photon-limited: a 3 mmag error in zp, flat or area fails).
    sigma_m = 1.0857 * err / flux
    w = 1.0 / sigma_m**2
    mean_resid, mean_err = np.sum(w * resid) / np.sum(w), 1.0 / np.sqrt(np.sum(w))
    assert mean_err < 0.0015
    assert abs(mean_resid) < 3 * mean_err + 2e-4, (mean_resid, mean_err)


@pytest.mark.parametrize("kind", ["bias", "flat"])
def test_master_inputs_are_consistent_with_truth(tiny_survey, kind):
    """Averaging the raw calibration frames (overscan-subtracted) recovers the
    truth bias structure, and the dome flat's shape, within their noise."""
    tr = tiny_survey.truth
    ex = _truth(tr, "exposures")
    wanted = "BIAS" if kind == "bias" else "FLAT"
    first_night = str(ex.night.values[0])
    sel = (ex.imagetyp.values == wanted) & (ex.night.values == first_night)
    stack = []
    for path in ex.path.values[sel]:
        fr = read_quadrants(tiny_survey.raw / str(path), quadrants=[20])[0]
        stack.append(fr.data - np.median(fr.overscan, axis=1)[:, None])
    stack = np.array(stack)
    good = _truth(tr, "maps/defects").defects.sel(quadrant=20).values == 0
    if kind == "bias":
        truth = _truth(tr, f"maps/bias/{first_night}").bias.sel(quadrant=20).values
        resid = (stack.mean(axis=0) - truth)[good]
        rn_adu = fr.header.rdnoise_e / fr.header.gain
        assert abs(resid.mean()) < 0.3
        assert resid.std() == pytest.approx(rn_adu / np.sqrt(len(stack)), rel=0.15)
    else:
        bias = _truth(tr, f"maps/bias/{first_night}").bias.sel(quadrant=20).values
        norm = [(f - bias) / np.median((f - bias)[good]) for f in stack]
        truth = _truth(tr, "maps/flat/r").flat.sel(quadrant=20).values
        ratio = (np.mean(norm, axis=0) / (truth / np.median(truth[good])))[good]
        # Poisson noise of ~1.3e5 e- per frame, averaged over the LED frames, plus
        # the LED colour pattern, which averages out only approximately.
        assert abs(np.median(ratio) - 1) < 1e-3
        assert ratio.std() < 0.004
