"""Simulate a survey to disk: raw FITS, reference catalog, truth store."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from astropy.table import Table

from sim.badfiles import write_bad_files
from sim.catalogsim import TRUTH_COLUMNS, CatalogSurvey, CatalogSurveyPlan
from sim.config import SurveyConfig, make_config
from sim.survey import Survey, write_raw
from tasks.io import groups
from tasks.io.provenance import provenance
from tasks.io.store import write_group
from tasks.io.truth import write_truth


@dataclass(frozen=True)
class SimulationResult:
    out: Path
    raw: Path
    refcat: Path
    truth: Path
    n_files: int
    targets: Path | None
    """``targets.ecsv`` (name, ra, dec, no_flux_before) when the survey has transients."""
    n_refcat: int
    nights: tuple[str, ...]
    bad_files: dict[str, Path]
    wall_s: float


def simulate_survey(
    out: str | os.PathLike,
    config: SurveyConfig | None = None,
    *,
    preset: str = "tiny",
    nights: int | None = None,
    seed: int = 0,
    domain: str = "A",
    transients: int | None = None,
    jobs: int = 1,
    bad_files: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SimulationResult:
    """Write ``out/raw/...`` (FITS), ``out/refcat.fits`` and ``out/truth.zarr``.

    Parameters
    ----------
    out : path
        Output directory (created).
    config : SurveyConfig, optional
        The survey; when given, ``preset``, ``nights``, ``seed`` and ``domain``
        must be left at their defaults.
    preset, nights, seed, domain, transients
        Build the survey from a preset instead (:func:`sim.config.make_config`).
    jobs : int
        Processes rendering exposures in parallel; the bytes do not depend on it.
    bad_files : bool
        Also write one damaged file of each kind under ``raw/damaged/``.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    t0 = time.perf_counter()
    if config is None:
        config = make_config(preset, seed=seed, nights=nights, domain=domain, transients=transients)
    elif (preset, nights, seed, domain, transients) != ("tiny", None, 0, "A", None):
        raise ValueError("give either config or preset/nights/seed/domain/transients, not both")
    survey = Survey(config)
    out = Path(out)
    raw = out / "raw"
    cosmics = write_raw(survey, raw, jobs=jobs, progress=progress)
    refcat = out / "refcat.fits"
    n_ref = survey.write_refcat(refcat)
    paths = {e.expid: str(survey.raw_relpath(e)) for e in survey.exposures}
    truth = out / "truth.zarr"
    write_truth(truth, survey, cosmics, raw_paths=paths)
    targets = None
    if survey.scene is not None:
        targets = out / "targets.ecsv"
        write_targets(targets, survey)
    damaged: dict[str, Path] = {}
    if bad_files:
        first = {
            t: next(e for e in survey.exposures if e.imagetyp == t) for t in ("SCIENCE", "BIAS")
        }
        damaged = write_bad_files(
            raw, raw / paths[first["SCIENCE"].expid], raw / paths[first["BIAS"].expid]
        )
    return SimulationResult(
        out=out,
        raw=raw,
        refcat=refcat,
        truth=truth,
        n_files=len(survey.exposures),
        targets=targets,
        n_refcat=n_ref,
        nights=tuple(sorted({e.night for e in survey.exposures})),
        bad_files=damaged,
        wall_s=time.perf_counter() - t0,
    )


def write_targets(path: str | os.PathLike, survey: Survey) -> int:
    """The transients as a lightcurves stage's targets table (ECSV): name, ra,
    dec [deg] and ``no_flux_before`` [MJD], what a discovery report would give
    (the explosion minus a margin, SceneConfig.baseline_margin_fraction)."""
    sc = survey.scene
    if sc is None:
        raise ValueError("the survey has no transients (SurveyConfig.scene is None)")
    table = Table(
        {
            "name": np.asarray(sc.name, dtype=str),
            "ra": sc.ra_deg,
            "dec": sc.dec_deg,
            "no_flux_before": sc.no_flux_before_mjd,
        }
    )
    table["ra"].unit = table["dec"].unit = "deg"
    table["no_flux_before"].description = "MJD: epochs before it hold no transient light"
    table.write(path, format="ascii.ecsv", overwrite=True)
    return len(table)


# -- catalog-level surveys (sim/catalogsim.py) written as the photometry stage would --


def write_catalog_survey(
    store: str | os.PathLike, survey: CatalogSurvey | CatalogSurveyPlan
) -> None:
    """One nights/<night>/catalog and exposures group per night (docs/store.md).
    A :class:`~sim.catalogsim.CatalogSurveyPlan` is drawn night by night, so a
    survey of any size is written without holding more than one night."""
    ex = survey.exposures
    if isinstance(survey, CatalogSurveyPlan):
        nights = {n: np.flatnonzero(ex["night"] == n) for n in np.unique(ex["night"])}
        for night, rows in nights.items():
            cats = [survey.exposure_catalog(int(e)) for e in rows]
            obs = {
                k: np.concatenate([c[k] for c in cats]) for k in cats[0] if k not in TRUTH_COLUMNS
            }
            _write_night(store, survey, night, obs)
        return
    for night, rows in survey.night_slices().items():
        _write_night(store, survey, night, {k: v[rows] for k, v in survey.observations.items()})


def _write_night(
    store: str | os.PathLike,
    survey: CatalogSurvey | CatalogSurveyPlan,
    night: str,
    obs: dict[str, np.ndarray],
) -> None:
    attrs = provenance(
        "simulate-catalog",
        config=dataclasses.asdict(survey.config),
        night=night,
        quad_nx=survey.config.quad_nx,
        quad_ny=survey.config.quad_ny,
    )
    cat = xr.Dataset({k: ("obs", v) for k, v in obs.items()})
    write_group(store, groups.catalog(night), cat, attrs=attrs)
    ex = survey.exposures
    sel = ex["night"] == night
    exps = xr.Dataset(
        {k: ("exposure", ex[k][sel]) for k in ("expid", "mjd", "band", "airmass", "exptime_s")}
    )
    write_group(store, groups.exposures(night), exps, attrs=attrs)


def write_catalog_refcat(
    path: str | os.PathLike, survey: CatalogSurvey | CatalogSurveyPlan
) -> None:
    """The survey's reference catalog (its band only; the others are NaN)."""
    st = survey.stars
    sel = st["in_refcat"]
    cols = {"source_id": st["source_id"][sel], "ra": st["ra"][sel], "dec": st["dec"][sel]}
    for b in "gri":
        mine = b == survey.config.band
        cols[f"{b}_mag"] = st["ref_mag"][sel] if mine else np.full(sel.sum(), np.nan)
        cols[f"{b}_magerr"] = st["ref_magerr"][sel] if mine else np.full(sel.sum(), np.nan)
    cols["bp_rp"] = st["bp_rp"][sel]
    Table(cols).write(path, format="fits")
