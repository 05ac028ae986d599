"""Ubercal on catalog-level simulations with injected truth (sim.catalogsim):
recovery against tolerances set by the noise, outlier rejection, graph checks,
gauge invariance."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calib.ubercal import (
    DisconnectedGraphError,
    InMemoryObservations,
    ObservationChunk,
    UbercalOptions,
    accumulate_normal_equations,
    build_layout,
    solve_ubercal,
)
from calib.ubercal.normal import _pair_sums
from sim.catalogsim import CatalogSurvey, CatalogSurveyConfig, simulate_catalog_survey

# 3x2 fields, 6 visits over 3 nights (the second cloudy), 16 quadrants of full ZTF
# size, the ztf preset's density down to r = 19.5: ~1 M observations.
SURVEY = CatalogSurveyConfig(seed=1, stars_per_quadrant=10_000.0, mag_range=(13.0, 19.5))


def solve(s: CatalogSurvey, obs: dict | None = None, **options):
    chunk = ObservationChunk.from_mapping(obs if obs is not None else s.observations)
    return solve_ubercal(
        chunk,
        quad_nx=s.config.quad_nx,
        quad_ny=s.config.quad_ny,
        reference=s.reference_stars(),
        options=UbercalOptions(**options),
    )


def true_zp(s: CatalogSurvey, sol) -> np.ndarray:
    """Truth in the solution's gauge: with per exposure-quadrant zero points the
    quadrant mean of the starflat lives in the zero point."""
    rows = np.searchsorted(s.exposures["expid"], sol.expids)
    zp = s.zp_true[rows][:, sol.quadrants]
    if sol.starflat is not None and sol.starflat.gauge == "quadrant":
        zp = zp + s.starflat_true[sol.quadrants].mean(axis=(1, 2))[None]
    return zp


@pytest.fixture(scope="module")
def survey() -> CatalogSurvey:
    return simulate_catalog_survey(SURVEY)


@pytest.fixture(scope="module")
def solution(survey):
    return solve(survey)


def test_zero_point_pulls(survey, solution):
    d = solution.zp_mag - true_zp(survey, solution)
    d -= np.nanmean(d)  # the gauge offset
    pull = d / solution.zp_err_mag
    assert 0.8 <= np.sqrt(np.nanmean(pull**2)) <= 1.2
    assert solution.stats.converged
    assert 0.9 < solution.stats.chi2_per_dof < 1.15


def test_starflat_recovered_within_1_mmag(survey, solution):
    sf = solution.starflat
    truth = survey.starflat_true[sf.quadrants]
    truth = truth - truth.mean(axis=(1, 2), keepdims=True)  # the per-quadrant gauge
    diff = sf.dzp_mag - truth
    assert np.sqrt(np.mean(diff**2)) < 1e-3
    pull = diff / sf.dzp_err_mag
    assert 0.8 <= np.sqrt(np.mean(pull**2)) <= 1.2


def test_clouds_do_not_bias(survey, solution):
    d = solution.zp_mag - true_zp(survey, solution)
    d -= np.nanmean(d)
    rows = np.searchsorted(survey.exposures["expid"], solution.expids)
    cloudy = survey.exposures["cloud_mag"][rows] > 0
    assert cloudy.sum() >= 6
    assert (~cloudy).sum() >= 6
    pull = d / solution.zp_err_mag
    for sel in (cloudy, ~cloudy):
        # Mean pull of each group: zero within 3 sigma of its own scatter.
        p = pull[sel].ravel()
        assert abs(p.mean()) < 3 * p.std() / np.sqrt(sel.sum())
        assert np.sqrt(np.mean(p**2)) < 1.25


def test_bright_star_magnitudes_at_the_noise(survey, solution):
    rows = np.searchsorted(survey.stars["source_id"], solution.source_ids)
    truth = survey.stars["mag"][rows]
    constant = survey.stars["var_amp_mag"][rows] == 0
    bright = constant & (truth < 16.0) & (solution.star_n_obs >= 3)
    d = solution.star_mag[bright] - truth[bright]
    d -= np.median(d)
    noise = np.sqrt(np.mean(solution.star_mag_err[bright] ** 2))
    assert np.sqrt(np.mean(d**2)) < 1.2 * noise


def test_variable_stars_and_cosmic_rays_rejected(survey, solution):
    o, t = survey.observations, survey.truth
    chunk = ObservationChunk.from_mapping(o)
    star_row = np.searchsorted(solution.source_ids, o["source_id"])
    sigma = np.hypot(o["mag_inst_err"], solution.options.error_floor_mag)
    # Variables whose sampled variability (the spread of their true magnitude over
    # the visits) is 5x their typical error, seen >= 5 times: a long period seen
    # over three nights can look constant and is then harmless.
    srow = np.searchsorted(survey.stars["source_id"], solution.source_ids)
    amp = survey.stars["var_amp_mag"][srow]
    n_seen = np.bincount(star_row, minlength=len(amp))
    seen = np.maximum(n_seen, 1)
    typical = np.bincount(star_row, sigma, len(amp)) / seen
    m1 = np.bincount(star_row, t["mag_true"], len(amp)) / seen
    spread = np.sqrt(
        np.maximum(np.bincount(star_row, t["mag_true"] ** 2, len(amp)) / seen - m1**2, 0)
    )
    strong = (amp > 0) & (spread > 5 * typical) & (n_seen >= 5)
    assert strong.sum() > 50
    assert solution.star_rejected[strong].mean() > 0.95
    # Cosmic-ray hits 10 sigma off: clipped, or their star rejected.
    model = t["mag_true"] - t["zp_true"] - t["dzp_true"]
    hit = survey.truth["is_cosmic"] & (np.abs(o["mag_inst"] - model) > 10 * sigma)
    assert hit.sum() > 100
    resid = solution.calibrate(chunk) - solution.star_mag[star_row]
    out = solution.star_rejected[star_row] | ~(np.abs(resid / sigma) <= solution.options.clip_sigma)
    assert out[hit].mean() > 0.99
    # ... while few constant stars are lost.
    constant = amp == 0
    assert solution.star_rejected[constant].mean() < 0.005


def test_disconnected_graph_is_reported(survey):
    ex = survey.exposures
    fields = ex["field"]
    far = ex["expid"][(fields == 0) | (fields == 5)]  # opposite corners of the 3x2 tiling
    keep = np.isin(survey.observations["expid"], far)
    obs = {k: v[keep] for k, v in survey.observations.items()}
    with pytest.raises(DisconnectedGraphError, match="2 disconnected components") as err:
        solve(survey, obs)
    comps = err.value.components
    assert len(comps) == 2
    found = [set(np.unique(e)) for e, _ in comps]
    assert set(far) == found[0] | found[1]
    assert all(len(set(fields[np.isin(ex["expid"], list(c))])) == 1 for c in found)


@pytest.fixture(scope="module")
def small_survey() -> CatalogSurvey:
    return simulate_catalog_survey(
        CatalogSurveyConfig(
            seed=5,
            n_fields_x=2,
            n_fields_y=1,
            visits_per_field=6,
            n_nights=2,
            stars_per_quadrant=1500.0,
            mag_range=(13.0, 19.0),
            dither_fraction=0.15,
        )
    )


# Coarse cells keep the small survey's reduced system small: these properties do
# not depend on the cell count.
COARSE = {"cells": (4, 4)}


@pytest.fixture(scope="module")
def small_solution(small_survey):
    return solve(small_survey, **COARSE)


@settings(max_examples=4, deadline=None)
@given(
    offset=st.floats(-1.0, 1.0),
    per_quadrant=st.lists(st.floats(-0.2, 0.2), min_size=16, max_size=16),
    seed=st.integers(0, 2**31),
)
def test_gauge_invariance(small_survey, small_solution, offset, per_quadrant, seed):
    """Shifting every instrumental magnitude of an exposure-quadrant (a zero-point
    change) moves only that zero point: star magnitudes and starflat stay."""
    s = small_survey
    base = small_solution
    o = dict(s.observations)
    qshift = dict(zip(s.quadrants.tolist(), per_quadrant, strict=True))
    eshift = np.random.default_rng(seed).normal(0, 0.1, len(s.exposures["expid"]))
    erow = np.searchsorted(s.exposures["expid"], o["expid"])
    shift = offset + np.array([qshift[q] for q in o["quadrant"]]) + eshift[erow]
    o["mag_inst"] = o["mag_inst"] + shift
    moved = solve(s, o, **COARSE)
    expected = base.zp_mag - offset - np.array(per_quadrant)[None, :] - eshift[:, None]
    np.testing.assert_allclose(moved.zp_mag, expected, atol=1e-7)
    np.testing.assert_allclose(moved.star_mag, base.star_mag, atol=1e-7)
    np.testing.assert_allclose(moved.starflat.dzp_mag, base.starflat.dzp_mag, atol=1e-7)


def test_noiseless_data_recovered_exactly(small_survey):
    """No noise, no clouds within a quadrant, a cell-constant starflat: the fit is exact."""
    s = simulate_catalog_survey(
        small_survey.config.replace(
            cloud_gradient_rms_mag=0.0, variable_fraction=0.0, cosmic_fraction=0.0
        )
    )
    o = dict(s.observations)
    ncy, ncx = s.starflat_true.shape[1:]
    cy = np.clip(np.floor((o["y"] + 0.5) * ncy / s.config.quad_ny).astype(int), 0, ncy - 1)
    cx = np.clip(np.floor((o["x"] + 0.5) * ncx / s.config.quad_nx).astype(int), 0, ncx - 1)
    erow = np.searchsorted(s.exposures["expid"], o["expid"])
    o["mag_inst"] = (
        s.truth["mag_true"]
        - s.zp_true[erow, o["quadrant"]]
        - s.starflat_true[o["quadrant"], cy, cx]
    )
    # A pure relative fit: the reference prior would (rightly) move the weakly
    # constrained large-scale modes by its own noise; the truth's grid and no
    # prior on the cells (it would shrink them by ~1e-7 mag).
    sol = solve(
        s,
        o,
        anchor="offset",
        exposure_gradient=False,
        cells=(ncy, ncx),
        zp_mode="exposure_quadrant",
        starflat_prior_mag=None,
    )
    d = sol.zp_mag - true_zp(s, sol)
    np.testing.assert_allclose(d - d.mean(), 0.0, atol=1e-6)
    truth = s.starflat_true[sol.quadrants]
    truth = truth - truth.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(sol.starflat.dzp_mag, truth, atol=1e-6)
    assert sol.stats.n_rejected == 0


def test_sparse_and_dense_solvers_agree(small_survey):
    dense = solve(small_survey, solver="dense", **COARSE)
    sparse = solve(small_survey, solver="sparse", **COARSE)
    assert dense.stats.solver == "dense-cholesky"
    assert sparse.stats.solver == "sparse-lu"
    np.testing.assert_allclose(sparse.zp_mag, dense.zp_mag, atol=1e-8)
    # Sparse errors come from 64 random draws: 10-20 % per parameter.
    ratio = sparse.zp_err_mag / dense.zp_err_mag
    assert 0.9 < np.median(ratio) < 1.1


def test_per_exposure_zero_points_and_colour_term(small_survey):
    sol = solve(small_survey, zp_mode="exposure", colour_term=True, **COARSE)
    assert sol.starflat.gauge == "focal_plane"
    # One zero point per exposure, repeated over quadrants.
    np.testing.assert_array_equal(sol.zp_mag, sol.zp_mag[:, :1].repeat(sol.zp_mag.shape[1], axis=1))
    # The simulation has no per-quadrant colour term: all consistent with zero.
    assert np.all(np.abs(sol.colour_term) < 5 * sol.colour_term_err)
    assert abs(np.mean(sol.colour_term)) < 1e-12


def test_error_floor_enters_in_quadrature(small_survey):
    # Without the reference prior, which adds its own information on each star.
    opts = {"anchor": "offset", "exposure_gradient": False, **COARSE}
    a = solve(small_survey, error_floor_mag=0.002, **opts)
    b = solve(small_survey, error_floor_mag=0.02, **opts)
    bright = np.isfinite(a.star_mag_err) & np.isfinite(b.star_mag_err) & (a.star_mag < 15)
    n = b.star_n_obs[bright]
    assert np.all(b.star_mag_err[bright] >= 0.02 / np.sqrt(n) * 0.99)
    assert np.median(b.star_mag_err[bright]) > 3 * np.median(a.star_mag_err[bright])


def test_inputs_checked():
    with pytest.raises(ValueError, match="zp_mode"):
        UbercalOptions(zp_mode="night")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cells"):
        UbercalOptions(cells=(0, 10))
    with pytest.raises(ValueError, match="mag_inst_err must be one-dimensional"):
        ObservationChunk(
            expid=np.zeros(3, int),
            quadrant=np.zeros(3, int),
            source_id=np.zeros(3, int),
            x=np.zeros(3),
            y=np.zeros(3),
            mag_inst=np.zeros(3),
            mag_inst_err=np.zeros(2),
        )
    with pytest.raises(TypeError, match="observations must be"):
        solve_ubercal([1, 2], quad_nx=10, quad_ny=10)  # type: ignore[arg-type]


def test_normal_equations_match_the_dense_design(small_survey):
    """The chunked, bincount-built equations equal J^T W J of an explicit design
    matrix, for an arbitrary subset of observations given in the chunk's order."""
    s = small_survey
    chunk = ObservationChunk.from_mapping(s.observations)
    opts = UbercalOptions(colour_term=True, cells=(3, 3))
    layout = build_layout(
        InMemoryObservations([chunk]),
        quad_nx=s.config.quad_nx,
        quad_ny=s.config.quad_ny,
        reference=s.reference_stars(),
        options=opts,
    )
    use = np.random.default_rng(3).random(len(chunk)) < 0.3
    ne = accumulate_normal_equations(chunk, layout, use=use)

    ix = layout.index(chunk)
    k = np.flatnonzero(use & ix.valid & (s.observations["flags"] == 0))
    n, npp = len(k), layout.n_param
    J = np.zeros((n, npp))
    rows = np.arange(n)
    g = layout.gradient_start + 2 * ix.exp[k]
    for col, coef in (
        (ix.zp[k], 1.0),
        (layout.n_zp + ix.cell[k], 1.0),
        (layout.colour_slice.start + ix.iq[k], layout.colour[ix.star[k]]),
        (g, ix.fx[k]),
        (g + 1, ix.fy[k]),
    ):
        np.add.at(J, (rows, col), -coef)
    err = s.observations["mag_inst_err"][k]
    w = 1.0 / (err**2 + opts.error_floor_mag**2)
    scale = np.abs(J.T @ (J * w[:, None])).max()
    np.testing.assert_allclose(ne.app.toarray(), J.T @ (J * w[:, None]), atol=1e-12 * scale)
    Js = np.zeros((n, layout.n_star))
    Js[rows, ix.star[k]] = 1.0
    np.testing.assert_allclose(ne.aps.toarray(), J.T @ (Js * w[:, None]), atol=1e-12 * scale)
    np.testing.assert_allclose(ne.star_w, Js.T @ w)


@settings(max_examples=25, deadline=None)
@given(
    na=st.integers(1, 3000),
    nb=st.integers(1, 3000),
    n=st.integers(0, 200),
    seed=st.integers(0, 2**16),
)
def test_pair_sums_bincount_and_sort_paths(na, nb, n, seed):
    """Sums per (a, b) pair, whichever path the key space picks (a dense bincount
    up to 4 M keys, a sort above), equal a plain dictionary sum."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, na, n), rng.integers(0, nb, n)
    v = rng.random(n) + 0.1
    expect: dict[tuple[int, int], float] = {}
    for i, j, x in zip(a.tolist(), b.tolist(), v.tolist(), strict=True):
        expect[i, j] = expect.get((i, j), 0.0) + x
    for scale in (1, 1 << 23):  # 2^23 x the key space is always past the bincount limit
        ra, rb, rv = _pair_sums(a * scale, na * scale, b, nb, v)
        got = {
            (i // scale, j): x
            for i, j, x in zip(ra.tolist(), rb.tolist(), rv.tolist(), strict=True)
        }
        assert got.keys() == expect.keys()
        np.testing.assert_allclose([got[key] for key in expect], list(expect.values()))


@pytest.mark.parametrize("preconditioner", ["block_jacobi", "two_level", "two_level_exposures"])
def test_iterative_and_direct_solutions_agree(small_survey, small_solution, preconditioner):
    """The matrix-free PCG path (four star-complete partitions) against the dense
    Cholesky of the formed Schur complement, outlier passes included: PCG stops
    at a relative residual of 1e-9, so the solutions agree far below their
    errors; the selection of observations is the same, whatever the
    preconditioner (it changes the path to the solution, not the solution)."""
    it = solve(
        small_survey,
        solver="iterative",
        partition_obs=10_000,
        preconditioner=preconditioner,
        **COARSE,
    )
    assert it.stats.solver == f"pcg-{preconditioner}"
    assert len(it.stats.cg_iterations_per_solve) >= 2  # the passes, then the errors
    assert sum(it.stats.cg_iterations_per_solve) == it.stats.cg_iterations
    assert small_solution.stats.solver == "dense-cholesky"
    assert it.stats.n_used == small_solution.stats.n_used
    assert it.stats.n_rejected_stars == small_solution.stats.n_rejected_stars
    np.testing.assert_allclose(it.zp_mag, small_solution.zp_mag, atol=1e-6)
    np.testing.assert_allclose(it.star_mag, small_solution.star_mag, atol=1e-6)
    np.testing.assert_allclose(it.starflat.dzp_mag, small_solution.starflat.dzp_mag, atol=1e-6)


def test_iterative_error_estimate_within_10_percent(small_survey, small_solution):
    """The stochastic errors (solutions for simulated noise through the same
    solver) against the exact covariance diagonal of the dense path. With k
    samples a variance is estimated to sqrt(2/k) and an error to 1/sqrt(2k):
    k = 200 gives 5 % per parameter, so the rms relative deviation over the
    zero points and cells stays below 10 % and their median within 3 %."""
    it = solve(small_survey, solver="iterative", error_samples=200, **COARSE)
    for est, exact in (
        (it.zp_err_mag, small_solution.zp_err_mag),
        (it.starflat.dzp_err_mag, small_solution.starflat.dzp_err_mag),
    ):
        ratio = (est / exact).ravel()
        assert abs(np.median(ratio) - 1) < 0.03
        assert np.sqrt(np.mean((ratio - 1) ** 2)) < 0.10


def test_one_field_one_quadrant_few_dithers_flags_cells_at_their_prior():
    """A survey the default 10x10 grid cannot carry (one quadrant, one field,
    four small dithers): with the cell prior the fit finishes instead of
    raising a singular matrix; cells without data sit at the prior's 0 with its
    error, and are flagged; cells the stars cover are not all flagged."""
    s = simulate_catalog_survey(
        CatalogSurveyConfig(
            seed=3,
            ccd_cols=(1,),
            ccd_rows=(1,),
            quad_nx=512,
            quad_ny=512,
            n_fields_x=1,
            n_fields_y=1,
            visits_per_field=4,
            n_nights=1,
            dither_fraction=0.02,
            stars_per_quadrant=60.0,
            mag_range=(13.0, 18.0),
        )
    )
    keep = s.observations["quadrant"] == s.quadrants[0]
    obs = {k: v[keep] for k, v in s.observations.items()}
    prior = 0.05
    sol = solve(s, obs, cells=(10, 10), zp_mode="exposure_quadrant", starflat_prior_mag=prior)
    sf = sol.starflat
    flagged = sf.prior_dominated[0]
    cy = np.clip(((obs["y"] + 0.5) * 10 // 512).astype(int), 0, 9)
    cx = np.clip(((obs["x"] + 0.5) * 10 // 512).astype(int), 0, 9)
    seen = np.zeros((10, 10), dtype=bool)
    seen[cy, cx] = True
    assert (~seen).sum() > 10
    assert flagged[~seen].all()
    # At the prior: zero up to the gauge's mean shift, with the prior's error.
    np.testing.assert_allclose(sf.dzp_err_mag[0][~seen], prior, rtol=0.05)
    assert np.all(np.abs(sf.dzp_mag[0][~seen]) < 0.2 * prior)
    assert not flagged[seen].all()
    assert np.isfinite(sol.zp_mag).all()
