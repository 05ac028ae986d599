"""Host galaxies and transients in the simulator: profiles that conserve their
flux, light curves with zero flux before the explosion, transients that move
over quadrants, and presets that render exactly as before when none is asked for."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.table import Table
from scipy import integrate

from sim.config import SceneConfig, make_config
from sim.hosts import (
    SceneEpochsConfig,
    galaxy_profile,
    sersic_b,
    sersic_sb,
    simulate_scene_epochs,
)
from sim.render import fine_psf
from sim.survey import Survey
from tasks.io.store import read_group
from tasks.simulate import simulate_survey


def test_a_scene_without_transients_renders_the_same_bytes():
    """The scene code path adds nothing when there is nothing to add: a preset
    with an empty scene renders every science quadrant byte for byte as without
    one (the presets' outputs were also compared with main's: docs/lightcurves.md)."""
    base = make_config("tiny", seed=5)
    empty = base.replace(scene=SceneConfig(n_transients=0))
    plain, with_scene = Survey(base), Survey(empty)
    exposure = next(e for e in plain.exposures if e.imagetyp == "SCIENCE")
    hdus_a, cr_a = plain.render(exposure)
    hdus_b, cr_b = with_scene.render(exposure)
    for a, b in zip(hdus_a, hdus_b, strict=True):
        assert np.array_equal(a.data, b.data)
    assert all(np.array_equal(cr_a[q][0], cr_b[q][0]) for q in cr_a)


@pytest.mark.parametrize("sersic_n", [0.8, 1.0, 2.5, 4.0])
def test_sersic_surface_brightness_integrates_to_the_total_magnitude(sersic_n):
    """sersic_sb is the profile of total magnitude m: integrating 10**(-0.4 sb)
    over the ellipse gives 10**(-0.4 m), half of it within r_eff (quadrature to
    1e-6; the profile is analytic)."""
    m, r_e, q = 18.0, 2.0, 0.6

    def light(r):
        return 2 * np.pi * q * r * 10 ** (-0.4 * sersic_sb(m, r_e, sersic_n, q, r))

    total, _ = integrate.quad(light, 0, np.inf, limit=400)
    half, _ = integrate.quad(light, 0, r_e, limit=200)
    assert total == pytest.approx(10 ** (-0.4 * m), rel=1e-6)
    assert half == pytest.approx(0.5 * total, rel=1e-6)
    assert float(sersic_b(1.0)) == pytest.approx(1.6783, abs=1e-4)


@pytest.mark.parametrize(
    "jac", [np.eye(2), np.array([[1.02, 0.01], [0.01, 0.99]])], ids=["identity", "distorted"]
)
def test_galaxy_profile_conserves_its_flux_on_the_pixels(jac):
    """Pixels collect surface brightness times their solid angle: the sum over
    pixels is the galaxy's flux whatever the distortion (the profile is
    normalised within 8 r_eff; bilinear sampling of the 0.25 px grid costs < 1e-3)."""
    half = 40
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(float)
    psf = fine_psf(2.3, 0.25, kind="moffat", beta=3.5)
    values = galaxy_profile(
        xx + 0.3,
        yy - 0.2,
        jac,
        r_eff_px=3.0,
        sersic_n=2.0,
        axis_ratio=0.6,
        pa_deg=30.0,
        psf=psf,
        psf_step_px=0.25,
    )
    assert values.sum() == pytest.approx(1.0, abs=1e-3)
    assert values.min() >= 0


def test_light_curves_are_zero_before_explosion_then_rise_peak_and_decline():
    survey = Survey(make_config("tiny", seed=2, nights=4, transients=3))
    sc = survey.scene
    for k in range(len(sc)):
        t0, tp = sc.t_explosion_mjd[k], sc.t_peak_mjd[k]
        before = sc.flux_njy("r", t0 - 0.01)[k]
        assert before == 0.0
        assert np.isinf(sc.mag_at("r", t0 - 0.01)[k])
        rise = [sc.flux_njy("r", t)[k] for t in np.linspace(t0 + 1e-3, tp, 20)]
        assert np.all(np.diff(rise) > 0)
        assert sc.mag_at("r", tp)[k] == pytest.approx(sc.peak_mag["r"][k], abs=1e-9)
        fall = [sc.flux_njy("r", t)[k] for t in np.linspace(tp, tp + 3.0, 20)]
        assert np.all(np.diff(fall) < 0)
        # No bright or variable star within the clearance of the transient.
        cat = survey.catalog
        d = (
            np.hypot(
                (cat.ra_deg - sc.ra_deg[k]) * np.cos(np.radians(sc.dec_deg[k])),
                cat.dec_deg - sc.dec_deg[k],
            )
            * 3600.0
        )
        bad = (cat.mag["r"] < 15.0) | (cat.var_amp_mag > 0)
        assert not np.any(bad & (d < SceneConfig().clear_of_bright_arcsec))


def test_host_surface_brightness_spans_faint_to_bright():
    survey = Survey(make_config("tiny", seed=4, nights=2, transients=6))
    sb = survey.scene.host_sb_at_transient("r")
    # The sky is 20.9 mag/arcsec^2 in r: hosts under the transient from brighter
    # than it to magnitudes fainter.
    assert sb.min() < 20.0
    assert sb.max() - sb.min() > 2.0


def test_simulated_survey_writes_transient_truth_and_targets(tmp_path):
    res = simulate_survey(tmp_path, preset="tiny", seed=3, nights=3, transients=2)
    targets = Table.read(res.targets, format="ascii.ecsv")
    assert list(targets.colnames) == ["name", "ra", "dec", "no_flux_before"]
    tr = read_group(res.truth, "transients")
    ep = read_group(res.truth, "transient_epochs")
    n_sci = int((read_group(res.truth, "exposures").imagetyp.values == "SCIENCE").sum())
    assert ep.sizes["obs"] == 2 * n_sci
    assert list(tr.name.values) == list(targets["name"])
    for k, name in enumerate(tr.name.values):
        rows = ep.name.values == name
        on = ep.quadrant.values[rows] >= 0
        # Dithers of +-30 % of the focal plane move each transient over quadrants.
        assert len(np.unique(ep.quadrant.values[rows][on])) >= 2
        pre = ep.mjd.values[rows] < tr.t_explosion_mjd.values[k]
        assert np.all(ep.flux_njy.values[rows][pre] == 0)
        assert np.all(targets["no_flux_before"][k] < tr.t_explosion_mjd.values[k])
        post = ep.flux_njy.values[rows] > 0
        # flux_e = EXPTIME 10**(-0.4 (m - zp - dzp)) and flux_njy = 10**(-0.4 (m - 31.4)).
        m = ep.mag.values[rows][post & on]
        expect = 30.0 * 10 ** (
            -0.4 * (m - ep.zp.values[rows][post & on] - ep.dzp_starflat.values[rows][post & on])
        )
        np.testing.assert_allclose(ep.flux_e.values[rows][post & on], expect, rtol=1e-12)


def test_scene_config_refuses_bad_ranges_and_counts():
    with pytest.raises(ValueError, match="n_transients"):
        SceneConfig(n_transients=-1)
    with pytest.raises(ValueError, match="host_mag_range"):
        SceneConfig(host_mag_range=(21.0, 18.0))
    with pytest.raises(ValueError, match="no room"):
        Survey(
            make_config("tiny", seed=1).replace(
                scene=SceneConfig(n_transients=50, min_separation_arcsec=100.0)
            )
        )


def test_scene_epochs_are_deterministic_and_carry_their_truth():
    cfg = dataclasses.replace(SceneEpochsConfig(), n_epochs=4, explosion_epoch=1.0)
    a = simulate_scene_epochs(cfg, seed=9)
    b = simulate_scene_epochs(cfg, seed=9)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    assert [e.flux_njy for e in a][:2] == [0.0, 0.0]
    assert a[3].flux_njy > 0
