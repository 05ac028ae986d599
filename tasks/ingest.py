"""Ingest: per-observation photometry from another pipeline (FITS, ECSV, CSV or
Parquet tables) becomes complete ``nights/<night>/catalog`` and
``nights/<night>/exposures`` groups, so ubercal, the zero points, the network's
features and the QA run on it as on photocal's own photometry (docs/ingest.md).

Every row is validated; a bad row is rejected with its reason, counted, and kept
in ``nights/<night>/rejected`` (``nights/unknown-night/rejected`` for rows whose
night cannot be told), never dropped in silence.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astropy.time import Time
from astropy.units import UnitsWarning
from pydantic import Field

from calib.photometry import instrumental_magnitudes
from tasks.config import StageConfig
from tasks.io import groups
from tasks.io.groups import UNKNOWN_NIGHT
from tasks.io.night import observing_night
from tasks.io.provenance import provenance
from tasks.io.raw import RefCatalog, read_refcat
from tasks.io.store import group_exists, read_group, write_group
from tasks.reduce import N_QUADRANTS, ExposureResult, PhotometryConfig, night_groups

BANDS = ("g", "r", "i")

#: Contract name -> what it is. Values come from a table column (the same name,
#: or ``--column NAME=COL``) or a constant for the whole table (``--set``).
CONTRACT: dict[str, str] = {
    "expid": "exposure key: an integer, or any per-exposure value (a file name), mapped to "
    "integers (the mapping is kept in the attrs)",
    "source_id": "reference-catalog id (int64); else ra/dec are matched to the catalog",
    "ra": "ICRS right ascension, deg (matched when there is no source_id)",
    "dec": "ICRS declination, deg",
    "x": "column on the quadrant, px (0-based)",
    "y": "row on the quadrant, px",
    "quadrant": "quadrant id 0..63 (default 0)",
    "flux": "instrumental flux (e-, or ADU: the zero point absorbs the gain)",
    "flux_err": "its 1-sigma error, same unit",
    "mag": "instrumental magnitude (instead of flux); taken as m_inst as it is",
    "mag_err": "its 1-sigma error, mag",
    "exptime": "exposure time, s (needed with flux)",
    "mjd": "UTC MJD of the exposure",
    "date_obs": "UTC ISO date-time of the exposure (instead of mjd)",
    "airmass": "airmass (optional; NaN when not given)",
    "flags": "integer flags, 0 = clean (optional, default 0)",
    "out_temp_c": "outside temperature, C (optional)",
    "out_rhum_pct": "outside relative humidity, % (optional)",
    "wind_mps": "wind speed, m/s (optional)",
    "quad_nx": "quadrant width, px (a constant: --set quad_nx=N)",
    "quad_ny": "quadrant height, px",
}
_INTEGER = ("quadrant", "flags", "quad_nx", "quad_ny")
_OPTIONAL_NAN = ("airmass", "out_temp_c", "out_rhum_pct", "wind_mps")
_PER_EXPOSURE = ("exptime", "airmass", "out_temp_c", "out_rhum_pct", "wind_mps")


class IngestConfig(StageConfig, table="ingest"):
    """Configuration of ``photocal ingest`` (external photometry tables)."""

    match_radius_arcsec: float = Field(
        1.0,
        gt=0,
        le=60,
        description="Rows without source_id are matched by ra/dec to the nearest reference "
        "star within this radius; farther ones are rejected as unknown stars.",
    )


class IngestError(ValueError):
    """The table cannot be ingested at all (unreadable, a contract value missing)."""


@dataclass(frozen=True)
class IngestResult:
    """What an ingest wrote: per night the counts, and the rejections by reason."""

    table: str
    nights: dict[str, dict[str, Any]]
    rejected: Counter = field(default_factory=Counter)
    columns: dict[str, str] = field(default_factory=dict)

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())


# --- reading ------------------------------------------------------------------------


def read_table(path: str | os.PathLike) -> Table:
    """A FITS, ECSV, CSV or Parquet table, the format told by the file's content
    (gzip-compressed files too); CSV is any other text file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as stream:
            start = stream.read(8)
        if start.startswith(b"\x1f\x8b"):
            with gzip.open(path, "rb") as stream:
                start = stream.read(8)
    except OSError as err:
        raise IngestError(f"{path}: cannot be read: {err.strerror or err}") from None
    if start.startswith(b"SIMPLE"):
        options: dict[str, Any] = {"format": "fits"}
    elif start.startswith(b"# %ECSV"):
        options = {"format": "ascii.ecsv"}
    elif start.startswith(b"PAR1"):
        options = {"format": "parquet"}
    else:
        options = {"format": "ascii.csv"}
    with warnings.catch_warnings():
        # Units are not used: the contract fixes them.
        warnings.simplefilter("ignore", UnitsWarning)
        try:
            return Table.read(path, **options)
        except Exception as err:  # astropy raises many kinds for a damaged file
            raise IngestError(
                f"{path}: cannot be read as a {options['format']} table: {err}"
            ) from None


def resolve_columns(
    table: Table,
    columns: Mapping[str, str],
    constants: Mapping[str, str],
    path: str,
    *,
    need_time: bool = True,
) -> dict[str, str]:
    """Contract name -> table column: ``--column`` first, then the contract name
    itself (case-insensitive). Names given a constant are left out."""
    for name in [*columns, *constants]:
        if name not in CONTRACT:
            raise IngestError(
                f"{path}: {name!r} is not a contract name; known: {', '.join(CONTRACT)}"
            )
    lower = {c.lower(): c for c in table.colnames}
    out = {}
    for name in CONTRACT:
        if name in constants:
            continue
        if name in columns:
            if columns[name] not in table.colnames:
                raise IngestError(
                    f"{path}: --column {name}={columns[name]}: no column {columns[name]!r}; "
                    f"the table has {', '.join(table.colnames)}"
                )
            out[name] = columns[name]
        elif name in lower:
            out[name] = lower[name]
    _require(out, constants, path, need_time=need_time)
    return out


def _require(
    found: Mapping[str, str], constants: Mapping[str, str], path: str, *, need_time: bool
) -> None:
    have = set(found) | set(constants)
    needed = [
        ("expid",),
        ("source_id", "ra"),
        ("flux", "mag"),
        ("x",),
        ("y",),
        ("quad_nx",),
        ("quad_ny",),
    ]
    pairs = {"flux": "flux_err", "mag": "mag_err", "ra": "dec"}
    for options in needed:
        if not have & set(options):
            names = " or ".join(options)
            raise IngestError(
                f"{path}: no value for {names}: map a column with --column {options[0]}=COL "
                f"or give a constant with --set {options[0]}=VALUE"
            )
    for a, b in pairs.items():
        if a in have and b not in have and not (a == "ra" and "source_id" in have):
            raise IngestError(f"{path}: {a} is given but not {b} (--column {b}=COL)")
    if "flux" in have and "mag" not in have and "exptime" not in have:
        raise IngestError(f"{path}: flux needs exptime (--column exptime=COL or --set exptime=S)")
    if need_time and not have & {"mjd", "date_obs"}:
        raise IngestError(
            f"{path}: no exposure time stamp: map mjd or date_obs (--column mjd=COL), "
            "--set one for the whole table, or give the night (--night)"
        )


# --- values ---------------------------------------------------------------------------


def _column(table: Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Values (unit stripped; bytes decoded) and the mask of missing ones."""
    col = table[name]
    mask = np.ma.getmaskarray(col).copy()
    data = col.filled() if hasattr(col, "filled") and mask.any() else col
    values = np.asarray(getattr(data, "value", data))
    if values.dtype.kind == "S":
        values = np.char.decode(values, "utf-8", errors="replace")
    if values.dtype.kind in "US":
        values = np.char.strip(values.astype(str))
        mask |= values == ""
    return values, mask


def _float(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.full(values.shape, np.nan)
    for i, v in enumerate(values):
        if not mask[i]:
            with contextlib.suppress(TypeError, ValueError):
                out[i] = float(v)
    return out


def _values(
    table: Table, mapping: Mapping[str, str], constants: Mapping[str, str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    n = len(table)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in CONTRACT:
        if name in constants:
            raw = np.full(n, constants[name], dtype=object)
            mask = np.zeros(n, bool)
        elif name in mapping:
            raw, mask = _column(table, mapping[name])
        else:
            continue
        if name in ("expid", "date_obs") or name == "source_id":
            out[name] = (raw, mask)
        else:
            fl = raw.astype(np.float64) if raw.dtype.kind in "fiu" else _float(raw, mask)
            out[name] = (np.where(mask, np.nan, fl), mask | ~np.isfinite(fl))
    return out


def expid_integers(keys: np.ndarray) -> tuple[np.ndarray, dict[str, int] | None]:
    """Integer expids: integer keys as they are; any other key (a file name)
    hashed to a stable 48-bit integer, so the same exposure gets the same expid
    in every ingest and two tables do not collide in practice (one chance in
    ~10^9 for 10^3 exposures). 48 bits keep ``expid * 64 + quadrant`` inside
    int64 and expids exact in float64. Returns the mapping for the second case."""
    if keys.dtype.kind in "iu":
        return keys.astype(np.int64), None
    if keys.dtype.kind == "f" and np.all(np.isfinite(keys)) and np.all(keys == np.round(keys)):
        return keys.astype(np.int64), None
    text = np.array([str(k) for k in keys])
    try:
        return np.array([int(k) for k in text], dtype=np.int64), None
    except ValueError:
        pass  # not all integers: keys such as file names
    mapping = {
        k: int.from_bytes(hashlib.blake2b(k.encode(), digest_size=6).digest(), "big")
        for k in np.unique(text)
    }
    if len(set(mapping.values())) != len(mapping):
        raise IngestError("two exposure keys hash to the same expid: give integer expids")
    return np.array([mapping[k] for k in text], dtype=np.int64), mapping


# --- validation -------------------------------------------------------------------------


class _Reasons:
    """The first reason each row is rejected for."""

    def __init__(self, n: int) -> None:
        self.reason = np.full(n, "", dtype=object)

    def reject(self, rows: np.ndarray, reason: str) -> None:
        self.reason[rows & (self.reason == "")] = reason

    @property
    def ok(self) -> np.ndarray:
        return self.reason == ""


def _times(values: dict[str, tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    if "mjd" not in values and "date_obs" not in values:
        return np.full(n, np.nan)  # the night is given (--night)
    if "mjd" in values:
        return values["mjd"][0]
    raw, mask = values["date_obs"]
    text = np.array([str(t) for t in raw])
    parsed = {t: _iso_mjd(t) for t in np.unique(text[~mask])}
    return np.array([np.nan if m else parsed[t] for t, m in zip(text, mask, strict=True)])


def _iso_mjd(text: str) -> float:
    try:
        return float(Time(text, format="isot", scale="utc").mjd)
    except ValueError:
        return float("nan")


def _match(
    values: dict[str, tuple[np.ndarray, np.ndarray]],
    refcat: RefCatalog,
    reasons: _Reasons,
    radius_arcsec: float,
) -> tuple[np.ndarray, np.ndarray]:
    """source_id per row (-1 where none) and the match distance, arcsec (NaN
    when the table gives source_id)."""
    n = len(reasons.reason)
    if "source_id" in values:
        raw, mask = values["source_id"]
        reasons.reject(mask, "missing source_id")
        ids = np.full(n, -1, dtype=np.int64)
        good = ~mask
        try:
            ids[good] = np.asarray(raw[good]).astype(np.int64)
        except (TypeError, ValueError):
            for i in np.nonzero(good)[0]:
                try:
                    ids[i] = int(raw[i])
                except (TypeError, ValueError):
                    reasons.reject(np.arange(n) == i, "source_id is not an integer")
        known = refcat.rows_of(ids) >= 0
        reasons.reject(~known, "unknown star: source_id not in the reference catalog")
        return ids, np.full(n, np.nan)
    ra, ra_bad = values["ra"]
    dec, dec_bad = values["dec"]
    reasons.reject(ra_bad | dec_bad, "missing ra/dec")
    ids = np.full(n, -1, dtype=np.int64)
    dist = np.full(n, np.nan)
    good = ~(ra_bad | dec_bad)
    if good.any() and len(refcat):
        rows = SkyCoord(ra[good] * u.deg, dec[good] * u.deg)
        cat = SkyCoord(np.asarray(refcat.ra) * u.deg, np.asarray(refcat.dec) * u.deg)
        nearest, sep, _ = rows.match_to_catalog_sky(cat)
        dist[good] = sep.arcsec
        ids[good] = np.asarray(refcat.source_id)[nearest]
    far = good & ~(dist <= radius_arcsec)
    reasons.reject(far, f"unknown star: no reference star within {radius_arcsec:g} arcsec")
    return ids, dist


def _per_exposure_consistency(
    expid: np.ndarray, values: dict[str, tuple[np.ndarray, np.ndarray]], reasons: _Reasons
) -> None:
    """A per-exposure value must be the same on every row of the exposure; rows
    disagreeing with the exposure's most common value are rejected."""
    for name in _PER_EXPOSURE:
        if name not in values:
            continue
        v = values[name][0]
        rows = np.nonzero(reasons.ok & np.isfinite(v))[0]
        if not len(rows):
            continue
        keys, vals = expid[rows], v[rows]
        order = np.lexsort((vals, keys))
        k, x = keys[order], vals[order]
        starts = np.r_[True, (k[1:] != k[:-1]) | (x[1:] != x[:-1])]
        run_len = np.bincount(np.cumsum(starts) - 1)
        run_key, run_val = k[starts], x[starts]
        by_key = np.lexsort((-run_len, run_key))  # per exposure, its longest run first
        first = np.r_[True, run_key[by_key][1:] != run_key[by_key][:-1]]
        mode_key, mode_val = run_key[by_key][first], run_val[by_key][first]
        common = mode_val[np.searchsorted(mode_key, keys)]
        bad = np.zeros(len(expid), bool)
        bad[rows[vals != common]] = True
        reasons.reject(bad, f"{name} differs from the value of the exposure's other rows")


def _duplicates(expid: np.ndarray, source: np.ndarray, dist: np.ndarray, reasons: _Reasons) -> None:
    """One observation of a star per exposure: the nearer match (or the first
    row) is kept, the others rejected."""
    ok = np.nonzero(reasons.ok)[0]
    order = ok[np.lexsort((np.nan_to_num(dist[ok], nan=0.0), source[ok], expid[ok]))]
    key = np.stack([expid[order], source[order]], axis=1)
    repeat = np.zeros(len(order), bool)
    repeat[1:] = np.all(key[1:] == key[:-1], axis=1)
    dup = np.zeros(len(expid), bool)
    dup[order[repeat]] = True
    reasons.reject(dup, "duplicate: the star is already observed in this exposure")


def validate_rows(
    table: Table,
    values: dict[str, tuple[np.ndarray, np.ndarray]],
    refcat: RefCatalog,
    config: IngestConfig,
    *,
    need_time: bool = True,
) -> tuple[_Reasons, dict[str, np.ndarray]]:
    """Reasons per row and the columns of the catalog, in contract units
    (``need_time`` False: the night is given, a missing time stamp is no fault)."""
    n = len(table)
    reasons = _Reasons(n)
    keys, key_missing = values["expid"]
    reasons.reject(key_missing, "missing expid")
    for name in ("x", "y"):
        reasons.reject(values[name][1], f"missing {name}")
    quad_nx, quad_ny = values["quad_nx"][0], values["quad_ny"][0]
    x, y = values["x"][0], values["y"][0]
    reasons.reject(~(quad_nx >= 1) | ~(quad_ny >= 1), "quad_nx/quad_ny missing or < 1")
    reasons.reject((x < -0.5) | (x > quad_nx - 0.5), "x outside the quadrant (0..quad_nx)")
    reasons.reject((y < -0.5) | (y > quad_ny - 0.5), "y outside the quadrant (0..quad_ny)")
    quadrant = values["quadrant"][0] if "quadrant" in values else np.zeros(n)
    reasons.reject(
        ~np.isin(quadrant, np.arange(N_QUADRANTS)), f"quadrant not an integer 0..{N_QUADRANTS - 1}"
    )
    for name in _INTEGER:
        if name in values and name not in ("quadrant", "quad_nx", "quad_ny"):
            v = values[name][0]
            reasons.reject(np.isfinite(v) & (v != np.round(v)), f"{name} is not an integer")
    if "flux" in values:
        flux, flux_err = values["flux"][0], values["flux_err"][0]
        exptime = values["exptime"][0]
        reasons.reject(~np.isfinite(flux), "non-finite or missing flux")
        reasons.reject(flux <= 0, "non-positive flux (no magnitude)")
        reasons.reject(~np.isfinite(flux_err), "non-finite or missing flux_err")
        reasons.reject(flux_err < 0, "negative flux_err")
        reasons.reject(flux_err == 0, "zero flux_err (infinite weight)")
        reasons.reject(~(exptime > 0), "exptime missing or not > 0")
    else:
        mag, mag_err = values["mag"][0], values["mag_err"][0]
        reasons.reject(~np.isfinite(mag), "non-finite or missing mag")
        reasons.reject(~np.isfinite(mag_err), "non-finite or missing mag_err")
        reasons.reject(mag_err < 0, "negative mag_err")
        reasons.reject(mag_err == 0, "zero mag_err (infinite weight)")
    mjd = _times(values, n)
    if need_time:
        reasons.reject(~np.isfinite(mjd), "missing or unreadable mjd/date_obs")
    expid, mapping = expid_integers(keys)
    source, dist = _match(values, refcat, reasons, config.match_radius_arcsec)
    _per_exposure_consistency(expid, values, reasons)
    _duplicates(expid, source, dist, reasons)
    cols = {
        "expid": expid,
        "source_id": source,
        "match_arcsec": dist,
        "quadrant": quadrant,
        "x": x,
        "y": y,
        "mjd": mjd,
        "quad_nx": quad_nx,
        "quad_ny": quad_ny,
    }
    for name in ("flux", "flux_err", "mag", "mag_err", "exptime", "flags", *_OPTIONAL_NAN):
        cols[name] = values[name][0] if name in values else np.full(n, np.nan)
    cols["expid_key"] = np.array([str(k) for k in keys], dtype=object)
    cols["_mapping"] = mapping  # type: ignore[assignment]
    return reasons, cols


# --- writing ----------------------------------------------------------------------------


def _exposure_result(
    rows: np.ndarray, cols: dict[str, Any], band: str, path: str
) -> ExposureResult:
    first = rows[0]
    exptime = float(cols["exptime"][first])
    if np.isfinite(cols["flux"][rows]).all():
        flux, flux_err = cols["flux"][rows], cols["flux_err"][rows]
        mag, mag_err = instrumental_magnitudes(flux, flux_err, exptime)
    else:
        mag, mag_err = cols["mag"][rows], cols["mag_err"][rows]
        # Flux on the magnitude's scale (1 count/s at m = 0), for the contract's columns.
        scale = exptime if np.isfinite(exptime) else 1.0
        flux = 10.0 ** (-0.4 * mag) * scale
        flux_err = flux * mag_err * np.log(10.0) / 2.5
    flags = np.nan_to_num(cols["flags"][rows], nan=0.0).astype(np.int64)
    quadrant = cols["quadrant"][rows].astype(np.int64)
    n = len(rows)
    catalog = xr.Dataset(
        {
            "expid": ("obs", cols["expid"][rows]),
            "quadrant": ("obs", quadrant),
            "source_id": ("obs", cols["source_id"][rows]),
            "x": ("obs", cols["x"][rows].astype(np.float64)),
            "y": ("obs", cols["y"][rows].astype(np.float64)),
            "flux": ("obs", flux.astype(np.float64)),
            "flux_err": ("obs", flux_err.astype(np.float64)),
            "mag_inst": ("obs", mag.astype(np.float64)),
            "mag_inst_err": ("obs", mag_err.astype(np.float64)),
            "flags": ("obs", flags),
            # Unknown for another pipeline's photometry: taken as none.
            "contamination": ("obs", np.zeros(n, dtype=np.float32)),
        },
        attrs={"quad_nx": int(cols["quad_nx"][first]), "quad_ny": int(cols["quad_ny"][first])},
    )
    row: dict[str, Any] = {
        "expid": int(cols["expid"][first]),
        "mjd": float(np.nanmedian(cols["mjd"][rows]))
        if np.isfinite(cols["mjd"][rows]).any()
        else float("nan"),
        "band": band,
        "airmass": float(cols["airmass"][first]),
        "exptime_s": exptime,
        "out_temp_c": float(cols["out_temp_c"][first]),
        "out_rhum_pct": float(cols["out_rhum_pct"][first]),
        "wind_mps": float(cols["wind_mps"][first]),
        "bias_period": "",
        "flat_period": "",
        "quadrants": {
            int(q): {
                "n_stars": float(np.count_nonzero(quadrant == q)),
                "n_clean": float(np.count_nonzero((quadrant == q) & (flags == 0))),
            }
            for q in np.unique(quadrant)
        },
    }
    return ExposureResult(catalog=catalog, row=row, path=path)


def _rejected_dataset(rows: np.ndarray, reasons: _Reasons, cols: dict[str, Any]) -> xr.Dataset:
    return xr.Dataset(
        {
            "row": ("rejected", rows.astype(np.int64)),
            "reason": ("rejected", reasons.reason[rows].astype(object)),
            "expid_key": ("rejected", cols["expid_key"][rows]),
            "source_id": ("rejected", cols["source_id"][rows]),
            "match_arcsec": ("rejected", cols["match_arcsec"][rows]),
        },
        attrs={
            "meaning": "rows of the ingested table (0-based) that were not ingested, and why; "
            "match_arcsec: distance to the nearest reference star (ra/dec matching)"
        },
    )


def ingest_table(
    path: str | os.PathLike,
    store: str,
    *,
    band: str,
    refcat_path: str | os.PathLike,
    night: str | None = None,
    columns: Mapping[str, str] | None = None,
    constants: Mapping[str, str] | None = None,
    site_longitude_deg: float,
    config: IngestConfig | None = None,
    photometry: PhotometryConfig | None = None,
    overwrite: bool = False,
) -> IngestResult:
    """Ingest one photometry table into ``store``.

    Parameters
    ----------
    path : path
        The table (FITS, ECSV, CSV or Parquet; :func:`read_table`).
    store : str
        The photocal store.
    band : {'g', 'r', 'i'}
        The band of every row (the reference catalog's magnitudes it is tied to).
    refcat_path : path
        Reference catalog: sources are checked (or matched by ra/dec) against it,
        and the classical zero points computed with it.
    night : str, optional
        YYYY-MM-DD for every row; default: from each row's time and the site.
    columns : mapping, optional
        Contract name -> column (``--column``).
    constants : mapping, optional
        Contract name -> value for the whole table (``--set``).
    site_longitude_deg : float
        East-positive site longitude, for the night of each row.
    config, photometry : optional
        The ``[ingest]`` and ``[photometry]`` tables (zero-point settings).
    overwrite : bool
        Replace a night's existing catalog; without it, a night that already has
        one is refused (nothing written is lost).

    Raises
    ------
    IngestError
        When the table cannot be read or a contract value has no source.
    """
    path = os.fspath(path)
    if band not in BANDS:
        raise IngestError(f"--band {band!r}: the reference catalog has {', '.join(BANDS)}")
    config = config or IngestConfig()
    photometry = photometry or PhotometryConfig()
    columns, constants = dict(columns or {}), dict(constants or {})
    table = read_table(path)
    mapping = resolve_columns(table, columns, constants, path, need_time=night is None)
    refcat = read_refcat(refcat_path)
    values = _values(table, mapping, constants)
    reasons, cols = validate_rows(table, values, refcat, config, need_time=night is None)
    nights = np.full(len(table), UNKNOWN_NIGHT if night is None else night, dtype=object)
    timed = np.isfinite(cols["mjd"])
    if night is None and timed.any():
        mjds, which = np.unique(cols["mjd"][timed], return_inverse=True)
        labels = np.array([observing_night(float(m), site_longitude_deg) for m in mjds], object)
        nights[timed] = labels[which]
    result: dict[str, dict[str, Any]] = {}
    for name in sorted(set(nights) - {UNKNOWN_NIGHT}):
        in_night = nights == name
        group = groups.catalog(name)
        if not overwrite and group_exists(store, group):
            stage = read_group(store, group, load=False).attrs.get("stage", "?")
            raise IngestError(
                f"{store}: {group} already exists (written by {stage}); pass --overwrite "
                "to replace it"
            )
        result[name] = _write_night(
            store, name, in_night, reasons, cols, band=band, path=path, refcat=refcat,
            refcat_path=os.fspath(refcat_path), mapping=mapping, constants=constants,
            config=config, photometry=photometry,
        )  # fmt: skip
    unassigned = nights == UNKNOWN_NIGHT
    if unassigned.any():
        write_group(
            store,
            groups.rejected(UNKNOWN_NIGHT),
            _rejected_dataset(np.nonzero(unassigned)[0], reasons, cols),
            attrs=provenance("ingest", config=config, inputs=[os.path.abspath(path)]),
        )
    return IngestResult(
        table=path,
        nights=result,
        rejected=Counter(str(r) for r in reasons.reason if r),
        columns=mapping,
    )


def _write_night(
    store: str,
    night: str,
    in_night: np.ndarray,
    reasons: _Reasons,
    cols: dict[str, Any],
    *,
    band: str,
    path: str,
    refcat: RefCatalog,
    refcat_path: str,
    mapping: dict[str, str],
    constants: dict[str, str],
    config: IngestConfig,
    photometry: PhotometryConfig,
) -> dict[str, Any]:
    good = np.nonzero(in_night & reasons.ok)[0]
    bad = np.nonzero(in_night & ~reasons.ok)[0]
    attrs = provenance(
        "ingest",
        config={"ingest": config, "photometry": photometry},
        inputs=[os.path.abspath(path)],
        night=night,
        band=band,
        refcat=os.path.abspath(refcat_path),
        columns=mapping,
        constants=constants,
        expid_keys=_night_keys(cols, good),
        rows={"ingested": len(good), "rejected": len(bad)},
        rejected_group=groups.rejected(night),
        magnitude_convention="m_inst = -2.5 log10(flux / exptime), or the table's mag as given",
        image_qa="none: the table carries no images (no patches, no reduced images)",
    )
    write_group(store, groups.rejected(night), _rejected_dataset(bad, reasons, cols), attrs=attrs)
    if not len(good):
        return {"exposures": 0, "observations": 0, "rejected": len(bad)}
    good = good[np.argsort(cols["expid"][good], kind="stable")]
    starts = np.flatnonzero(np.r_[True, np.diff(cols["expid"][good]) != 0])
    results = [_exposure_result(rows, cols, band, path) for rows in np.split(good, starts[1:])]
    shapes = {(r.catalog.attrs["quad_nx"], r.catalog.attrs["quad_ny"]) for r in results}
    if len(shapes) != 1:
        raise IngestError(f"{path}: night {night} mixes quadrant sizes {sorted(shapes)}")
    catalog, exposures = night_groups(results, refcat, photometry)
    write_group(store, groups.catalog(night), catalog, attrs=attrs)
    write_group(store, groups.exposures(night), exposures, attrs=attrs)
    return {
        "exposures": int(exposures.sizes["exposure"]),
        "observations": int(catalog.sizes["obs"]),
        "rejected": len(bad),
    }


def _night_keys(cols: dict[str, Any], rows: np.ndarray) -> dict[str, int] | None:
    mapping = cols["_mapping"]
    if mapping is None:
        return None
    keys = set(cols["expid_key"][rows])
    return {k: v for k, v in mapping.items() if k in keys}


def parse_assignments(items: list[str] | None, option: str) -> dict[str, str]:
    """``NAME=VALUE`` strings (``--column``, ``--set``) as a mapping."""
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise IngestError(f"{option} {item!r}: expected NAME=VALUE")
        out[name.strip()] = value.strip()
    return out


def ingest_summary_lines(result: IngestResult, store: str) -> list[str]:
    """What ``photocal ingest`` prints."""
    lines = [f"{result.table} -> {store}"]
    for night, counts in result.nights.items():
        lines.append(
            f"  {groups.night(night)}: {counts['exposures']} exposures, "
            f"{counts['observations']} observations, {counts['rejected']} rows rejected "
            f"({groups.rejected(night)})"
        )
    if result.rejected:
        lines.append(f"rejected rows ({result.n_rejected}):")
        lines += [f"  {n:6d}  {reason}" for reason, n in result.rejected.most_common(12)]
        if len(result.rejected) > 12:
            lines.append(f"  ... and {len(result.rejected) - 12} other reasons")
    return lines
