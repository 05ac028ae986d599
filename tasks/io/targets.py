"""The lightcurves stage's targets table (``--targets``; docs/lightcurves.md).

An ECSV, CSV or FITS table (the format is read from the content, not the name)
with one row per transient:

==================  =========================================================
column              meaning
==================  =========================================================
name                unique; becomes the group ``lightcurves/<name>``
ra, dec             deg (ICRS)
no_flux_before      optional, MJD: epochs before it hold no transient light
no_flux_after       optional, MJD: epochs after it hold none (faded)
==================  =========================================================

Without ``no_flux_*`` the baseline epochs are found from the light curve itself
(:func:`calib.scene.choose_baseline`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from tasks.io.store import _check_group_name

__all__ = ["Target", "TargetsError", "read_targets"]


class TargetsError(ValueError):
    """The targets table cannot be used; the message names the file and the row."""


@dataclass(frozen=True)
class Target:
    name: str
    ra_deg: float
    dec_deg: float
    no_flux_before: float = float("nan")
    no_flux_after: float = float("nan")

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "ra": self.ra_deg,
            "dec": self.dec_deg,
            "no_flux_before": self.no_flux_before,
            "no_flux_after": self.no_flux_after,
        }


def _read(path: str) -> Table:
    try:
        with open(path, "rb") as stream:
            start = stream.read(80)
    except OSError as err:
        raise TargetsError(f"{path}: targets table cannot be read: {err.strerror}") from None
    try:
        if start.startswith(b"SIMPLE  ="):
            return Table.read(path, format="fits")
        if start.lstrip().startswith(b"# %ECSV"):
            return Table.read(path, format="ascii.ecsv")
        return Table.read(path, format="ascii.csv")
    except Exception as err:  # astropy raises many types for malformed tables
        raise TargetsError(f"{path}: targets table is not ECSV, CSV or FITS: {err}") from None


def read_targets(path: str | os.PathLike) -> list[Target]:
    """Read and check a targets table.

    Raises
    ------
    TargetsError
        Unreadable file, missing column, duplicate or unusable name, coordinates
        outside their range or not finite; the message names the file and row.
    """
    path = os.fspath(path)
    table = _read(path)
    cols = {c.lower(): c for c in table.colnames}
    for need in ("name", "ra", "dec"):
        if need not in cols:
            raise TargetsError(
                f"{path}: targets table: column {need!r} missing (have {table.colnames})"
            )
    out: list[Target] = []
    seen: set[str] = set()

    def value(row, key: str) -> float:
        if key not in cols:
            return float("nan")
        v = row[cols[key]]
        return float("nan") if np.ma.is_masked(v) else float(v)

    for i, row in enumerate(table):
        where = f"{path}: targets row {i + 1}"
        name = str(row[cols["name"]]).strip()
        try:
            _check_group_name(name)
        except ValueError:
            raise TargetsError(
                f"{where}: name {name!r} must be letters, digits, '_', '-' or '.'"
            ) from None
        if name in seen:
            raise TargetsError(f"{where}: name {name!r} appears twice")
        seen.add(name)
        try:
            ra, dec = value(row, "ra"), value(row, "dec")
        except (TypeError, ValueError):
            raise TargetsError(f"{where}: ra/dec are not numbers") from None
        if not (np.isfinite(ra) and 0.0 <= ra < 360.0):
            raise TargetsError(f"{where}: ra = {ra} is not in [0, 360) deg")
        if not (np.isfinite(dec) and -90.0 <= dec <= 90.0):
            raise TargetsError(f"{where}: dec = {dec} is not in [-90, 90] deg")
        out.append(Target(name, ra, dec, value(row, "no_flux_before"), value(row, "no_flux_after")))
    if not out:
        raise TargetsError(f"{path}: targets table has no rows")
    return out
