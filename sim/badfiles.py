"""Damaged raw files, as a real night sometimes holds: a transfer cut short, a
header written by a misconfigured sequencer, a stray non-FITS file, a frame type
the pipeline does not know, a readout with a wrong geometry, a dead amplifier, a
file copied twice; and a reference catalog missing columns.

Each is derived from a good simulated exposure and given its own EXPID (except
``duplicate_expid``, a copy under another name), so the pipeline must reject it
for the stated reason while indexing the rest.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

BAD_EXPID_BASE = 900_000_000

#: The kinds ``photocal simulate --bad-files`` and the demo write.
DEMO_KINDS = ("truncated", "missing_keyword", "not_fits", "unknown_imagetyp", "bad_section")

_Damage = Callable[[fits.HDUList], None]


def _drop(key: str) -> _Damage:
    def damage(hdul: fits.HDUList) -> None:
        del hdul[0].header[key]

    return damage


def _set(key: str, value: object) -> _Damage:
    def damage(hdul: fits.HDUList) -> None:
        hdul[0].header[key] = value

    return damage


def _bad_section(hdul: fits.HDUList) -> None:
    h = hdul[1].header
    h["DATASEC"] = f"[1:{h['NAXIS1'] + 40},1:{h['NAXIS2']}]"


def _wrong_bitpix(hdul: fits.HDUList) -> None:
    # A sequencer writing signed 32-bit integers: the values fit, the type does not.
    hdul[1] = fits.ImageHDU(hdul[1].data.astype(np.int32), header=hdul[1].header)


def _wrong_shape(hdul: fits.HDUList) -> None:
    # Two reads of the quadrant stacked into a cube.
    hdu = hdul[1]
    hdul[1] = fits.ImageHDU(np.stack([hdu.data, hdu.data]), header=hdu.header)


def _wrong_geometry(hdul: fits.HDUList) -> None:
    # A consistent file from a readout mode with half the rows: valid on its own,
    # but it cannot be stacked with the night's other frames.
    for i in range(1, len(hdul)):
        h = hdul[i].header
        ny = h["NAXIS2"]
        half = hdul[i].data[: ny // 2]
        for key in ("DATASEC", "BIASSEC", "DETSEC"):
            x, y = h[key].strip("[]").split(",")
            y1 = int(y.split(":")[0])
            h[key] = f"[{x},{y1}:{y1 + ny // 2 - 1}]"
        hdul[i] = fits.ImageHDU(half, header=h)


def _all_nan_quadrant(hdul: fits.HDUList) -> None:
    # A float file (accepted as a courtesy) whose second quadrant is all NaN.
    for i in range(1, len(hdul)):
        hdul[i] = fits.ImageHDU(hdul[i].data.astype(np.float32), header=hdul[i].header)
        for key in ("BZERO", "BSCALE"):
            hdul[i].header.remove(key, ignore_missing=True)
    hdul[2].data[:] = np.nan


def _all_zero_quadrant(hdul: fits.HDUList) -> None:
    # A dead amplifier: the readout delivers zeros.
    hdul[2].data[:] = 0


# kind -> (frame type it is derived from, damage applied to a copy of it).
_HEADER_KINDS: dict[str, tuple[str, _Damage]] = {
    "missing_keyword": ("BIAS", _drop("MJD-OBS")),
    "unknown_imagetyp": ("BIAS", _set("IMAGETYP", "FOCUS")),
    "bad_section": ("BIAS", _bad_section),
    "mistyped_keyword": ("SCIENCE", _set("EXPTIME", "thirty")),
    "wrong_bitpix": ("BIAS", _wrong_bitpix),
    "wrong_shape": ("BIAS", _wrong_shape),
    "wrong_geometry": ("BIAS", _wrong_geometry),
    "all_nan_quadrant": ("SCIENCE", _all_nan_quadrant),
    "all_zero_quadrant": ("SCIENCE", _all_zero_quadrant),
    "flat_without_ledid": ("FLAT", _drop("LEDID")),
    "unknown_filter": ("SCIENCE", _set("FILTER", "z")),
}
ALL_KINDS = (
    *DEMO_KINDS,
    "random_bytes",
    "mistyped_keyword",
    "wrong_bitpix",
    "wrong_shape",
    "wrong_geometry",
    "all_nan_quadrant",
    "all_zero_quadrant",
    "duplicate_expid",
    "flat_without_ledid",
    "unknown_filter",
)
# The demo's kinds keep the EXPIDs they have always had; the others follow.
_EXPID_OFFSET = {"truncated": 1, "missing_keyword": 2, "unknown_imagetyp": 3, "bad_section": 4}


def write_bad_files(
    raw_root: Path,
    science: Path,
    bias: Path,
    flat: Path | None = None,
    *,
    kinds: tuple[str, ...] = DEMO_KINDS,
) -> dict[str, Path]:
    """Write one bad file of each kind next to the good ones.

    Parameters
    ----------
    raw_root : Path
        Root of the raw tree.
    science, bias, flat : Path
        Good files to derive the damaged ones from (never modified); ``flat`` is
        needed by ``flat_without_ledid`` only.
    kinds : tuple of str
        Which kinds (:data:`ALL_KINDS`); by default the demo's five.

    Returns
    -------
    dict
        Kind -> path, ``raw_root/damaged/bad_<kind>.fits``.
    """
    unknown = sorted(set(kinds) - set(ALL_KINDS))
    if unknown:
        raise ValueError(f"unknown bad-file kinds {unknown}; known: {list(ALL_KINDS)}")
    sources = {"SCIENCE": science, "BIAS": bias, "FLAT": flat}
    out_dir = raw_root / "damaged"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / f"bad_{k}.fits" for k in kinds}
    for n, kind in enumerate(ALL_KINDS, start=1):
        if kind not in kinds:
            continue
        path = paths[kind]
        if kind == "not_fits":
            path.write_text("SIMPLE = this is a log file someone saved with a .fits name\n")
        elif kind == "random_bytes":
            path.write_bytes(np.random.default_rng(n).bytes(3 * 2880))
        elif kind == "duplicate_expid":
            shutil.copyfile(science, path)
        elif kind == "truncated":
            _write_damaged(science, path, BAD_EXPID_BASE + 1, lambda _: None)
            data = path.read_bytes()
            path.write_bytes(data[: len(data) - 5 * 2880 - 123])
        else:
            source, damage = _HEADER_KINDS[kind]
            if sources[source] is None:
                raise ValueError(f"bad-file kind {kind!r} needs a good {source} file")
            expid = BAD_EXPID_BASE + _EXPID_OFFSET.get(kind, 10 + n)
            _write_damaged(sources[source], path, expid, damage)
    return paths


def _write_damaged(source: Path, path: Path, expid: int, damage: _Damage) -> None:
    with fits.open(source) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    hdul[0].header["EXPID"] = expid
    damage(hdul)
    hdul.writeto(path, overwrite=True)


def write_refcat_missing_columns(
    refcat: Path, path: Path, missing: tuple[str, ...] = ("g_mag", "bp_rp")
) -> Path:
    """Copy the reference catalog ``refcat`` to ``path`` without the ``missing`` columns."""
    table = Table.read(refcat)
    table.remove_columns(list(missing))
    table.write(path, overwrite=True)
    return path
