"""PSF models measured on stars rendered by the simulator: the shape (FWHM,
Moffat index or Gaussian, ellipticity from the distortion) comes back within
what the stars' noise allows, and the model's normalisation matches the
simulator's (a star's flux is its fluence)."""

from __future__ import annotations

import numpy as np
import pytest

from calib.psf import PSFFitError, PSFModel, fit_psf
from sim.render import StarsOnQuadrant, add_stars, psf_stamps


def _field(kind: str, *, fwhm: float, jac: np.ndarray, n: int = 20, seed: int = 1):
    rng = np.random.default_rng(seed)
    pts: list[np.ndarray] = []
    while len(pts) < n:
        p = rng.uniform(8, 119, 2)
        if all(np.hypot(*(p - q)) > 22 for q in pts):
            pts.append(p)
    x, y = np.array(pts).T
    flux = 10 ** rng.uniform(4, 5.3, n)
    light = np.zeros((128, 128))
    add_stars(
        light,
        StarsOnQuadrant(np.arange(n), x, y, flux),
        np.broadcast_to(jac, (n, 2, 2)),
        fwhm_px=np.full(n, fwhm),
        kind=kind,
        beta=3.5,
    )
    image = rng.poisson(light + 900.0) + rng.normal(0, 8, light.shape)
    return (
        image,
        np.clip(image, 0, None) + 64.0,
        x + rng.normal(0, 0.2, n),
        y + rng.normal(0, 0.2, n),
    )


# Pixel offsets -> sky: a 1.5 % shear, as the simulator's distortion makes near
# the field's edge. The PSF is round on the sky, so on the detector its quadratic
# form is jac^T jac: e1 = 1 - A00, e2 = -A01 with A = jac^T jac / sqrt(det).
JAC = np.array([[1.01, 0.004], [0.004, 0.995]])


@pytest.mark.parametrize("kind", ["moffat", "gaussian"])
def test_shape_is_measured_from_the_stars(kind):
    image, var, x, y = _field(kind, fwhm=2.4, jac=JAC)
    model = fit_psf(image, var, x, y, fwhm_guess_px=2.5)
    jtj = JAC.T @ JAC
    det = np.sqrt(np.linalg.det(jtj))
    a = jtj / det
    # Tolerances: 20 stars of S/N 50-500 fix the width to ~0.3 %, the ellipticity
    # to ~0.002 and 1/beta to ~0.01; 5x those.
    assert model.fwhm_px == pytest.approx(2.4 / np.sqrt(det), rel=0.015)
    assert model.e1 == pytest.approx(1 - a[0, 0], abs=0.01)
    assert model.e2 == pytest.approx(-a[0, 1], abs=0.01)
    if kind == "moffat":
        assert 1.0 / model.inv_beta == pytest.approx(3.5, rel=0.15)
    else:
        assert model.inv_beta < 0.02  # the Gaussian limit of the family
    assert model.n_stars == 20
    assert model.chi2_dof == pytest.approx(1.0, abs=0.1)


def test_model_normalisation_matches_the_rendered_stars():
    """A noiseless star of flux f rendered by the simulator is f times the model
    at the true parameters: the model is normalised by its integral, the
    simulator renormalises within its stamp, here 25 px, beyond which a beta =
    3.5 Moffat of FWHM 2.4 keeps 2e-4 of its light (hence the tolerance)."""
    h = 12
    offs = np.arange(-h, h + 1)
    x0, y0 = 0.3, -0.2
    for kind, u in (("moffat", 1 / 3.5), ("gaussian", 0.0)):
        stamp = psf_stamps(
            offs[None, None, :] - x0,
            offs[None, :, None] - y0,
            np.eye(2)[None],
            fwhm_px=2.4,
            kind=kind,
            beta=3.5,
        )[0]
        model = PSFModel(2.4, u, 0.0, 0.0, np.zeros((3, 2)), 0.0, 0.0, support_fwhm=20.0)
        values = np.asarray(model.evaluate(offs[None, :], offs[:, None], x0, y0))
        np.testing.assert_allclose(values, stamp, rtol=5e-4, atol=1e-9)
        assert values.sum() == pytest.approx(1.0, abs=1e-3)


def test_position_derivatives_are_those_of_the_profile():
    model = PSFModel(2.6, 0.3, 0.05, -0.03, np.zeros((3, 2)), 0.0, 0.0)
    px, py = np.meshgrid(np.arange(-6, 7), np.arange(-6, 7))
    _, dx, dy = model.evaluate(px, py, 0.2, -0.1, derivatives=True)
    step = 1e-5
    num_x = (
        model.evaluate(px, py, 0.2 + step, -0.1) - model.evaluate(px, py, 0.2 - step, -0.1)
    ) / (2 * step)
    num_y = (
        model.evaluate(px, py, 0.2, -0.1 + step) - model.evaluate(px, py, 0.2, -0.1 - step)
    ) / (2 * step)
    np.testing.assert_allclose(dx, num_x, atol=1e-7)
    np.testing.assert_allclose(dy, num_y, atol=1e-7)


def test_a_neighbour_spoiling_one_star_is_rejected():
    image, var, x, y = _field("moffat", fwhm=2.4, jac=np.eye(2))
    yy, xx = np.mgrid[0:128, 0:128]
    # An unflagged extended blob on star 0.
    image = image + 3000.0 * np.exp(-((xx - x[0] - 2) ** 2 + (yy - y[0]) ** 2) / 8.0)
    model = fit_psf(image, var, x, y, fwhm_guess_px=2.5)
    # The spoiled star goes (with, at most, a few bright ones whose chi^2 the
    # one-pass clip also finds high); the shape stays right.
    assert 15 <= model.n_stars <= 19
    assert model.fwhm_px == pytest.approx(2.4, rel=0.015)
    kept_all = fit_psf(image, var, x, y, fwhm_guess_px=2.5, clip_sigma=1e6)
    assert kept_all.n_stars == 20
    assert abs(kept_all.fwhm_px - 2.4) > abs(model.fwhm_px - 2.4)


def test_bad_inputs_are_refused():
    image = np.zeros((32, 32))
    with pytest.raises(ValueError, match="one shape"):
        fit_psf(image, np.ones((31, 32)), [10.0], [10.0])
    with pytest.raises(PSFFitError, match="only 0 stars"):
        fit_psf(image, np.ones((32, 32)), [1.0], [1.0])
