"""The classical baseline: PSF-matched difference, matched-filter detection and
Magdiff recover injected transients within noise-derived tolerances."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from calib.difference import detect_transients, measure_magdiff, subtract_images
from ml.transients import match_to_truth
from sim.transients import PairConfig, simulate_pair

# Dense enough in stars for a kernel fit on a 256x256 quadrant; clear transients
# away from edges and bright stars, where the tolerances below are pure noise.
CONFIG = PairConfig(
    nx=256,
    ny=256,
    stars_per_mpix=3000.0,
    transients_per_mpix=150.0,
    min_separation_px=40.0,
    snr_range=(15.0, 40.0),
    near_edge_fraction=0.0,
    near_bright_fraction=0.0,
    kind_weights=(0.2, 0.4, 0.4),
    delta_mag_range=(0.3, 1.5),
)
SEEDS = (21, 22)


@pytest.fixture(scope="module", params=SEEDS)
def case(request):
    pair = simulate_pair(CONFIG, seed=request.param)
    diff = subtract_images(pair.ref, pair.new, read_noise_e=CONFIG.read_noise_e)
    return pair, diff


def test_measured_psf_widths_order_the_images(case):
    pair, diff = case
    # Adaptive moments of a Moffat PSF overestimate its FWHM, by the same factor
    # in both images.
    ratio = diff.fwhm_new_px / diff.fwhm_ref_px
    assert ratio == pytest.approx(pair.fwhm_new_px / pair.fwhm_ref_px, rel=0.1)
    assert diff.convolved == ("ref" if pair.fwhm_ref_px < pair.fwhm_new_px else "new")
    assert diff.n_kernel_stars >= 5


def test_transients_are_found_at_their_positions(case):
    """Every transient is detected, and its position error is within 5 sigma of
    the centroid noise of a background-limited point source,
    sigma = sqrt(2) sigma_psf / snr, plus 0.15 px for the parabola's pixel bias.
    The border the kernel cannot match (5 px, plus the parabola's neighbour) is
    excluded: the baseline does not localise there."""
    pair, diff = case
    t = pair.truth
    found = detect_transients(diff, threshold=5.0)
    border = np.minimum.reduce([t.x, t.y, CONFIG.nx - 1 - t.x, CONFIG.ny - 1 - t.y])
    inner = np.flatnonzero(border >= diff.kernel.shape[0] // 2 + 1)
    assert len(inner) >= 3
    for i in inner:
        d = np.hypot(found.x - t.x[i], found.y - t.y[i])
        j = int(np.argmin(d))
        sigma_psf = diff.fwhm_matched_px / 2.3548
        tol = 5 * np.sqrt(2) * sigma_psf / t.snr[i] + 0.15
        assert d[j] < tol, (i, d[j], tol)
        assert np.sign(found.snr[j]) == np.sign(t.flux_change_e[i])
    _, false = match_to_truth(found.x, found.y, t.x, t.y, radius_px=3.0)
    assert false.sum() == 0


def test_magdiff_recovers_the_magnitude_change(case):
    """delta_mag of brightening/fading stars and the magnitude of the flux change
    of all, within 5 of their propagated errors plus 0.02 mag (the PSF's wings
    beyond the stamp that set the aperture correction). delta_mag is checked on
    uncrowded hosts: a neighbour's light in both apertures compresses it."""
    pair, diff = case
    t = pair.truth
    m = measure_magdiff(diff, t.x, t.y, zp_mag=CONFIG.zp_mag)
    # Neighbours within 3 matched FWHM carrying over 1 % of the host's flux.
    sx, sy = pair.star_xy.T
    d = np.hypot(sx[None, :] - t.x[:, None], sy[None, :] - t.y[:, None])  # (n_t, n_star)
    host_flux = 10 ** (-0.4 * np.fmin(t.mag_ref, t.mag_new))
    star_flux = 10 ** (-0.4 * pair.star_mag)
    neighbour = (d < 3 * diff.fwhm_matched_px) & (star_flux[None, :] > 0.01 * host_flux[:, None])
    hosts = (t.kind != "new") & ~neighbour.any(axis=1)
    assert hosts.sum() >= 2
    assert np.all(np.isfinite(m.delta_mag[hosts]))
    err = np.abs(m.delta_mag - t.delta_mag)[hosts]
    assert np.all(err < 5 * m.delta_mag_err[hosts] + 0.02), (err, m.delta_mag_err[hosts])
    err = np.abs(m.mag_change - t.mag_change)
    assert np.all(err < 5 * m.mag_change_err + 0.02), (err, m.mag_change_err)
    # A new source has no reference magnitude.
    assert np.all(np.isnan(m.mag_ref[t.kind == "new"]))


def test_no_false_detections_without_transients():
    pair = simulate_pair(dataclasses.replace(CONFIG, transients_per_mpix=0.0), seed=23)
    assert len(pair.truth) == 0
    diff = subtract_images(pair.ref, pair.new, read_noise_e=CONFIG.read_noise_e)
    assert len(detect_transients(diff, threshold=5.0)) == 0


def test_kernel_absorbs_a_photometric_scale():
    """A new image 20 % more transparent: the kernel's sum carries the ratio and
    the difference of the static stars stays consistent with noise."""
    pair = simulate_pair(dataclasses.replace(CONFIG, transients_per_mpix=0.0), seed=24)
    new = pair.new * 1.2
    diff = subtract_images(pair.ref, new, read_noise_e=CONFIG.read_noise_e)
    expected = 1.2 if diff.convolved == "ref" else 1 / 1.2
    assert diff.kernel.sum() == pytest.approx(expected, rel=0.01)
    assert len(detect_transients(diff, threshold=5.0)) == 0


def test_too_few_stars_is_a_clear_error():
    sparse = dataclasses.replace(CONFIG, stars_per_mpix=0.0, transients_per_mpix=0.0)
    pair = simulate_pair(sparse, seed=25)
    with pytest.raises(ValueError, match="stars above"):
        subtract_images(pair.ref, pair.new, read_noise_e=8.0)
