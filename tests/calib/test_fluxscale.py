"""The flux-scale correction: calibration stars fitted with the scene model's
estimator against their catalog fluxes. The ratio is 1 within its error when the
PSF model is complete, recovers a known loss when it is not, and is robust to a
variable star."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from calib.fluxscale import measure_flux_scale
from calib.psf import fit_psf
from calib.scene import AffineMap, SceneFitOptions, SceneImage, fit_scene
from sim.hosts import SceneEpochsConfig, simulate_scene_epochs

HALF = 6


def _star_fluxes(epochs, support_fwhm=4.0):
    """Each star of the field fitted (point source + sky per image, shared
    position) in every epoch where its stamp is whole."""
    psfs = [
        dataclasses.replace(
            fit_psf(ep.image, ep.variance, ep.star_x, ep.star_y, fwhm_guess_px=2.5),
            support_fwhm=support_fwhm,
        )
        for ep in epochs
    ]
    first = AffineMap(epochs[0].matrix, epochs[0].offset)
    su, sv = first.inverse(epochs[0].star_x, epochs[0].star_y)
    n = len(epochs)
    flux = np.full((len(su), n), np.nan)
    err = np.full((len(su), n), np.nan)
    for k in range(len(su)):
        images = []
        for e, ep in enumerate(epochs):
            amap = AffineMap(ep.matrix, ep.offset)
            x, y = amap(su[k], sv[k])
            ix, iy = round(float(x)), round(float(y))
            ny, nx = ep.image.shape
            if ix - HALF < 0 or iy - HALF < 0 or ix + HALF >= nx or iy + HALF >= ny:
                continue
            sl = (slice(iy - HALF, iy + HALF + 1), slice(ix - HALF, ix + HALF + 1))
            images.append(
                SceneImage(
                    ep.image[sl],
                    ep.variance[sl],
                    np.ones((2 * HALF + 1,) * 2, bool),
                    1.0,
                    8.0,
                    ix - HALF,
                    iy - HALF,
                    psfs[e],
                    ep.alpha,
                    AffineMap(ep.matrix, np.array([x, y], dtype=float).ravel()),
                    e,
                )
            )
        if len(images) >= 3:
            fit = fit_scene(images, (0.0, 0.0), n_epochs=n, options=SceneFitOptions(galaxy=False))
            flux[k], err[k] = fit.flux_njy, fit.flux_err_njy
    return flux, err, epochs[0].star_flux_njy


@pytest.fixture(scope="module")
def field():
    cfg = SceneEpochsConfig(n_epochs=10, shape=(96, 96), n_stars=14, host_mag=30.0)
    return simulate_scene_epochs(cfg, seed=21)


def test_star_fluxes_match_their_catalog_within_errors(field):
    """Catalog fluxes exact (errors 0.1 %): the ratio is 1 within 3 sigma and the
    stars scatter about it as their errors say (chi^2/dof 1 +- sqrt(2 / dof),
    allowed to 2)."""
    flux, err, cat = _star_fluxes(field)
    scale = measure_flux_scale(flux, err, cat, 1e-3 * cat)
    assert scale.n_stars >= 10
    assert abs(scale.ratio - 1.0) < 3 * scale.ratio_err
    assert scale.ratio_err < 0.002
    assert 0.3 < scale.chi2_dof < 2.0
    assert np.isfinite(scale.per_epoch).sum() == len(field)


def test_per_epoch_ratios_remove_each_image_psf_normalisation(field):
    """Every image's PSF is measured on its own few stars, so its normalisation
    is off by ~1 % (per_epoch_chi2_dof well above 1); divided by the ratio of
    the *other* stars of its epoch, each star's flux scatters about its catalog
    flux as its errors (and the ratio's) say."""
    flux, err, cat = _star_fluxes(field)
    scale = measure_flux_scale(flux, err, cat, 1e-3 * cat)
    assert scale.per_epoch_chi2_dof > 2.0
    z = []
    for k in range(len(cat)):
        others = np.arange(len(cat)) != k
        loo = measure_flux_scale(flux[others], err[others], cat[others], 1e-3 * cat[others])
        ok = np.isfinite(flux[k])
        corr = flux[k, ok] / loo.per_epoch[ok]
        sig = np.hypot(
            err[k, ok] / loo.per_epoch[ok], corr * loo.per_epoch_err[ok] / loo.per_epoch[ok]
        )
        z += list((corr - cat[k]) / np.hypot(sig, 1e-3 * cat[k]))
    assert 0.7 < np.std(z) < 1.3


def test_a_truncated_psf_is_measured_and_corrected(field):
    """A PSF support of 1.5 FWHM leaves a known fraction of a beta = 3.5 Moffat's
    light out (its model puts the rest in the wings): the ratio measures the loss
    and dividing by it brings the stars back to their catalog."""
    flux, err, cat = _star_fluxes(field, support_fwhm=1.5)
    scale = measure_flux_scale(flux, err, cat, 1e-3 * cat)
    assert scale.ratio < 0.99
    corrected = flux / scale.ratio
    again = measure_flux_scale(corrected, err / scale.ratio, cat, 1e-3 * cat)
    assert abs(again.ratio - 1.0) < 3 * again.ratio_err


def test_a_variable_star_is_clipped():
    rng = np.random.default_rng(4)
    cat = np.full(12, 1e5)
    flux = rng.normal(1.0, 0.01, (12, 8)) * cat[:, None]
    flux[3] *= 1.3
    scale = measure_flux_scale(flux, np.full((12, 8), 1e3), cat, np.full(12, 100.0))
    assert scale.n_rejected == 1
    assert abs(scale.ratio - 1.0) < 3 * scale.ratio_err


def test_too_few_stars_give_no_correction():
    scale = measure_flux_scale(np.ones((2, 3)), np.full((2, 3), 0.1), np.ones(2), np.full(2, 0.01))
    assert scale.ratio == 1.0
    assert scale.ratio_err == 0.0
    with pytest.raises(ValueError, match="n_stars"):
        measure_flux_scale(np.ones((2, 3)), np.ones((2, 3)), np.ones(3), np.ones(3))


def test_correction_modes_choose_between_the_epochs_and_the_overall_ratio():
    """auto takes an epoch's own ratio only where >= 3 stars fix it to
    per_epoch_max_err; global never, per_epoch wherever it has one, none is 1."""
    rng = np.random.default_rng(5)
    cat = np.full(6, 1e5)
    flux = cat[:, None] * np.array([1.02, 0.98, 1.0])[None, :] * rng.normal(1, 1e-4, (6, 3))
    err = np.full((6, 3), 100.0)
    err[:, 2] = 5e3  # the third epoch's stars fix its ratio to 2 %: too loose for auto
    flux[3:, 1] = np.nan  # the second epoch has three stars
    scale = measure_flux_scale(flux, err, cat, np.full(6, 10.0))
    ratio, ratio_err, own = scale.correction("auto", per_epoch_max_err=0.005)
    assert own.tolist() == [True, True, False]
    assert ratio[0] == pytest.approx(1.02, abs=1e-3)
    assert ratio[1] == pytest.approx(0.98, abs=1e-3)
    assert ratio[2] == scale.ratio
    assert ratio_err[2] == scale.ratio_err
    assert not scale.correction("auto", per_epoch_min_stars=4)[2][1]
    assert scale.correction("per_epoch")[2].all()
    assert not scale.correction("global")[2].any()
    assert np.all(scale.correction("global")[0] == scale.ratio)
    none = scale.correction("none")
    assert np.all(none[0] == 1)
    assert np.all(none[1] == 0)
    assert not none[2].any()
    with pytest.raises(ValueError, match="mode"):
        scale.correction("median")
