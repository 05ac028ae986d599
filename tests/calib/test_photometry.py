"""Photometry: aperture sums against sep, background, centroids, FWHM, flags, and
the science of the issue on the simulator: bright isolated stars recover
(truth mag - zp - starflat) within their errors, the Jacobian switch shows the
distortion signature, and classical zero points match the truth.

The survey (module fixture) is domain B (Gaussian PSF) on a star field weighted
to the bright magnitudes the tests use (45 stars per 128x128 quadrant, all of
14.6 < r < 17.5: ~11 bright isolated stars per quadrant instead of ~0.7 on a
field drawn down to r = 21.5), two nights (the first clear, the second cloudy),
6 science exposures a night, reduced with masters built from the simulator's
truth in the masters stage's contract, through the stage's own plain function.

Tolerances come from the noise (tests/statchecks.py): each check says what
its statistical error is; negative tests run the checks on perturbed code or
output (the pixel area at 70 % strength, a 3 mmag offset, errors x2) and
require them to fail."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from statchecks import (
    assert_close_in_sigma,
    assert_fails,
    assert_rms_unit,
    assert_unit_pulls,
    weighted_slope,
)

from calib.photometry import (
    FLAG_BITS,
    FLAG_EDGE,
    FLAG_SATURATED,
    aperture_sums,
    estimate_background,
    instrumental_magnitudes,
    measure_fwhm,
    photometer_quadrant,
    refine_centroids,
)
from calib.pixel_area import PixelAreaCache, pixel_area_map
from calib.reduce import ReducedQuadrant, reduce_quadrant
from sim.config import make_config
from tasks.io.raw import read_quadrants, read_refcat
from tasks.io.store import write_group
from tasks.reduce import (
    PhotometryConfig,
    ReduceConfig,
    night_groups,
    photometer_chunk,
)
from tasks.simulate import simulate_survey

EXPTIME_S = 30.0


def _truth(store, group):
    return xr.open_zarr(store, group=group, consolidated=False).load()


def write_truth_masters(truth: str, store: str) -> list[str]:
    """Masters in the masters stage's contract, from the simulator's truth maps:
    one bias period per night, one flat period (the first night) per band."""
    ex = _truth(truth, "exposures")
    nights = sorted(set(ex.night.values))
    defects = _truth(truth, "maps/defects").defects
    for night in nights:
        write_group(
            store,
            f"masters/bias/{night}",
            xr.Dataset({"bias": _truth(truth, f"maps/bias/{night}").bias}),
        )
    for band in sorted({b for b in ex.band.values if b}):
        flat = _truth(truth, f"maps/flat/{band}").flat
        write_group(
            store,
            f"masters/flat/{band}/{nights[0]}",
            xr.Dataset({"flat": flat, "defects": defects}),
        )
    return nights


BRIGHT = (14.6, 17.5)
"""Magnitudes of the bright stars the tests use: domain B saturates (120 ke-,
sharp PSF) brighter than ~14.5; fainter than 17.5 the photon noise exceeds
the mmag level the tests look for."""


def _make_survey(tmp_path_factory, *, seed: int, n_science: int):
    cfg = make_config("tiny", seed=seed, domain="B")
    # ZTF-like defect and cosmic-ray rates (tiny's are inflated to exercise the
    # flags), so that each quadrant keeps enough clean stars for a zero point;
    # every star bright: 45 per quadrant is near the density that gives the most
    # stars with no neighbour within 10 px.
    cfg = cfg.replace(
        camera=dataclasses.replace(
            cfg.camera, defect_fraction=2e-4, cosmics_per_mpix=20.0, bad_column_probability=0.0
        ),
        sky=dataclasses.replace(cfg.sky, stars_per_quadrant=45.0, mag_range=BRIGHT),
        schedule=dataclasses.replace(cfg.schedule, n_science=n_science),
    )
    sim = simulate_survey(tmp_path_factory.mktemp("phot"), cfg)
    store = str(sim.out / "store.zarr")
    write_truth_masters(str(sim.truth), store)
    return sim, store


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    return _make_survey(tmp_path_factory, seed=5, n_science=6)


def _run(
    sim, store, *, apply_pixel_area: bool, nights: int | None = None
) -> tuple[pd.DataFrame, list[xr.Dataset]]:
    """Photometer every science exposure (of the first ``nights``); catalog rows
    joined with the truth."""
    tr = str(sim.truth)
    ex = _truth(tr, "exposures")
    refcat = read_refcat(sim.refcat)
    rc = ReduceConfig(apply_pixel_area=apply_pixel_area)
    pc = PhotometryConfig()
    frames, exposures = [], []
    for night in sorted(set(ex.night.values))[:nights]:
        sel = (ex.imagetyp.values == "SCIENCE") & (ex.night.values == night)
        res = photometer_chunk(
            store, str(sim.raw), list(ex.path.values[sel]), str(sim.refcat), night,
            reduce_config=rc, photometry_config=pc,
        )  # fmt: skip
        cat, exps = night_groups(res, refcat, pc)
        df = cat.to_dataframe()
        df["night"] = night
        frames.append(df)
        exposures.append(exps)
    cat = pd.concat(frames, ignore_index=True)
    obs = _truth(tr, "observations").to_dataframe()
    merged = cat.merge(obs, on=["expid", "quadrant", "source_id"], suffixes=("", "_true"))
    merged["resid"] = merged.mag_inst + merged.zp + merged.dzp_starflat - merged.mag
    # Isolation judged from the truth (every star, catalogued or not), away from
    # the quadrant edges so that no neighbour is on another quadrant.
    iso = np.zeros(len(merged), bool)
    for (e, q), rows in merged.groupby(["expid", "quadrant"]):
        here = obs[(obs.expid == e) & (obs.quadrant == q)]
        for i, s in zip(rows.index, rows.itertuples(), strict=True):
            d = np.hypot(here.x - s.x_true, here.y - s.y_true)
            # Gaussian PSF of sigma < 1 px: nothing reaches a 5 px aperture from 10 px.
            crowded = np.any((d > 1e-6) & (d < 10.0) & (here.mag < s.mag + 7.5))
            inner = 10.0 < s.x_true < 117.0 and 10.0 < s.y_true < 117.0
            iso[i] = inner and not crowded
    merged["isolated"] = iso
    ap = {}
    for exps in exposures:
        for i, e in enumerate(exps.expid.values):
            for j, q in enumerate(exps.quadrant.values):
                a, err = float(exps.apcorr.values[i, j]), float(exps.apcorr_err.values[i, j])
                ap[(int(e), int(q))] = 2.5 / np.log(10) * err / a
    merged["apcorr_mag_err"] = [
        ap[(int(e), int(q))] for e, q in zip(merged.expid, merged.quadrant, strict=True)
    ]
    return merged, exposures


@pytest.fixture(scope="module")
def phot_on(survey):
    return _run(*survey, apply_pixel_area=True)


@pytest.fixture(scope="module")
def phot_off(survey):
    return _run(*survey, apply_pixel_area=False)


def _bright(df: pd.DataFrame) -> pd.DataFrame:
    b = df[(df["flags"] == 0) & df.isolated & (df.mag > BRIGHT[0]) & (df.mag < BRIGHT[1])]
    return b.assign(err=np.hypot(b.mag_inst_err, b.apcorr_mag_err))


# --- the "must show" ---------------------------------------------------------


def check_bright_stars_recover_truth(b: pd.DataFrame) -> None:
    """Bright isolated stars: m_inst + zp + starflat - m is zero within the
    median's standard error (1.2533 sigma / sqrt(n): ~0.6 mmag here), and the
    pulls have unit width. The width is two-sided: the chi-square band of n
    values widened by 0.1 each side, the precision the error model claims
    (apertures, centroids and the per-quadrant aperture correction are not in
    the per-star error exactly)."""
    assert len(b) >= 300, f"only {len(b)} bright isolated clean stars"
    sigma_median = 1.2533 * np.std(b.resid) / np.sqrt(len(b))
    assert_close_in_sigma(float(np.median(b.resid)), 0.0, sigma_median, label="median residual")
    assert_unit_pulls(b.resid / b.err, centred=False, width_slack=0.1, label="bright-star pulls")


def check_jacobian_signature(on: pd.DataFrame, off: pd.DataFrame) -> dict[str, float]:
    """Without the pixel area the residual grows as 2.5 log10(area) (the stars
    are measured on a surface-brightness image): slope 1; with it, slope 0.
    Each slope within z standard errors of the physics (weighted fit; its error
    is ~0.04 here, so the pixel area applied at 70 % strength, slope 0.3, is
    7 sigma off)."""
    slopes = {}
    for name, b, expected in (("on", on, 0.0), ("off", off, 1.0)):
        slope, err = weighted_slope(2.5 * np.log10(b.area), b.resid, b.err)
        assert err < 0.06, f"slope error {err:.3f}: too few stars to tell area**0.7"
        assert_close_in_sigma(slope, expected, err, label=f"slope with Jacobian {name}")
        slopes[name] = slope
    return slopes


def check_flat_across_focal_plane(b: pd.DataFrame) -> None:
    """Binned by pixel area (i.e. focal-plane radius), each third's weighted-mean
    residual agrees with the overall one within 1 mmag (the claim) and within
    z of its own error (~0.5 mmag here: small enough that 1 mmag means something)."""
    w = 1.0 / b.err**2
    overall = np.sum(w * b.resid) / np.sum(w)
    edges = np.quantile(b.area, [0, 1 / 3, 2 / 3, 1])
    for lo, hi in itertools.pairwise(edges):
        sel = (b.area >= lo) & (b.area <= hi)
        mean = np.sum(w[sel] * b.resid[sel]) / np.sum(w[sel])
        err = 1.0 / np.sqrt(np.sum(w[sel]))
        assert err < 0.0006, err
        assert abs(mean - overall) < 0.001, (lo, hi, mean - overall, err)
        assert_close_in_sigma(mean - overall, 0.0, err, label=f"area {lo:.4f}-{hi:.4f}")


def test_bright_isolated_stars_recover_truth_within_errors(phot_on):
    check_bright_stars_recover_truth(_bright(phot_on[0]))


def test_jacobian_off_shows_distortion_signature(phot_off, phot_on):
    check_jacobian_signature(_bright(phot_on[0]), _bright(phot_off[0]))


def test_flat_to_1_mmag_across_focal_plane_with_jacobian(phot_on):
    """The former slow long run (3x the exposures of a field drawn to r = 21.5),
    now on the bright-weighted field: ~700 bright isolated stars."""
    check_flat_across_focal_plane(_bright(phot_on[0]))


def test_classical_zero_points_match_truth_on_photometric_night(survey, phot_on):
    """zp_classic against the true zp plus the mean true starflat of the stars a
    classical zero point averages over (it cannot tell them apart)."""
    sim, _ = survey
    df, exposures = phot_on
    zp_true = _truth(str(sim.truth), "zp")
    clear = exposures[0]  # the first night is photometric
    pulls = []
    for i, e in enumerate(clear.expid.values):
        for j, q in enumerate(clear.quadrant.values):
            z, err = float(clear.zp_classic.values[i, j]), float(clear.zp_classic_err.values[i, j])
            if not np.isfinite(z):
                continue
            used = df[(df.expid == e) & (df.quadrant == q) & (df["flags"] == 0)]
            used = used[used.mag_inst_err < PhotometryConfig().zp_max_mag_err]
            truth = float(zp_true.zp.sel(expid=e, quadrant=q)) + float(np.mean(used.dzp_starflat))
            pulls.append((z - truth) / err)
    pulls = np.array(pulls)
    assert len(pulls) >= 40, len(pulls)
    # Two-sided: the rms in the chi-square band of n unit pulls.
    assert_rms_unit(pulls, label="classical zero-point pulls")
    # The colour term is recovered within its error: domain B's r term is +0.02.
    assert_close_in_sigma(
        float(clear.colour_term.values[0]), 0.02, float(clear.colour_term_err.values[0]),
        label="colour term",
    )  # fmt: skip


def _area_signature(b: pd.DataFrame, power: float) -> pd.DataFrame:
    """The catalog as if the pixel area had been applied as area**power: the
    flux scales by area**(power - 1), the residual by -2.5 (power - 1) log10(area)."""
    return b.assign(resid=b.resid - 2.5 * (power - 1.0) * np.log10(b.area))


OUTPUT_PERTURBATIONS = {
    "area**0.7": lambda b: _area_signature(b, 0.7),
    "area**1.3": lambda b: _area_signature(b, 1.3),
    "3 mmag offset": lambda b: b.assign(resid=b.resid + 0.003),
    "errors x2": lambda b: b.assign(err=2 * b.err),
    "errors x0.7": lambda b: b.assign(err=0.7 * b.err),
    "outer third 2 mmag bright": lambda b: b.assign(
        resid=b.resid + 0.002 * (b.area > b.area.quantile(2 / 3))
    ),
}


@pytest.mark.parametrize("perturbation", sorted(OUTPUT_PERTURBATIONS))
def test_photometry_checks_fail_on_perturbed_output(phot_on, phot_off, perturbation):
    """Each perturbation fails at least one of the three checks; the pairs
    that must fail are listed so that no check silently loses its teeth."""
    must_fail = {
        "area**0.7": ("jacobian", "flat"),
        "area**1.3": ("jacobian", "flat"),
        "3 mmag offset": ("truth",),
        "errors x2": ("truth",),
        "errors x0.7": ("truth",),
        "outer third 2 mmag bright": ("flat",),
    }[perturbation]
    on = OUTPUT_PERTURBATIONS[perturbation](_bright(phot_on[0]))
    off = _bright(phot_off[0])
    checks = {
        "truth": lambda: check_bright_stars_recover_truth(on),
        "jacobian": lambda: check_jacobian_signature(on, off),
        "flat": lambda: check_flat_across_focal_plane(on),
    }
    for name in must_fail:
        assert_fails(checks[name])


def test_pixel_area_at_70_percent_fails_the_jacobian_check(survey, phot_off, monkeypatch):
    """The code perturbed, not its output: every pixel-area map the reduction
    gets is area**0.7. The first night alone (~350 stars, slope error ~0.05)
    already puts the slope 0.3 - 6 sigma - away from 0."""
    original = PixelAreaCache.get
    monkeypatch.setattr(PixelAreaCache, "get", lambda self, *a, **k: original(self, *a, **k) ** 0.7)
    weak, _ = _run(*survey, apply_pixel_area=True, nights=1)
    off = _bright(phot_off[0])
    message = assert_fails(check_jacobian_signature, _bright(weak), off[off.night == weak.night[0]])
    assert "slope with Jacobian on" in message


# --- building blocks ----------------------------------------------------------------


@pytest.fixture(scope="module")
def reduced_frame(survey) -> tuple[ReducedQuadrant, object]:
    sim, _ = survey
    tr = str(sim.truth)
    ex = _truth(tr, "exposures")
    e = ex.isel(exposure=int(np.nonzero(ex.imagetyp.values == "SCIENCE")[0][0]))
    frame = read_quadrants(sim.raw / str(e.path.values), quadrants=[21])[0]
    reduced = reduce_quadrant(
        frame.data,
        frame.overscan,
        bias_adu=_truth(tr, f"maps/bias/{e.night.values}").bias.sel(quadrant=21).values,
        flat=_truth(tr, "maps/flat/r").flat.sel(quadrant=21).values,
        gain=frame.header.gain,
        read_noise_e=frame.header.rdnoise_e,
        saturate_adu=frame.header.saturate_adu,
        pixel_area=pixel_area_map(frame.wcs, frame.data.shape),
    )
    return reduced, frame


def test_aperture_sums_match_photutils_exact_overlap(reduced_frame):
    """Ours (sep's C loop) against photutils' exact-overlap apertures."""
    from photutils.aperture import CircularAperture

    reduced, _ = reduced_frame
    image = (reduced.surface_brightness * reduced.pixel_area).astype(np.float64)
    variance = (reduced.variance * reduced.pixel_area**2).astype(np.float64)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(10, 118, 300), rng.uniform(10, 118, 300)
    for radius in (2.3, 5.0, 8.7):
        ours, ours_var = aperture_sums(image, x, y, radius, variance=variance)
        aperture = CircularAperture(np.column_stack([x, y]), r=radius)
        theirs, theirs_err = aperture.do_photometry(image, error=np.sqrt(variance), method="exact")
        # Two implementations of the exact circle-pixel overlap: measured to agree
        # to 1.2e-8 relative (and 3e-13 on a ZTF quadrant, docs/photometry.md).
        np.testing.assert_allclose(ours, theirs, rtol=1e-7)
        np.testing.assert_allclose(np.sqrt(ours_var), theirs_err, rtol=1e-7)


def test_background_recovers_flat_sky_under_stars():
    rng = np.random.default_rng(3)
    ny, nx, sky = 256, 256, 500.0
    image = rng.normal(sky, np.sqrt(sky), (ny, nx))
    yy, xx = np.mgrid[:ny, :nx]
    for x0, y0 in rng.uniform(10, 246, (60, 2)):
        image += 2e4 / (2 * np.pi) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / 2.0)
    bkg = estimate_background(image.astype(np.float32), box_size=64)
    # 65k sky pixels: the level is known to ~0.1 e-; faint wings may add a little.
    assert abs(np.median(bkg.background) - sky) < 0.5
    assert np.median(bkg.rms) == pytest.approx(np.sqrt(sky), rel=0.05)


def test_centroids_and_fwhm_of_gaussian_stars():
    rng = np.random.default_rng(5)
    ny = nx = 200
    yy, xx = np.mgrid[:ny, :nx]
    grid = np.stack(np.meshgrid(np.arange(25, 180, 30), np.arange(25, 180, 30)), -1)
    true = grid.reshape(-1, 2) + rng.uniform(-0.5, 0.5, (grid.size // 2, 2))
    sigma = 1.3
    image = np.zeros((ny, nx))
    for x0, y0 in true:
        image += (
            1e5
            / (2 * np.pi * sigma**2)
            * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))
        )
    xc, yc = refine_centroids(image, np.rint(true[:, 0]), np.rint(true[:, 1]), fwhm_px=3.0)
    np.testing.assert_allclose(xc, true[:, 0], atol=0.02)
    np.testing.assert_allclose(yc, true[:, 1], atol=0.02)
    fwhm = measure_fwhm(image, true[:, 0], true[:, 1], guess_px=2.0)
    assert fwhm == pytest.approx(2.3548 * sigma, rel=0.03)


def _synthetic_reduced(stars, *, shape=(96, 96), sky=200.0, saturate=30000.0, seed=7):
    """A raw frame with Gaussian stars (x, y, flux_e), gain 2, reduced with unit
    bias/flat/area; raw pixels are clipped at ``saturate`` ADU like a camera."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    electrons = np.full(shape, sky)
    for x0, y0, f in stars:
        electrons += f / (2 * np.pi) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / 2.0)
    raw = np.minimum(rng.poisson(electrons) / 2.0 + 100.0, saturate).astype(np.float32)
    return reduce_quadrant(
        raw,
        np.full((ny, 4), 100.0, np.float32),
        bias_adu=np.zeros(shape, np.float32),
        flat=np.ones(shape, np.float32),
        gain=2.0,
        read_noise_e=5.0,
        saturate_adu=saturate,
        pixel_area=np.ones(shape),
    )


def test_flags_saturated_edge_and_crowded():
    stars = [
        (30.0, 30.0, 1e6),  # saturated core
        (60.0, 30.0, 2e4),  # clean
        (1.0, 60.0, 2e4),  # on the edge
        (60.0, 70.0, 2e4),  # a twin 3 px away: crowded
        (63.0, 70.0, 2e4),
    ]
    reduced = _synthetic_reduced(stars)
    x, y = np.array([s[0] for s in stars]), np.array([s[1] for s in stars])
    ph = photometer_quadrant(reduced, x, y, np.array([10.0, 15.0, 15.0, 15.0, 15.0]))
    flags = dict(zip(ph.index.tolist(), ph.flags.tolist(), strict=True))
    assert flags[0] & FLAG_SATURATED
    assert flags[1] == 0
    assert flags[2] & FLAG_EDGE
    assert flags[3] & FLAG_BITS["crowded"]
    assert flags[4] & FLAG_BITS["crowded"]
    # The clean star's flux is right (Gaussian FWHM 2.35 px: 3 FWHM holds it all).
    k = int(np.nonzero(ph.index == 1)[0][0])
    assert ph.flux_e[k] == pytest.approx(2e4, abs=4 * ph.flux_err_e[k])


def test_flag_bits_are_distinct_powers_of_two():
    bits = list(FLAG_BITS.values())
    assert len(set(bits)) == len(bits)
    assert all(b > 0 and b & (b - 1) == 0 for b in bits)


def test_instrumental_magnitudes_convention():
    mag, err = instrumental_magnitudes(
        np.array([30.0, 3000.0, -5.0]), np.array([3.0, 30.0, 1.0]), 30.0
    )
    np.testing.assert_allclose(mag[:2], [0.0, -5.0])
    np.testing.assert_allclose(err[:2], [0.10857, 0.010857], rtol=1e-4)
    assert np.isnan(mag[2])
    assert np.isnan(err[2])
    with pytest.raises(ValueError, match="exptime_s"):
        instrumental_magnitudes(np.ones(1), np.ones(1), 0.0)


def test_photometer_quadrant_rejects_bad_inputs(reduced_frame):
    reduced, _ = reduced_frame
    with pytest.raises(ValueError, match="x, y and ref_mag"):
        photometer_quadrant(reduced, np.zeros(3), np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="aperture_radius_fwhm"):
        photometer_quadrant(
            reduced, np.zeros(1), np.zeros(1), np.zeros(1), aperture_radius_fwhm=6.0
        )


def test_background_interpolation_equals_photutils_zoom():
    """The separable mesh interpolation gives Background2D's own image (float32
    bits), on a mesh that does not divide the image (extra row of meshes)."""
    from photutils.background import Background2D

    from calib.photometry.background import _zoom

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:200, 0:160]
    sky = (100.0 + 0.05 * xx + 0.02 * yy + 3 * np.sin(yy / 30.0)).astype(np.float32)
    image = sky + rng.normal(0.0, 2.0, sky.shape).astype(np.float32)
    bkg = Background2D(image, (32, 32), filter_size=(3, 3))
    np.testing.assert_array_equal(_zoom(bkg.background_mesh, (32, 32), image.shape), bkg.background)
