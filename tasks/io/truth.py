"""Write a simulated survey's truth into its own Zarr store (docs/simulator.md).

Later stages are scored against it: zero points per exposure and quadrant, star
magnitudes, per-observation truth, and the per-pixel maps (area, flat, starflat,
bias, defects).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import numpy as np
import xarray as xr

from sim.config import BANDS
from sim.survey import Survey
from tasks.io import groups
from tasks.io.provenance import provenance
from tasks.io.store import read_group, write_group


def _provenance(survey: Survey) -> dict:
    config = dataclasses.asdict(survey.config)
    if config["scene"] is None:
        # Surveys without a scene keep the attrs they had before scenes existed.
        del config["scene"]
    return provenance("simulate", config=config)


def write_truth(
    store: str | os.PathLike,
    survey: Survey,
    cosmics: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]],
    *,
    raw_paths: dict[int, str],
) -> list[str]:
    """Write every truth group; returns the group names."""
    attrs = _provenance(survey)
    content = {
        "camera": _camera(survey),
        "exposures": _exposures(survey, raw_paths),
        "zp": _zero_points(survey),
        "stars": _stars(survey),
        "observations": _observations(survey),
        "cosmics": _cosmics(cosmics),
    }
    if survey.config.truth_pixel_maps:
        content.update(dict(_maps(survey)))
    if survey.scene is not None:
        content["transients"] = _transients(survey)
        content["transient_epochs"] = _transient_epochs(survey)
    for name, ds in content.items():
        write_group(store, name, ds, attrs=attrs)
    return sorted(content)


def _camera(s: Survey) -> xr.Dataset:
    cam, inst = s.camera, s.instrument
    q = cam.quadrant_ids
    elec = [inst.electronics(int(i)) for i in q]
    geo = [cam.by_id[int(i)] for i in q]
    data = {
        "extname": ("quadrant", np.array([g.extname for g in geo], dtype=object)),
        "ccd_id": ("quadrant", np.array([g.ccd_id for g in geo])),
        "qid": ("quadrant", np.array([g.qid for g in geo])),
        "x0": ("quadrant", np.array([g.x0 for g in geo])),
        "y0": ("quadrant", np.array([g.y0 for g in geo])),
        "gain": ("quadrant", np.array([e.gain_e_per_adu for e in elec])),
        "read_noise_e": ("quadrant", np.array([e.read_noise_e for e in elec])),
        "bias_level_adu": ("quadrant", np.array([e.bias_level_adu for e in elec])),
        "saturate_adu": ("quadrant", np.array([e.saturate_adu for e in elec])),
    }
    bands = s.config.schedule.bands
    for b in bands:
        data[f"qe_level_{b}"] = ("quadrant", np.array([inst.qe_level(int(i), b) for i in q]))
    return xr.Dataset(
        data,
        coords={"quadrant": q},
        attrs={
            "kappa_per_px2": cam.kappa,
            "axis_x": cam.axis_x,
            "axis_y": cam.axis_y,
            "corner_radius_px": cam.corner_radius_px,
            "pixel_scale_arcsec": cam.config.pixel_scale_arcsec,
            "flat_norm": {b: inst.flat_norm(b) for b in bands},
        },
    )


def _column(values: Iterable, fill, dtype) -> np.ndarray:
    return np.array([fill if v is None else v for v in values], dtype=dtype)


def _exposures(s: Survey, raw_paths: dict[int, str]) -> xr.Dataset:
    ex = s.exposures
    f = lambda name, fill, dtype: ("exposure", _column((getattr(e, name) for e in ex), fill, dtype))  # noqa: E731
    return xr.Dataset(
        {
            "night": f("night", "", object),
            "mjd": f("mjd", np.nan, np.float64),
            "imagetyp": f("imagetyp", "", object),
            "band": f("band", "", object),
            "exptime_s": f("exptime_s", np.nan, np.float64),
            "led_id": f("led_id", -1, np.int64),
            "airmass": f("airmass", np.nan, np.float64),
            "tel_ra_deg": f("tel_ra_deg", np.nan, np.float64),
            "tel_dec_deg": f("tel_dec_deg", np.nan, np.float64),
            "out_temp_c": f("out_temp_c", np.nan, np.float64),
            "out_rhum_pct": f("out_rhum_pct", np.nan, np.float64),
            "wind_mps": f("wind_mps", np.nan, np.float64),
            "seeing_arcsec": f("seeing_arcsec", np.nan, np.float64),
            "sky_mag_arcsec2": f("sky_mag_arcsec2", np.nan, np.float64),
            "extinction_mag": f("extinction_mag", np.nan, np.float64),
            "cloud_mag": f("cloud_mag", np.nan, np.float64),
            "telemetry_mag": f("telemetry_mag", np.nan, np.float64),
            "path": ("exposure", np.array([raw_paths.get(e.expid, "") for e in ex], dtype=object)),
        },
        coords={"expid": ("exposure", np.array([e.expid for e in ex], dtype=np.int64))},
    )


def _science(s: Survey):
    return [e for e in s.exposures if e.imagetyp == "SCIENCE"]


def _zero_points(s: Survey) -> xr.Dataset:
    sci = _science(s)
    q = s.camera.quadrant_ids
    zp = np.array([[s.zp_true(e, int(i)) for i in q] for e in sci])
    cloud = np.array([[s.cloud_mag(e, int(i)) for i in q] for e in sci])
    return xr.Dataset(
        {
            "zp": (("expid", "quadrant"), zp),
            "cloud_mag": (("expid", "quadrant"), cloud),
            "band": ("expid", np.array([e.band for e in sci], dtype=object)),
        },
        coords={"expid": np.array([e.expid for e in sci], dtype=np.int64), "quadrant": q},
        attrs={
            "convention": "m = m_inst + zp + dzp_starflat; m_inst = -2.5 log10(flux_e / "
            "EXPTIME) on the fluence image made with the true flat normalised to mean 1 "
            "over the focal plane"
        },
    )


def _stars(s: Survey) -> xr.Dataset:
    c = s.catalog
    data = {
        "ra": ("source", c.ra_deg),
        "dec": ("source", c.dec_deg),
        "bp_rp": ("source", c.bp_rp),
        "var_amp_mag": ("source", c.var_amp_mag),
        "var_period_d": ("source", c.var_period_d),
        "var_phase": ("source", c.var_phase),
        "in_refcat": ("source", c.in_refcat),
    }
    for b in BANDS:
        data[f"mag_{b}"] = ("source", c.mag[b])
        data[f"ref_mag_{b}"] = ("source", c.ref_mag[b])
    return xr.Dataset(
        data,
        coords={"source_id": ("source", c.source_id)},
        attrs={
            "variability": "mag(t) = mag + var_amp_mag * sin(2 pi mjd / var_period_d + var_phase)"
        },
    )


def _observations(s: Survey) -> xr.Dataset:
    cols: dict[str, list[np.ndarray]] = {
        k: []
        for k in (
            "expid",
            "quadrant",
            "source_id",
            "x",
            "y",
            "mag",
            "zp",
            "dzp_starflat",
            "area",
            "flux_e",
        )
    }
    for e in _science(s):
        for q, obs in s.observations(e).items():
            n = len(obs.x)
            zp = s.zp_true(e, q)
            cols["expid"].append(np.full(n, e.expid, dtype=np.int64))
            cols["quadrant"].append(np.full(n, q, dtype=np.int64))
            cols["source_id"].append(s.catalog.source_id[obs.source_index])
            cols["x"].append(obs.x)
            cols["y"].append(obs.y)
            cols["mag"].append(obs.mag)
            cols["zp"].append(np.full(n, zp))
            cols["dzp_starflat"].append(obs.dzp_starflat)
            cols["area"].append(obs.area)
            cols["flux_e"].append(e.exptime_s * 10 ** (-0.4 * (obs.mag - zp - obs.dzp_starflat)))
    return xr.Dataset(
        {k: ("obs", np.concatenate(v)) for k, v in cols.items()},
        attrs={
            "flux_e": "expected electrons on the fluence image (true flat, area applied)",
            "x": "0-based data-section column of the star centre",
        },
    )


def _transients(s: Survey) -> xr.Dataset:
    sc = s.scene
    if sc is None:
        raise ValueError("the survey has no scene")
    data = {
        "ra": ("transient", sc.ra_deg),
        "dec": ("transient", sc.dec_deg),
        "host_ra": ("transient", sc.host_ra_deg),
        "host_dec": ("transient", sc.host_dec_deg),
        "r_eff_arcsec": ("transient", sc.r_eff_arcsec),
        "sersic_n": ("transient", sc.sersic_n),
        "axis_ratio": ("transient", sc.axis_ratio),
        "pa_deg": ("transient", sc.pa_deg),
        "offset_r_eff": ("transient", sc.offset_r_eff),
        "t_explosion_mjd": ("transient", sc.t_explosion_mjd),
        "t_peak_mjd": ("transient", sc.t_peak_mjd),
        "t_rise_d": ("transient", sc.t_rise_d),
        "decline_mag_per_d": ("transient", sc.decline_mag_per_d),
        "no_flux_before_mjd": ("transient", sc.no_flux_before_mjd),
    }
    for b in BANDS:
        data[f"peak_mag_{b}"] = ("transient", sc.peak_mag[b])
        data[f"host_mag_{b}"] = ("transient", sc.host_mag[b])
        data[f"host_sb_at_transient_{b}"] = ("transient", sc.host_sb_at_transient(b))
        data[f"host_sb_eff_{b}"] = ("transient", sc.host_sb_eff(b))
    return xr.Dataset(
        data,
        coords={"name": ("transient", np.asarray(sc.name, dtype=object))},
        attrs={
            "light_curve": "flux = peak * s(t); s = 0 before t_explosion, "
            "((t - t_explosion) / t_rise)^2 until t_peak, then 10**(-0.4 decline (t - t_peak))",
            "surface_brightness": "mag/arcsec^2 of the host before the PSF; sb_eff is the mean "
            "within the half-light ellipse",
            "flux_njy": "10**(-0.4 (m - 31.4))",
        },
    )


def _transient_epochs(s: Survey) -> xr.Dataset:
    """One row per (transient, science exposure)."""
    sc = s.scene
    if sc is None:
        raise ValueError("the survey has no scene")
    rows: dict[str, list[np.ndarray]] = {}
    for e in _science(s):
        part = s.transient_epochs(e)
        part["name"] = np.asarray(sc.name, dtype=object)
        part["expid"] = np.full(len(sc), e.expid, dtype=np.int64)
        part["mjd"] = np.full(len(sc), e.mjd)
        part["band"] = np.full(len(sc), e.band, dtype=object)
        for k, v in part.items():
            rows.setdefault(k, []).append(v)
    return xr.Dataset(
        {k: ("obs", np.concatenate(v)) for k, v in rows.items()},
        attrs={
            "quadrant": "-1: in a gap or off the mosaic",
            "flux_e": "expected electrons on the fluence image (true flat, area applied)",
            "mag": "survey system; inf before the explosion",
        },
    )


def _cosmics(cosmics: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]]) -> xr.Dataset:
    ex, qu, ys, xs = [], [], [], []
    for expid in sorted(cosmics):
        for q in sorted(cosmics[expid]):
            y, x = cosmics[expid][q]
            ex.append(np.full(len(y), expid, dtype=np.int64))
            qu.append(np.full(len(y), q, dtype=np.int64))
            ys.append(y)
            xs.append(x)
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return xr.Dataset(
        {
            "expid": ("hit", cat(ex)),
            "quadrant": ("hit", cat(qu)),
            "y": ("hit", cat(ys)),
            "x": ("hit", cat(xs)),
        }
    )


def _stack(s: Survey, fn, dtype=np.float32) -> xr.DataArray:
    q = s.camera.quadrant_ids
    return xr.DataArray(
        np.stack([fn(int(i)).astype(dtype) for i in q]),
        dims=("quadrant", "y", "x"),
        coords={"quadrant": q},
    )


def _maps(s: Survey):
    inst, cam = s.instrument, s.camera
    yield "maps/area", xr.Dataset({"area": _stack(s, cam.area_map)})
    yield (
        "maps/defects",
        xr.Dataset(
            {"defects": _stack(s, inst.defects, np.uint8)}, attrs={"bits": {"hot": 1, "dead": 2}}
        ),
    )
    for b in s.config.schedule.bands:
        yield f"maps/flat/{b}", xr.Dataset({"flat": _stack(s, lambda q, b=b: inst.true_flat(q, b))})
        yield (
            f"maps/starflat/{b}",
            xr.Dataset(
                {"starflat": _stack(s, lambda q, b=b: inst.starflat(q, b))}, attrs={"units": "mag"}
            ),
        )
    for n in range(s.config.schedule.n_nights):
        night = next(e.night for e in s.exposures if e.night_index == n)
        yield (
            f"maps/bias/{night}",
            xr.Dataset(
                {"bias": _stack(s, lambda q, n=n: inst.bias_pattern(q, n))},
                attrs={"units": "ADU", "meaning": "overscan-subtracted bias structure"},
            ),
        )


def score_ubercal(store: str | os.PathLike, truth: str | os.PathLike, band: str) -> dict:
    """``ubercal/<band>`` of a store against the simulator's truth store.

    The solution's gauge puts each quadrant's mean starflat into its zero points,
    so the truth compared with is ``zp + mean over the quadrant of the true
    starflat``. Returns the zero points' rms against it (mmag; with and without
    the common offset), the median of their own errors, their pull rms after the
    offset is removed, the offset itself, and how many were compared.
    """
    sol = read_group(store, groups.ubercal(band))
    zp_truth = read_group(truth, "zp")
    starflat = read_group(truth, f"maps/starflat/{band}").starflat
    expid, quadrant = sol.expid.values, sol.quadrant.values
    level = starflat.sel(quadrant=quadrant).mean(("y", "x")).values
    t = zp_truth.zp.sel(expid=expid, quadrant=quadrant).values + level[None]
    d = sol.zp.values - t
    ok = np.isfinite(d)
    offset = float(np.mean(d[ok]))
    centred = d[ok] - offset
    return {
        "n": int(ok.sum()),
        "offset_mmag": 1e3 * offset,
        "rms_mmag": 1e3 * float(np.sqrt(np.mean(d[ok] ** 2))),
        "rms_centred_mmag": 1e3 * float(np.sqrt(np.mean(centred**2))),
        "err_median_mmag": 1e3 * float(np.median(sol.zp_err.values[ok])),
        "pull_rms": float(np.sqrt(np.mean((centred / sol.zp_err.values[ok]) ** 2))),
    }
