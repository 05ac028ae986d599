"""Reduce and photometry stages: raw science exposures -> ``nights/<night>/catalog``
and ``nights/<night>/exposures`` (BRIEF §4, docs/photometry.md).

Per exposure chunk (one Prefect task each, on Dask) every quadrant is reduced
with the period's masters (:mod:`calib.reduce`), the reference stars are
photometered at their WCS positions (:mod:`calib.photometry`), and the rows are
returned; one task per night adds the classical zero points
(:mod:`calib.zeropoint`) and writes both groups. Reduced images are not kept
unless ``keep_reduced`` is set (a real night is terabytes); then they go to
``nights/<night>/reduced/<expid>``.

:func:`reduce_night` does the whole night without Prefect (tests call it); the
``*_task`` functions are the Prefect adapters the flow wires.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xarray as xr
from prefect import task
from pydantic import Field

from calib.bits import MASK_BITS
from calib.photometry import (
    FLAG_BITS,
    QuadrantPhotometry,
    apply_aperture_corrections,
    catalog_positions,
    instrumental_magnitudes,
    photometer_quadrant,
)
from calib.photometry.qa import quadrant_qa
from calib.pixel_area import PixelAreaCache
from calib.reduce import ReducedQuadrant, reduce_quadrant
from calib.zeropoint import classical_zeropoints, zeropoint_stars
from ml.zp_features import centre_crop
from tasks.allocator import keep_freed_memory
from tasks.config import StageConfig
from tasks.io import groups
from tasks.io.provenance import provenance
from tasks.io.raw import ExposureHeader, RefCatalog, iter_quadrants, read_refcat, validate_file
from tasks.io.reduced import KeptQuadrant, keep_quadrant, write_reduced
from tasks.io.store import StoreError, list_groups, read_group, write_group
from tasks.logs import run_logger
from tasks.resume import resumable

N_QUADRANTS = 64


class ReduceConfig(StageConfig, table="reduce"):
    """Configuration of the reduce stage (instrument-signature removal)."""

    overscan_method: Literal["mean", "median", "median_per_row"] = Field(
        "median_per_row",
        description="Overscan level estimator; per row also removes row-correlated noise.",
    )
    apply_pixel_area: bool = Field(
        True,
        description="Multiply the flat-fielded (surface-brightness) image by the WCS pixel "
        "area before photometry (seed 003). False only to compare.",
    )
    pixel_area_method: Literal["auto", "analytic", "numeric"] = Field(
        "auto",
        description="Pixel-area evaluation: analytic SIP derivatives for TAN-SIP, finite "
        "differences on the sphere otherwise.",
    )
    min_flat: float = Field(
        0.05, gt=0, description="Flat values below this mark a pixel unusable (mask bit 16)."
    )
    detect_cosmics: bool = Field(True, description="Flag cosmic rays (L.A.Cosmic-like).")
    cosmic_sigclip: float = Field(
        5.0, gt=0, description="Cosmic-ray Laplacian threshold, in local noise sigmas."
    )
    cosmic_objlim: float = Field(
        3.0, gt=0, description="Cosmic-ray contrast over the fine structure (protects stars)."
    )
    master_period: str | None = Field(
        None,
        description="Masters period label (YYYY-MM-DD) to use; default: the latest period "
        "starting on or before the night.",
    )
    exposures_per_task: int = Field(
        4, ge=1, le=1000, description="Science exposures reduced by one Prefect task."
    )
    keep_reduced: bool = Field(
        False,
        description="Also write the fluence images to nights/<night>/reduced/<expid> "
        "(--keep-reduced); off by default, a real night is terabytes.",
    )
    patch_px: int = Field(
        256,
        ge=8,
        le=4096,
        description="Side of the image patch kept per exposure for the zero-point network "
        "(nights/<night>/patches): the centre of its lowest-numbered quadrant, in e-/s.",
    )


class PhotometryConfig(StageConfig, table="photometry"):
    """Configuration of the photometry stage (forced aperture photometry, classical zp)."""

    fwhm_guess_px: float = Field(2.0, gt=0, description="Starting FWHM for the PSF fit, px.")
    aperture_radius_fwhm: float = Field(
        3.0, gt=0, description="Working aperture radius in units of the measured FWHM."
    )
    apcorr_radius_fwhm: float = Field(
        5.0, gt=0, description="Radius of the aperture the correction refers to, FWHM."
    )
    apcorr_min_snr: float = Field(
        50.0, gt=0, description="Minimum S/N of an aperture-correction star."
    )
    apcorr_min_stars: int = Field(
        10,
        ge=1,
        description="Quadrants with fewer correction stars use the exposure's pooled value.",
    )
    background_box_px: int = Field(
        64, ge=4, description="Background2D mesh size on the surface-brightness image, px."
    )
    background_filter: int = Field(3, ge=1, description="Median filter over meshes (odd).")
    background_estimator: Literal["mean", "median"] = Field(
        "mean",
        description="Sky level per mesh after clipping and source masking: the clipped mean "
        "(unbiased for apertures when faint undetected sources skew the sky) or the median.",
    )
    crowd_max_contamination: float = Field(
        1e-3,
        gt=0,
        description="Crowded (flag 8) when neighbours put more than this fraction of the "
        "star's flux in its aperture (1e-3: ~1 mmag).",
    )
    crowd_moffat_beta: float = Field(
        3.0,
        gt=1,
        description="Moffat index of the PSF wings assumed by the crowding estimate.",
    )
    centroid_min_snr: float = Field(
        30.0, gt=0, description="Stars at or above this S/N use their refined centroid."
    )
    max_centroid_shift_px: float = Field(
        1.0, gt=0, description="Larger centroid refinements are rejected (flag 32)."
    )
    catalog_margin_px: float = Field(
        20.0, ge=0, description="Catalog stars this far off a quadrant count as neighbours."
    )
    qa_detection: bool = Field(
        True, description="Detect sources (DAOStarFinder) for match-rate/astrometry QA."
    )
    colour_term: float | None = Field(
        None,
        description="Fixed colour term c in m = m_ref + c (bp_rp - pivot); None fits it "
        "over the night's clean stars.",
    )
    colour_pivot: float = Field(1.0, description="bp_rp at which the colour term vanishes.")
    zp_clip_sigma: float = Field(3.0, gt=0, description="Clipping of the zero-point median.")
    zp_max_mag_err: float = Field(
        0.05, gt=0, description="Stars with larger mag_inst_err are left out of the zp."
    )
    zp_max_contamination: float = Field(
        0.01,
        gt=0,
        description="Stars flagged only as crowded still enter the zp when their estimated "
        "contamination is below this (their own error is larger).",
    )
    zp_min_stars: int = Field(3, ge=2, description="Fewer clipped stars: zp_classic is NaN.")


# --- masters ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Masters:
    """Master calibrations of the period covering a night, indexed by quadrant id
    and read from the store a quadrant at a time (:meth:`quadrant`): bias ADU and
    flat (quadrant, y, x), defects uint8 (1 hot, 2 dead; the flat's and the
    bias's). Lazy because a focal plane's masters do not fit a worker: the ZTF
    plane's bias and flat groups, with their QA planes, are 34 bytes a pixel,
    20 GB; loaded whole they stopped every worker of the full-plane night
    (docs/nightly.md)."""

    bias: xr.DataArray  # (quadrant, y, x) ADU, lazy
    flat: xr.DataArray  # (quadrant, y, x), lazy
    flat_defects: xr.DataArray  # (quadrant, y, x) uint8, lazy
    bias_defects: xr.DataArray | None  # (quadrant, y, x) uint8, lazy
    bias_period: str
    flat_period: str

    def quadrant(self, q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            bias = self.bias.sel(quadrant=q).values
            flat = self.flat.sel(quadrant=q).values
            defects = self.flat_defects.sel(quadrant=q).values.astype(np.uint8)
        except KeyError:
            raise StoreError(
                f"masters (bias {self.bias_period}, flat {self.flat_period}) have no quadrant {q}"
            ) from None
        if self.bias_defects is not None and q in self.bias_defects.quadrant.values:
            defects |= self.bias_defects.sel(quadrant=q).values.astype(np.uint8)
        return bias, flat, defects


def _pick_period(store: str, prefix: str, night: str, wanted: str | None) -> str:
    periods = list_groups(store, prefix)
    if wanted is not None:
        if wanted not in periods:
            raise StoreError(f"{store}: no {prefix}/{wanted} (have {periods})")
        return wanted
    if not periods:
        raise StoreError(f"{store}: no masters under {prefix}; run the masters stage first")
    before = [p for p in periods if p <= night]
    return max(before) if before else min(periods)


def load_masters(store: str, night: str, band: str, *, period: str | None = None) -> Masters:
    """The bias and ``band`` flat of the period covering ``night``."""
    bias_period = _pick_period(store, groups.BIAS, night, period)
    flat_period = _pick_period(store, groups.flats(band), night, period)
    bias = read_group(store, groups.bias(bias_period), load=False)
    flat = read_group(store, groups.flat(band, flat_period), load=False)
    bias_defects = bias.get("defects")
    return Masters(
        bias["bias"], flat["flat"], flat["defects"], bias_defects, bias_period, flat_period
    )


# --- one exposure -----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ExposureResult:
    """Rows of one exposure.

    Attributes
    ----------
    catalog : xarray.Dataset
        Its part of the night catalog (dim ``obs``).
    row : dict
        Its row of the exposures group, with per-quadrant QA under ``quadrants``.
    path : str
        The raw file.
    reduced : dict of int to KeptQuadrant, optional
        Fluence, variance, mask and WCS by quadrant, only with ``keep_reduced``
        (tasks/io/reduced.py).
    patch : ndarray, shape (patch_px, patch_px), e-/s, optional
        The centre of the lowest-numbered quadrant's fluence image over the
        exposure time (the zero-point network's image input); smaller when the
        quadrant is.
    """

    catalog: xr.Dataset
    row: dict[str, Any]
    path: str
    reduced: dict[int, KeptQuadrant] | None = None
    patch: np.ndarray | None = None


def photometer_exposure(
    path: str,
    masters: Masters,
    refcat: RefCatalog,
    *,
    reduce_config: ReduceConfig,
    photometry_config: PhotometryConfig,
    area_cache: PixelAreaCache | None = None,
    header: ExposureHeader | None = None,
) -> ExposureResult:
    """Reduce and photometer every quadrant of one science exposure (``header``:
    its primary header when already read)."""
    header = header if header is not None else validate_file(path).header
    if header.imagetyp != "SCIENCE":
        raise ValueError(f"{path}: IMAGETYP {header.imagetyp} is not a science exposure")
    band = header.band or ""
    ref_mag = getattr(refcat, f"{band}_mag")
    cache = area_cache if area_cache is not None else PixelAreaCache()
    rc, pc = reduce_config, photometry_config
    parts: list[tuple[int, QuadrantPhotometry, np.ndarray]] = []
    qa: dict[int, dict[str, float]] = {}
    kept: dict[int, KeptQuadrant] = {}
    patch_of: tuple[int, np.ndarray] | None = None
    shape = (0, 0)
    for frame in iter_quadrants(path):  # one quadrant's pixels in memory at a time
        q = frame.header.quadrant
        bias, flat, defects = masters.quadrant(q)
        shape = frame.data.shape
        area = cache.get(frame.wcs, shape, method=rc.pixel_area_method)
        reduced = reduce_quadrant(
            frame.data,
            frame.overscan,
            bias_adu=bias,
            flat=flat,
            gain=frame.header.gain,
            read_noise_e=frame.header.rdnoise_e,
            saturate_adu=frame.header.saturate_adu,
            pixel_area=area,
            defects=defects,
            apply_pixel_area=rc.apply_pixel_area,
            overscan_method=rc.overscan_method,
            min_flat=rc.min_flat,
            detect_cosmics=rc.detect_cosmics,
            cosmic_sigclip=rc.cosmic_sigclip,
            cosmic_objlim=rc.cosmic_objlim,
        )
        rows, x, y = catalog_positions(
            frame.wcs, refcat.ra, refcat.dec, shape, margin_px=pc.catalog_margin_px
        )
        phot = photometer_quadrant(
            reduced,
            x,
            y,
            ref_mag[rows],
            fwhm_guess_px=pc.fwhm_guess_px,
            aperture_radius_fwhm=pc.aperture_radius_fwhm,
            apcorr_radius_fwhm=pc.apcorr_radius_fwhm,
            apcorr_min_snr=pc.apcorr_min_snr,
            background_box_px=pc.background_box_px,
            background_filter=pc.background_filter,
            background_estimator=pc.background_estimator,
            crowd_max_contamination=pc.crowd_max_contamination,
            crowd_moffat_beta=pc.crowd_moffat_beta,
            centroid_min_snr=pc.centroid_min_snr,
            max_centroid_shift_px=pc.max_centroid_shift_px,
        )
        parts.append((q, phot, rows[phot.index]))
        qa[q] = quadrant_qa(
            reduced, phot, x[phot.index], y[phot.index], detect=pc.qa_detection
        ).as_row()
        if rc.keep_reduced:
            kept[q] = keep_quadrant(reduced, frame.wcs)
        if patch_of is None or q < patch_of[0]:
            patch_of = (q, _patch_e_s(reduced, rc.patch_px, header.exptime_s))
    corrections = apply_aperture_corrections(
        [p.aperture_correction for _, p, _ in parts], min_stars=pc.apcorr_min_stars
    )
    catalog = _catalog_part(header.expid, header.exptime_s, parts, corrections, refcat)
    catalog.attrs.update(quad_ny=int(shape[0]), quad_nx=int(shape[1]))
    row = {
        "expid": header.expid,
        "mjd": header.mjd,
        "band": band,
        "airmass": header.airmass,
        "exptime_s": header.exptime_s,
        "out_temp_c": header.out_temp_c,
        "out_rhum_pct": header.out_rhum_pct,
        "wind_mps": header.wind_speed_mps,
        "bias_period": masters.bias_period,
        "flat_period": masters.flat_period,
        "quadrants": {
            q: {
                **qa[q],
                "apcorr": c.value,
                "apcorr_err": c.err,
                "apcorr_n": c.n_stars,
                "apcorr_pooled": c.source == "exposure",
                "fwhm_px": p.fwhm_px,
                "aperture_radius_px": p.aperture_radius_px,
                "background_e": p.background_e,
            }
            for (q, p, _), c in zip(parts, corrections, strict=True)
        },
    }
    return ExposureResult(
        catalog=catalog,
        row=row,
        path=path,
        reduced=kept or None,
        patch=None if patch_of is None else patch_of[1],
    )


def _patch_e_s(reduced: ReducedQuadrant, size: int, exptime_s: float) -> np.ndarray:
    """The centre of the fluence image over the exposure time, cropped before
    the product rather than after it."""
    sb, area = (centre_crop(a, size) for a in (reduced.surface_brightness, reduced.pixel_area))
    return (sb * area).astype(np.float32) / exptime_s


def _catalog_part(
    expid: int,
    exptime_s: float,
    parts: list[tuple[int, QuadrantPhotometry, np.ndarray]],
    corrections: list,
    refcat: RefCatalog,
) -> xr.Dataset:
    cols: dict[str, list[np.ndarray]] = {
        k: []
        for k in ("quadrant", "source_id", "x", "y", "flux", "flux_err", "flags", "contamination")
    }
    for (q, p, rows), c in zip(parts, corrections, strict=True):
        n = len(rows)
        cols["quadrant"].append(np.full(n, q, dtype=np.int64))
        cols["source_id"].append(refcat.source_id[rows])
        cols["x"].append(p.x)
        cols["y"].append(p.y)
        cols["flux"].append(p.flux_e * c.value)
        cols["flux_err"].append(p.flux_err_e * c.value)
        cols["flags"].append(p.flags)
        cols["contamination"].append(p.contamination)
    data = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    mag, mag_err = instrumental_magnitudes(data["flux"], data["flux_err"], exptime_s)
    n = len(data["flux"])
    return xr.Dataset(
        {
            "expid": ("obs", np.full(n, expid, dtype=np.int64)),
            "quadrant": ("obs", data["quadrant"].astype(np.int64)),
            "source_id": ("obs", data["source_id"].astype(np.int64)),
            "x": ("obs", data["x"].astype(np.float64)),
            "y": ("obs", data["y"].astype(np.float64)),
            "flux": ("obs", data["flux"].astype(np.float64)),
            "flux_err": ("obs", data["flux_err"].astype(np.float64)),
            "mag_inst": ("obs", mag),
            "mag_inst_err": ("obs", mag_err),
            "flags": ("obs", data["flags"].astype(np.int64)),
            "contamination": ("obs", data["contamination"].astype(np.float32)),
        }
    )


# --- a chunk, a night -------------------------------------------------------------

_AREA_CACHE = PixelAreaCache()
"""One cache per worker process: a quadrant's map serves the whole night."""


def photometer_chunk(
    store: str,
    raw_root: str,
    relpaths: list[str],
    refcat_path: str,
    night: str,
    *,
    reduce_config: ReduceConfig,
    photometry_config: PhotometryConfig,
    area_cache: PixelAreaCache | None = None,
) -> list[ExposureResult]:
    """Reduce and photometer a chunk of science exposures of one night."""
    keep_freed_memory()  # full-size arrays reused quadrant after quadrant (tasks/allocator.py)
    refcat = read_refcat(refcat_path)
    cache = area_cache if area_cache is not None else _AREA_CACHE
    results = []
    masters: dict[str, Masters] = {}
    for relpath in relpaths:
        path = os.path.join(raw_root, relpath)
        header = validate_file(path).header
        band = header.band or ""
        if band not in masters:
            masters[band] = load_masters(store, night, band, period=reduce_config.master_period)
        results.append(
            photometer_exposure(
                path,
                masters[band],
                refcat,
                reduce_config=reduce_config,
                photometry_config=photometry_config,
                area_cache=cache,
                header=header,
            )
        )
    return results


def night_groups(
    results: list[ExposureResult],
    refcat: RefCatalog,
    photometry_config: PhotometryConfig,
) -> tuple[xr.Dataset, xr.Dataset]:
    """The night's catalog and exposures datasets, classical zero points included."""
    if not results:
        raise ValueError("no exposures to write")
    results = sorted(results, key=lambda r: r.row["expid"])
    catalog = xr.concat([r.catalog for r in results], dim="obs")
    catalog.attrs = {
        "quad_nx": results[0].catalog.attrs["quad_nx"],
        "quad_ny": results[0].catalog.attrs["quad_ny"],
    }
    exposures = _exposures_dataset([r.row for r in results])
    zp, zp_err, n_zp, terms = _classical(catalog, exposures, refcat, photometry_config)
    exposures["zp_classic"] = (("exposure", "quadrant"), zp)
    exposures["zp_classic_err"] = (("exposure", "quadrant"), zp_err)
    exposures["zp_classic_nstars"] = (("exposure", "quadrant"), n_zp)
    exposures["colour_term"] = ("exposure", np.array([terms[b][0] for b in exposures.band.values]))
    exposures["colour_term_err"] = (
        "exposure",
        np.array([terms[b][1] for b in exposures.band.values]),
    )
    exposures.attrs["colour_pivot"] = photometry_config.colour_pivot
    exposures.attrs["colour_term_convention"] = "m = m_ref + colour_term * (bp_rp - colour_pivot)"
    return catalog, exposures


def _exposures_dataset(rows: list[dict[str, Any]]) -> xr.Dataset:
    quadrants = sorted({q for r in rows for q in r["quadrants"]})
    col = lambda k, dtype: ("exposure", np.array([r[k] for r in rows], dtype=dtype))  # noqa: E731
    data: dict[str, Any] = {
        "expid": col("expid", np.int64),
        "mjd": col("mjd", np.float64),
        "band": col("band", object),
        "airmass": col("airmass", np.float64),
        "exptime_s": col("exptime_s", np.float64),
        "out_temp_c": col("out_temp_c", np.float64),
        "out_rhum_pct": col("out_rhum_pct", np.float64),
        "wind_mps": col("wind_mps", np.float64),
        "bias_period": col("bias_period", object),
        "flat_period": col("flat_period", object),
    }
    keys = next(iter(rows[0]["quadrants"].values())).keys()
    for key in keys:
        table = np.full((len(rows), len(quadrants)), np.nan)
        for i, r in enumerate(rows):
            for j, q in enumerate(quadrants):
                if q in r["quadrants"]:
                    table[i, j] = float(r["quadrants"][q][key])
        data[key] = (("exposure", "quadrant"), table)
    return xr.Dataset(data, coords={"quadrant": np.array(quadrants, dtype=np.int64)})


def _classical(
    catalog: xr.Dataset, exposures: xr.Dataset, refcat: RefCatalog, pc: PhotometryConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, tuple[float, float]]]:
    n_exp, n_q = exposures.sizes["exposure"], exposures.sizes["quadrant"]
    zp = np.full((n_exp, n_q), np.nan)
    zp_err = np.full((n_exp, n_q), np.nan)
    n_used = np.zeros((n_exp, n_q), dtype=np.int64)
    terms: dict[str, tuple[float, float]] = {}
    pos = refcat.rows_of(catalog.source_id.values)  # every catalog source is in it
    expids = exposures.expid.values
    exp_row = {int(e): i for i, e in enumerate(expids)}
    q_col = {int(q): j for j, q in enumerate(exposures.quadrant.values)}
    band_of_obs = exposures.band.values[[exp_row[int(e)] for e in catalog.expid.values]]
    usable = zeropoint_stars(
        catalog.flags.values,
        catalog.contamination.values,
        catalog.mag_inst_err.values,
        max_contamination=pc.zp_max_contamination,
        max_mag_err=pc.zp_max_mag_err,
    )
    for band in np.unique(exposures.band.values):
        sel = (band_of_obs == band) & usable
        m_ref = getattr(refcat, f"{band}_mag")[pos[sel]]
        colour = refcat.bp_rp[pos[sel]]
        expid, quad = catalog.expid.values[sel], catalog.quadrant.values[sel]
        group = expid * N_QUADRANTS + quad
        if len(group) < pc.zp_min_stars:
            terms[str(band)] = (float("nan"), float("nan"))
            continue
        res = classical_zeropoints(
            catalog.mag_inst.values[sel],
            m_ref,
            colour,
            group,
            m_inst_err=catalog.mag_inst_err.values[sel],
            m_ref_err=getattr(refcat, f"{band}_magerr")[pos[sel]],
            colour_term=pc.colour_term,
            pivot=pc.colour_pivot,
            clip_sigma=pc.zp_clip_sigma,
            min_stars=pc.zp_min_stars,
        )
        terms[str(band)] = (res.colour_term.value, res.colour_term.err)
        for gid, z, e, n in zip(res.group, res.zp, res.zp_err, res.n_stars, strict=True):
            i, j = exp_row[int(gid // N_QUADRANTS)], q_col[int(gid % N_QUADRANTS)]
            zp[i, j], zp_err[i, j], n_used[i, j] = z, e, n
    return zp, zp_err, n_used, terms


def night_provenance(
    night: str,
    inputs: list[str],
    reduce_config: ReduceConfig,
    photometry_config: PhotometryConfig,
    refcat_path: str,
) -> dict[str, Any]:
    return provenance(
        "reduce+photometry",
        config={"reduce": reduce_config, "photometry": photometry_config},
        inputs=sorted(inputs),
        night=night,
        refcat=os.path.abspath(refcat_path),
        flag_bits=dict(FLAG_BITS),
        mask_bits=dict(MASK_BITS),
        magnitude_convention="m_inst = -2.5 log10(flux_e / EXPTIME), flux on the fluence "
        "image, aperture-corrected",
    )


def write_night(
    store: str,
    night: str,
    results: list[ExposureResult],
    refcat_path: str,
    *,
    reduce_config: ReduceConfig,
    photometry_config: PhotometryConfig,
    inputs: list[str],
) -> dict[str, int]:
    """Write ``nights/<night>/catalog`` and ``nights/<night>/exposures``; small counts back."""
    refcat = read_refcat(refcat_path)
    catalog, exposures = night_groups(results, refcat, photometry_config)
    attrs = night_provenance(night, inputs, reduce_config, photometry_config, refcat_path)
    write_group(store, groups.catalog(night), catalog, attrs=attrs)
    write_group(store, groups.exposures(night), exposures, attrs=attrs)
    patches = [r for r in sorted(results, key=lambda r: r.row["expid"]) if r.patch is not None]
    if patches:  # one layout per night (the index rejects others), so they stack
        ds = xr.Dataset(
            {"patch": (("exposure", "py", "px"), np.stack([r.patch for r in patches]))},
            coords={"expid": ("exposure", np.array([r.row["expid"] for r in patches]))},
            attrs={"units": "e-/s per pixel (fluence / EXPTIME)", "quadrant": "lowest read"},
        )
        write_group(store, groups.patches(night), ds, attrs=attrs)
    if reduce_config.keep_reduced:
        for r in results:
            if r.reduced:
                write_reduced(store, night, r.row["expid"], r.reduced, attrs=attrs)
    return {
        "exposures": int(exposures.sizes["exposure"]),
        "observations": int(catalog.sizes["obs"]),
        "clean": int(np.count_nonzero(catalog.flags.values == 0)),
    }


def science_files(store: str, night: str) -> tuple[str, list[str]]:
    """Raw root and the ``ok`` science files of a night, from ``index/<night>``."""
    index = read_group(store, groups.index(night))
    ok = (index.status.values == "ok") & (index.imagetyp.values == "SCIENCE")
    return str(index.attrs.get("raw_root", "")), sorted(str(p) for p in index.path.values[ok])


def chunks(relpaths: list[str], size: int) -> list[list[str]]:
    return [relpaths[i : i + size] for i in range(0, len(relpaths), size)]


def reduce_night(
    store: str,
    night: str,
    refcat_path: str,
    *,
    raw_root: str | None = None,
    reduce_config: ReduceConfig | None = None,
    photometry_config: PhotometryConfig | None = None,
) -> dict[str, int]:
    """The whole night in this process, without Prefect (tests, debugging): the
    flow's wiring (:func:`tasks.stages.photometry_stage`) run sequentially."""
    # Imported here: tasks.stages wires this module's tasks.
    from tasks.stages import SequentialRun, photometry_stage

    counts = photometry_stage(
        SequentialRun(), store, [night], refcat_path, reduce_config or ReduceConfig(),
        photometry_config or PhotometryConfig(), raw_root=raw_root,
    )  # fmt: skip
    if night not in counts:
        raise StoreError(f"{store}: night {night} has no index or no science exposure")
    return counts[night]


# --- Prefect adapters ---------------------------------------------------------------


@task(name="check-refcat", retries=0)
def check_refcat_task(refcat_path: str) -> int:
    """Read the reference catalog once before any stage runs: a damaged one fails
    the run at once with its one-line reason (every photometry task needs it).
    Returns the number of reference stars."""
    n = len(read_refcat(refcat_path))
    run_logger(__name__).info("reference catalog %s: %d stars", refcat_path, n)
    return n


@task(name="plan-reduce", retries=2, retry_delay_seconds=2)
def plan_reduce_task(store: str, night: str, config: ReduceConfig) -> tuple[str, list[list[str]]]:
    """Raw root and the night's science files in chunks of ``exposures_per_task``."""
    root, relpaths = science_files(store, night)
    run_logger(__name__).info("night %s: %d science exposures", night, len(relpaths))
    return root, chunks(relpaths, config.exposures_per_task)


@task(name="photometer-chunk", retries=1, retry_delay_seconds=5)
@resumable
def photometer_chunk_task(
    store: str,
    raw_root: str,
    relpaths: list[str],
    refcat_path: str,
    night: str,
    reduce_config: ReduceConfig,
    photometry_config: PhotometryConfig,
) -> list[ExposureResult]:
    """Reduce and photometer a chunk; returns its catalog rows (no images unless kept)."""
    return photometer_chunk(
        store,
        raw_root,
        relpaths,
        refcat_path,
        night,
        reduce_config=reduce_config,
        photometry_config=photometry_config,
    )


@task(name="write-night-catalog", retries=2, retry_delay_seconds=2)
def write_night_task(
    store: str,
    night: str,
    parts: list[list[ExposureResult]],
    refcat_path: str,
    reduce_config: ReduceConfig,
    photometry_config: PhotometryConfig,
) -> dict[str, int]:
    """Classical zero points, then ``nights/<night>/catalog`` and ``.../exposures``."""
    results = [r for part in parts for r in part]
    counts = write_night(
        store,
        night,
        results,
        refcat_path,
        reduce_config=reduce_config,
        photometry_config=photometry_config,
        inputs=[r.path for r in results],
    )
    run_logger(__name__).info("night %s: %s", night, counts)
    return counts
