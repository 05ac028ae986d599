"""Index stage: find raw files, validate them, group them by observing night and
write ``index/<night>`` (BRIEF §4), rejected files included with their reasons."""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from astropy.io import fits
from prefect import get_run_logger, task
from pydantic import Field

from tasks.config import StageConfig
from tasks.io import groups
from tasks.io.groups import UNKNOWN_NIGHT
from tasks.io.night import PALOMAR_LONGITUDE_DEG, observing_night
from tasks.io.provenance import provenance
from tasks.io.raw import RawFileError, validate_file
from tasks.io.store import list_groups, write_group

_SKIPPED_SUFFIXES = (".part", ".tmp", ".lock")


class IndexConfig(StageConfig, table="index"):
    """Configuration of the index stage."""

    site_longitude_deg: float = Field(
        PALOMAR_LONGITUDE_DEG,
        ge=-180.0,
        le=360.0,
        description="East-positive site longitude; the observing night is derived from "
        "MJD-OBS and this longitude (local noon to local noon).",
    )
    files_per_task: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Raw files validated by one Prefect task; tens of tasks per night.",
    )


def find_raw_files(raw_root: str | os.PathLike) -> list[str]:
    """Every candidate raw file under ``raw_root``, recursively, as sorted paths
    relative to it. Names carry no meaning; hidden files and files still being
    written (``.part``/``.tmp``) are skipped."""
    root = Path(raw_root)
    if not root.is_dir():
        raise FileNotFoundError(f"raw root {root} is not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or name.endswith(_SKIPPED_SUFFIXES):
                continue
            found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def index_row(raw_root: str, relpath: str, site_longitude_deg: float) -> dict[str, Any]:
    """Validate one file; a row of the night index, status ``ok`` or ``rejected``."""
    row: dict[str, Any] = {
        "path": relpath,
        "expid": -1,
        "imagetyp": "",
        "filter": "",
        "mjd": math.nan,
        "exptime_s": math.nan,
        "led_id": -1,
        "n_quadrants": 0,
        "status": "ok",
        "reason": "",
        "night": UNKNOWN_NIGHT,
        "geometry": (),
    }
    full = os.path.join(raw_root, relpath)
    try:
        exp = validate_file(full)
    except RawFileError as err:
        row.update(status="rejected", reason=err.reason)
        # Keep what is readable so the rejection can be placed in its night.
        row.update(_salvage_primary(full))
        if math.isfinite(row["mjd"]):
            row["night"] = observing_night(row["mjd"], site_longitude_deg)
        return row
    h = exp.header
    row.update(
        expid=h.expid,
        imagetyp=h.imagetyp,
        filter=h.band or "",
        mjd=h.mjd,
        exptime_s=h.exptime_s,
        led_id=-1 if h.led_id is None else h.led_id,
        n_quadrants=len(exp.quadrants),
        night=observing_night(h.mjd, site_longitude_deg),
        geometry=tuple(
            (q.extname, *_extent(q.datasec), *_extent(q.biassec)) for q in exp.quadrants
        ),
    )
    return row


def _extent(section: tuple[slice, slice]) -> tuple[int, int]:
    return section[0].stop - section[0].start, section[1].stop - section[1].start


def _salvage_primary(path: str) -> dict[str, Any]:
    try:
        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
            hdr = hdul[0].header
            out: dict[str, Any] = {}
            mjd = hdr.get("MJD-OBS")
            if isinstance(mjd, (int, float)) and not isinstance(mjd, bool):
                out["mjd"] = float(mjd)
            expid = hdr.get("EXPID")
            if isinstance(expid, int) and not isinstance(expid, bool):
                out["expid"] = expid
            return out
    except Exception:
        return {}


def mark_duplicate_expids(rows: list[dict[str, Any]]) -> None:
    """A second file with an EXPID already seen is rejected (first by path wins)."""
    seen: dict[int, str] = {}
    for row in sorted(rows, key=lambda r: r["path"]):
        if row["status"] != "ok":
            continue
        if row["expid"] in seen:
            row.update(
                status="rejected", reason=f"EXPID {row['expid']} duplicates {seen[row['expid']]}"
            )
        else:
            seen[row["expid"]] = row["path"]


def mark_odd_geometry(rows: list[dict[str, Any]]) -> None:
    """Within a night, a file whose quadrants (names, data and overscan sizes)
    differ from the most common layout is rejected: masters and reduction stack
    and subtract quadrants of one shape. Ties go to the layout of the first path."""
    by_night: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r["path"]):
        if row["status"] == "ok":
            by_night[row["night"]].append(row)
    for night_rows in by_night.values():
        counts = Counter(r["geometry"] for r in night_rows)
        common = max(counts, key=counts.__getitem__)  # first seen wins ties
        for row in night_rows:
            if row["geometry"] != common:
                row.update(
                    status="rejected",
                    reason=f"quadrant layout {_describe(row['geometry'])} differs from the "
                    f"night's {_describe(common)} ({counts[common]} files)",
                )


def _describe(geometry: tuple[tuple[Any, ...], ...]) -> str:
    shapes = sorted({g[1:] for g in geometry})
    if len(shapes) == 1:
        ny, nx, _, nb = shapes[0]
        return f"{len(geometry)} quadrants of {ny}x{nx} + {nb} overscan columns"
    return f"{len(geometry)} quadrants of mixed sizes"


def rows_to_dataset(rows: list[dict[str, Any]]) -> xr.Dataset:
    rows = sorted(rows, key=lambda r: r["path"])
    col = lambda k, dtype: ("file", np.array([r[k] for r in rows], dtype=dtype))  # noqa: E731
    return xr.Dataset(
        {
            "path": col("path", object),
            "expid": col("expid", np.int64),
            "imagetyp": col("imagetyp", object),
            "filter": col("filter", object),
            "mjd": col("mjd", np.float64),
            "exptime_s": col("exptime_s", np.float64),
            "led_id": col("led_id", np.int64),
            "n_quadrants": col("n_quadrants", np.int64),
            "status": col("status", object),
            "reason": col("reason", object),
        }
    )


def group_by_night(
    rows: list[dict[str, Any]], nights: list[str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Rows per night (duplicates and odd quadrant layouts marked first); only
    ``nights`` when given, but
    files whose night is unknown are always kept so their rejection is recorded."""
    mark_duplicate_expids(rows)
    mark_odd_geometry(rows)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if nights is None or r["night"] in nights or r["night"] == UNKNOWN_NIGHT:
            out[r["night"]].append(r)
    return dict(sorted(out.items()))


@task(name="find-raw-files", retries=2, retry_delay_seconds=2)
def find_raw_files_task(raw_root: str) -> list[str]:
    files = find_raw_files(raw_root)
    get_run_logger().info("found %d candidate raw files under %s", len(files), raw_root)
    return files


@task(name="validate-raw-files", retries=2, retry_delay_seconds=2)
def validate_files_task(
    raw_root: str, relpaths: list[str], config: IndexConfig
) -> list[dict[str, Any]]:
    """Validate a chunk of files; returns one small row per file."""
    rows = [index_row(raw_root, p, config.site_longitude_deg) for p in relpaths]
    logger = get_run_logger()
    for r in rows:
        if r["status"] == "rejected":
            logger.warning("rejected %s: %s", os.path.join(raw_root, r["path"]), r["reason"])
    return rows


@task(name="group-by-night")
def group_by_night_task(
    chunks: list[list[dict[str, Any]]], nights: list[str] | None
) -> dict[str, list[dict[str, Any]]]:
    return group_by_night([r for chunk in chunks for r in chunk], nights)


def _index_attrs(
    night: str, raw_root: str, rows: list[dict[str, Any]], config: IndexConfig
) -> dict[str, Any]:
    return provenance(
        "index",
        config=config,
        inputs=sorted(r["path"] for r in rows),
        night=night,
        raw_root=str(Path(raw_root).resolve()),
    )


@task(name="write-night-index", retries=2, retry_delay_seconds=2)
def write_index_task(
    store: str, night: str, raw_root: str, rows: list[dict[str, Any]], config: IndexConfig
) -> dict[str, int]:
    """Write ``index/<night>``; returns counts by status."""
    ds = rows_to_dataset(rows)
    write_group(
        store,
        groups.index(night),
        ds,
        attrs=_index_attrs(night, raw_root, rows, config),
    )
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    return dict(counts)


@task(name="indexed-nights")
def indexed_nights_task(store: str, nights: list[str] | None) -> list[str]:
    """The requested nights that have an index (all indexed nights by default)."""
    have = [n for n in list_groups(store, groups.INDEX) if n != UNKNOWN_NIGHT]
    return have if nights is None else [n for n in have if n in nights]


def index_sequentially(raw_root: str, store: str, config: IndexConfig | None = None) -> list[str]:
    """The index stage without Prefect or Dask (benchmarks, debugging); returns the
    nights written."""
    config = config or IndexConfig()
    rows = [index_row(raw_root, p, config.site_longitude_deg) for p in find_raw_files(raw_root)]
    by_night = group_by_night(rows)
    for night, night_rows in by_night.items():
        write_group(
            store,
            groups.index(night),
            rows_to_dataset(night_rows),
            attrs=_index_attrs(night, raw_root, night_rows, config),
        )
    return list(by_night)
