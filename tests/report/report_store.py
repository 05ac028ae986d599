"""A store with every kind of group the QA report reads, built from the tiny
survey by the stages themselves (index, masters, photometry, ubercal), plus
groups written through the stages' own writers where running the stage would
cost minutes (network scores, transients, light curves: the real light-curve
stage's groups are reported in tests/integration/test_lightcurves_flow.py)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from calib.ubercal import UbercalOptions
from tasks.index import index_sequentially
from tasks.io import groups
from tasks.io.store import read_group, write_group
from tasks.masters import build_masters_sequentially
from tasks.reduce import reduce_night
from tasks.transients import TransientsConfig, write_transients
from tasks.ubercal import UbercalStageConfig, bands_observed_task, run_ubercal_stage

LIGHTCURVE = "sn-tiny"


def build_report_store(store: str, survey) -> str:
    """Every group the report reads, for the tiny ``survey`` (see the module docstring)."""
    refcat = str(survey.refcat)
    index_sequentially(str(survey.raw), store)
    build_masters_sequentially(store)
    for night in survey.nights:
        reduce_night(store, night, refcat)
    # Per-exposure zero points: the tiny survey's quadrants share too few stars
    # for one zero point per exposure and quadrant.
    options = UbercalOptions(zp_mode="exposure", cells=(2, 2))
    for band in bands_observed_task.fn(store, None):
        run_ubercal_stage(store, refcat, UbercalStageConfig(band=band, options=options))
    rng = np.random.default_rng(17)
    for night in survey.nights:
        _write_scores(store, night, rng)
    _write_transients(store, survey.nights[0], rng)
    _write_lightcurve(store, survey.nights, rng)
    return store


def _write_scores(store: str, night: str, rng: np.random.Generator) -> None:
    """``ml/scores/<night>`` as tasks.zp.score_zp writes it: the ubercal zero
    point (mean over quadrants) plus 10 mmag of scatter, errors 10 mmag."""
    exp = read_group(store, groups.exposures(night))
    zp = np.full(exp.sizes["exposure"], 24.6)
    for band in np.unique(exp.band.values):
        sol = read_group(store, groups.ubercal(str(band)))
        rows = np.flatnonzero(exp.band.values == band)
        zp[rows] = np.nanmean(sol.zp.sel(expid=exp.expid.values[rows]).values, axis=1)
    n = len(zp)
    scores = xr.Dataset(
        {
            "expid": ("exposure", exp.expid.values),
            "band": ("exposure", exp.band.values.astype(object)),
            "zp_offset": ("exposure", zp - 24.6 + rng.normal(0, 0.01, n)),
            "zp_offset_err": ("exposure", np.full(n, 0.01)),
            "catalog_zp_offset": ("exposure", np.full(n, np.nan)),
        }
    )
    scores["zp"] = 24.6 + scores.zp_offset
    write_group(
        store,
        groups.scores(night),
        scores,
        attrs={
            "stage": "score-zp",
            "night": night,
            "checkpoint": "test",
            "model_card": {"metrics_test_mag": {"azprc": {"rmse": 0.0128}}},
        },
    )


def _write_transients(store: str, night: str, rng: np.random.Generator) -> None:
    """Two pairs' detections in tasks.transients.score_pair's form."""
    parts = []
    for index in range(2):
        rows = {}
        for method, n in (("heatmap", 3), ("classical", 4)):
            rows[method] = {
                "pair": np.full(n, index),
                "method": np.full(n, method),
                "x": rng.uniform(0, 511, n),
                "y": rng.uniform(0, 511, n),
                "score": rng.uniform(0.9, 1.0, n) if method == "heatmap" else rng.uniform(5, 50, n),
                "delta_mag": rng.uniform(-2, 0, n),
                "delta_mag_err": np.full(n, 0.05),
                "mag_change": rng.uniform(-2, 0, n),
            }
        parts.append(
            {
                "index": index,
                "seed": 100 + index,
                "n_injected": 4,
                "counts": {"heatmap": (3, 0), "classical": (3, 1)},
                "rows": {k: np.concatenate([r[k] for r in rows.values()]) for k in rows["heatmap"]},
            }
        )
    write_transients(store, night, parts, TransientsConfig(pairs_per_night=2))


def _write_lightcurve(store: str, nights: list[str], rng: np.random.Generator) -> None:
    """One object observed in every science exposure of both nights, and its
    forced photometry on difference images (3 % scatter about the same fluxes)."""
    exp = xr.concat([read_group(store, groups.exposures(n)) for n in nights], dim="exposure")
    n = exp.sizes["exposure"]
    mag = 19.0 + 0.5 * np.sin(np.arange(n)) + rng.normal(0, 0.02, n)
    flux = 3631e9 * 10 ** (-0.4 * mag)
    ds = xr.Dataset(
        {
            "expid": ("epoch", exp.expid.values),
            "mjd": ("epoch", exp.mjd.values),
            "band": ("epoch", exp.band.values.astype(object)),
            "flux_njy": ("epoch", flux),
            "flux_njy_err": ("epoch", flux * 0.02),
            "mag": ("epoch", mag),
            "mag_err": ("epoch", np.full(n, 0.02)),
            "flags": ("epoch", np.zeros(n, dtype=np.int64)),
        }
    )
    write_group(store, groups.lightcurve(LIGHTCURVE), ds, attrs={"stage": "lightcurves"})
    forced = ds.copy()
    forced["flux_njy"] = ds.flux_njy * (1 + rng.normal(0, 0.03, n))
    forced["flux_njy_err"] = ds.flux_njy * 0.03
    write_group(store, groups.lightcurve_forced(LIGHTCURVE), forced, attrs={"stage": "lightcurves"})
