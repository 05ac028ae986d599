"""Read and validate raw multi-extension FITS exposures and reference catalogs.

The input contract is ``docs/raw-fits.md``: one file per exposure, a header-only
primary HDU and one image extension per readout quadrant. :func:`validate_file`
checks a file against that contract from its headers and a sample of each data
section's rows (to reject dead, constant quadrants; float files are read in full,
to reject all-non-finite data sections); :func:`read_quadrants`
returns the pixels of validated quadrants split into data and overscan.

Every problem with a file raises :class:`RawFileError`, whose message is one line
naming the file, the HDU and the keyword.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.units import UnitsWarning
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS, FITSFixedWarning

__all__ = [
    "IMAGETYP_ALIASES",
    "REFCAT_COLUMNS",
    "ExposureHeader",
    "QuadrantFrame",
    "QuadrantHeader",
    "RawExposure",
    "RawFileError",
    "RefCatalog",
    "iter_quadrants",
    "parse_section",
    "read_overscan",
    "read_quadrants",
    "read_refcat",
    "read_rows",
    "validate_file",
]

PathLike = str | os.PathLike[str]
Section = tuple[slice, slice]

#: Accepted ``IMAGETYP`` values (upper-cased) and the canonical type each maps to.
IMAGETYP_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "BIAS": "BIAS",
        "ZERO": "BIAS",
        "FLAT": "FLAT",
        "SCIENCE": "SCIENCE",
        "OBJECT": "SCIENCE",
        "DARK": "DARK",
    }
)

BANDS = ("g", "r", "i")

#: Columns a reference catalog must have; all but ``source_id`` are floats.
REFCAT_COLUMNS = (
    "source_id",
    "ra",
    "dec",
    "g_mag",
    "r_mag",
    "i_mag",
    "g_magerr",
    "r_magerr",
    "i_magerr",
    "bp_rp",
)

_ALL_TYPES = frozenset(IMAGETYP_ALIASES.values())

# Primary keyword -> (type, canonical IMAGETYPs that require it). A keyword is read
# only for the types that require it: a dome flat's AIRMASS or a bias's FILTER means
# nothing downstream and must not get the file rejected.
_PRIMARY_KEYWORDS: dict[str, tuple[type, frozenset[str]]] = {
    "EXPID": (int, _ALL_TYPES),
    "MJD-OBS": (float, _ALL_TYPES),
    "DATE-OBS": (str, _ALL_TYPES),
    "EXPTIME": (float, _ALL_TYPES),
    "FILTER": (str, frozenset({"FLAT", "SCIENCE"})),
    "AIRMASS": (float, frozenset({"SCIENCE"})),
    "TELRA": (float, frozenset({"SCIENCE"})),
    "TELDEC": (float, frozenset({"SCIENCE"})),
    "OUTTEMP": (float, frozenset({"SCIENCE"})),
    "OUTRHUM": (float, frozenset({"SCIENCE"})),
    "WINDSPD": (float, frozenset({"SCIENCE"})),
    "LEDID": (int, frozenset({"FLAT"})),
}

_EXTNAME_RE = re.compile(r"^CCD(\d\d)_Q([1-4])$")
_SECTION_RE = re.compile(r"^\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]$")
_N_CCDS = 16
_INT64 = np.iinfo(np.int64)
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string"}


class RawFileError(ValueError):
    """A raw exposure or reference catalog that breaks the input contract.

    Parameters
    ----------
    path : str
        The offending file.
    reason : str
        What is wrong, naming the HDU and keyword where there is one.
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        # The message is one line so that it fits an index record and a log line.
        self.reason = " ".join(reason.split())
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self) -> tuple[type[RawFileError], tuple[str, str]]:
        # Dask and multiprocessing pickle exceptions; the default would call
        # __init__ with the formatted message only.
        return (type(self), (self.path, self.reason))


class _ContractError(Exception):
    """Internal: a contract violation, turned into RawFileError once the path is known."""


def parse_section(text: str) -> Section:
    """Convert an IRAF section to numpy slices.

    Parameters
    ----------
    text : str
        ``'[x1:x2,y1:y2]'``, 1-based and inclusive, with ``x1 <= x2`` and ``y1 <= y2``.

    Returns
    -------
    tuple of slice
        ``(y_slice, x_slice)``, 0-based and half-open, to index a ``(ny, nx)`` array.

    Raises
    ------
    ValueError
        If ``text`` is not a section of that form; the message quotes ``text``.
    """
    match = _SECTION_RE.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"section {text!r} is not of the form '[x1:x2,y1:y2]'")
    x1, x2, y1, y2 = (int(group) for group in match.groups())
    if x1 < 1 or y1 < 1:
        raise ValueError(f"section {text!r} starts before pixel 1 (sections are 1-based)")
    if x2 < x1 or y2 < y1:
        # Reversed sections mean a flip in IRAF; the contract stores quadrants unflipped.
        raise ValueError(f"section {text!r} is reversed (need x1 <= x2 and y1 <= y2)")
    return slice(y1 - 1, y2), slice(x1 - 1, x2)


@dataclass(frozen=True)
class ExposureHeader:
    """Primary-header values of one exposure.

    Keywords that the exposure's type does not require (see ``docs/raw-fits.md``)
    are not read and are ``None``, except ``instrument``, which is optional for all.

    Attributes
    ----------
    path : str
        The file.
    imagetyp : str
        Canonical type: ``'BIAS'``, ``'FLAT'``, ``'SCIENCE'`` or ``'DARK'``.
    expid : int
        Unique exposure id.
    mjd : float
        Start of exposure, UTC MJD (``MJD-OBS``).
    date_obs : str
        ``DATE-OBS`` as written; informational.
    exptime_s : float
        Exposure time, s.
    band : str or None
        ``'g'``, ``'r'`` or ``'i'`` for flats and science frames.
    airmass : float or None
        Science frames only, >= 1.
    tel_ra_deg, tel_dec_deg : float or None
        Pointing, deg; science frames only.
    out_temp_c : float or None
        Outside temperature, deg C; science frames only.
    out_rhum_pct : float or None
        Outside relative humidity, %; science frames only.
    wind_speed_mps : float or None
        Wind speed, m/s; science frames only.
    led_id : int or None
        Dome-flat LED identifier; flats only.
    instrument : str or None
        ``INSTRUME`` when present.
    """

    path: str
    imagetyp: str
    expid: int
    mjd: float
    date_obs: str
    exptime_s: float
    band: str | None = None
    airmass: float | None = None
    tel_ra_deg: float | None = None
    tel_dec_deg: float | None = None
    out_temp_c: float | None = None
    out_rhum_pct: float | None = None
    wind_speed_mps: float | None = None
    led_id: int | None = None
    instrument: str | None = None


@dataclass(frozen=True)
class QuadrantHeader:
    """Header values of one quadrant extension.

    Attributes
    ----------
    hdu_index : int
        Position of the extension in the file (the primary HDU is 0).
    extname : str
        ``'CCDnn_Qm'``.
    ccd_id : int
        1..16.
    qid : int
        1..4.
    quadrant : int
        ``4 * (ccd_id - 1) + (qid - 1)``, the id used downstream.
    gain : float
        e-/ADU.
    rdnoise_e : float
        Read noise, e-.
    saturate_adu : float
        Pixels at or above this level are not trusted, ADU.
    datasec, biassec : tuple of slice
        Data and overscan sections of the HDU array, as :func:`parse_section` returns.
    detsec : tuple of slice
        Position of the data section in the focal-plane mosaic, same form.
    shape : tuple of int
        ``(ny, nx_total)`` of the full HDU array.
    has_wcs : bool
        Whether the header carries a TAN celestial WCS (``CTYPE1 = 'RA---TAN...'``).
    bitpix : int
        ``BITPIX`` (16 with BZERO 32768, or a float type).
    data_offset : int
        Byte offset of the HDU's pixels in the file (:func:`read_rows`).
    """

    hdu_index: int
    extname: str
    ccd_id: int
    qid: int
    quadrant: int
    gain: float
    rdnoise_e: float
    saturate_adu: float
    datasec: Section
    biassec: Section
    detsec: Section
    shape: tuple[int, int]
    has_wcs: bool
    bitpix: int = 16
    data_offset: int = -1


@dataclass(frozen=True)
class RawExposure:
    """A validated raw exposure: its primary header and its quadrants.

    Attributes
    ----------
    header : ExposureHeader
    quadrants : tuple of QuadrantHeader
        Sorted by ``quadrant``.
    """

    header: ExposureHeader
    quadrants: tuple[QuadrantHeader, ...]


# eq=False: comparing arrays field by field has no single truth value.
@dataclass(frozen=True, eq=False)
class QuadrantFrame:
    """Pixels of one quadrant.

    Attributes
    ----------
    header : QuadrantHeader
    data : ndarray, shape (ny, nx), float32, ADU
        The ``DATASEC`` pixels.
    overscan : ndarray, shape (ny, n_overscan), float32, ADU
        The ``BIASSEC`` pixels, same rows as ``data``.
    wcs : astropy.wcs.WCS or None
        Celestial TAN-SIP WCS of ``data``: pixel ``(x, y)`` of ``data`` (0-based) is
        pixel ``(x, y)`` of this WCS, the header's WCS having been shifted from the
        full HDU array to ``DATASEC``. ``None`` for frames other than science.
    """

    header: QuadrantHeader
    data: np.ndarray
    overscan: np.ndarray
    wcs: WCS | None


@dataclass(frozen=True, eq=False)
class RefCatalog:
    """A photometric reference catalog; all arrays have shape (n_sources,) and are read-only.

    Attributes
    ----------
    path : str
        The file it was read from.
    source_id : ndarray, int64
        Unique source ids.
    ra, dec : ndarray, float64, deg
        ICRS position.
    g_mag, r_mag, i_mag : ndarray, float64, mag
        Reference magnitudes; NaN where the catalog has none.
    g_magerr, r_magerr, i_magerr : ndarray, float64, mag
        Their uncertainties; NaN where missing.
    bp_rp : ndarray, float64, mag
        Gaia BP - RP colour; NaN where missing.
    """

    path: str
    source_id: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    g_mag: np.ndarray
    r_mag: np.ndarray
    i_mag: np.ndarray
    g_magerr: np.ndarray
    r_magerr: np.ndarray
    i_magerr: np.ndarray
    bp_rp: np.ndarray

    def __len__(self) -> int:
        return len(self.source_id)

    def rows_of(self, source_id: np.ndarray) -> np.ndarray:
        """Row of each of ``source_id`` in this catalog, -1 where it has none."""
        ids = np.asarray(source_id, dtype=np.int64)
        if len(self.source_id) == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        order = np.argsort(self.source_id)
        pos = np.searchsorted(self.source_id, ids, sorter=order)
        rows = order[np.minimum(pos, len(order) - 1)]
        return np.where(self.source_id[rows] == ids, rows, -1)


def validate_file(path: PathLike) -> RawExposure:
    """Check a raw exposure against ``docs/raw-fits.md``, reading few of its pixels.

    The file is opened read-only and never modified. A few rows of each data section
    are read to reject constant (dead) quadrants, the whole section only when those
    rows are constant; float arrays (``BITPIX`` < 0) are read in full, as their data
    sections must not be entirely non-finite.

    Parameters
    ----------
    path : str or os.PathLike
        A multi-extension FITS file.

    Returns
    -------
    RawExposure
        The parsed primary header and quadrant headers.

    Raises
    ------
    RawFileError
        If the file cannot be opened as FITS, is truncated, or breaks the contract;
        the reason names the HDU and keyword.
    """
    path = os.fspath(path)
    with _open_raw(path) as hdul:
        return _validate(hdul, path)


def read_quadrants(
    path: PathLike, *, quadrants: Iterable[int] | None = None
) -> list[QuadrantFrame]:
    """Validate a raw exposure and read the pixels of some or all of its quadrants.

    Parameters
    ----------
    path : str or os.PathLike
        A multi-extension FITS file.
    quadrants : iterable of int, optional
        Quadrant ids (``4 * (CCD_ID - 1) + (QID - 1)``) to read; all when omitted.

    Returns
    -------
    list of QuadrantFrame
        Sorted by quadrant id.

    Raises
    ------
    RawFileError
        If the file fails :func:`validate_file`'s checks or its WCS cannot be built.
    ValueError
        If a requested quadrant id is not in the file.
    """
    return list(iter_quadrants(path, quadrants=quadrants))


def iter_quadrants(
    path: PathLike, *, quadrants: Iterable[int] | None = None
) -> Iterator[QuadrantFrame]:
    """:func:`read_quadrants` one quadrant at a time: the file is validated and its
    WCSs built from the headers first, then each quadrant's pixels are read (one
    positioned read, :func:`read_rows`) as the caller asks for it, so only one
    quadrant's pixels are in memory. A ZTF exposure read whole through astropy
    was 3.7 GB (its 64 HDUs' arrays and their float32 copies); photometry reads
    it this way."""
    path = os.fspath(path)
    with _open_raw(path) as hdul:
        exposure = _validate(hdul, path)
        selected = _select(exposure, quadrants, path)
        science = exposure.header.imagetyp == "SCIENCE"
        # The header WCS describes the full HDU array; shift it to the data section.
        wcs = [
            _build_wcs(hdul[q.hdu_index].header, f"HDU {q.hdu_index} ({q.extname})").slice(
                q.datasec
            )
            if science
            else None
            for q in selected
        ]
    for q, w in zip(selected, wcs, strict=True):
        data, overscan = read_rows(path, q)
        yield QuadrantFrame(header=q, data=data, overscan=overscan, wcs=w)


_PIXEL_TYPES = {16: ">i2", -32: ">f4", -64: ">f8"}


def read_rows(
    path: PathLike, quadrant: QuadrantHeader, rows: slice | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Some rows of a validated quadrant's data and overscan sections, read with one
    positioned read of those rows only: what the masters stage streams its stacks
    with (a whole HDU is never loaded, and nothing is memory-mapped).

    Parameters
    ----------
    path : str or os.PathLike
        The file :func:`validate_file` returned ``quadrant`` for.
    quadrant : QuadrantHeader
    rows : slice, optional
        Rows of the data section (0-based, step 1); all by default.

    Returns
    -------
    data : ndarray, shape (n_rows, nx), float32, ADU
    overscan : ndarray, shape (n_rows, n_overscan), float32, ADU
        The values astropy gives for those rows (BZERO applied); what
        :func:`read_quadrants` and :func:`iter_quadrants` return.

    Raises
    ------
    RawFileError
        If the file is shorter than its header says (it changed since validation).
    """
    path = os.fspath(path)
    data_rows, data_cols = quadrant.datasec
    ny = data_rows.stop - data_rows.start
    r0, r1, step = (rows or slice(None)).indices(ny)
    if step != 1:
        raise ValueError(f"rows must be a contiguous slice, got step {step}")
    if quadrant.data_offset < 0:
        raise ValueError(f"{path}: quadrant {quadrant.extname} has no data offset (not validated)")
    dtype = np.dtype(_PIXEL_TYPES[quadrant.bitpix])
    width = quadrant.shape[1]
    start = quadrant.data_offset + (data_rows.start + r0) * width * dtype.itemsize
    size = max(r1 - r0, 0) * width * dtype.itemsize
    with open(path, "rb") as stream:
        buffer = os.pread(stream.fileno(), size, start)
    if len(buffer) != size:
        raise RawFileError(
            path,
            f"HDU {quadrant.hdu_index} ({quadrant.extname}): file is truncated "
            f"(rows {r0}..{r1} need bytes up to {start + size})",
        )
    pixels = np.frombuffer(buffer, dtype=dtype).reshape(r1 - r0, width)
    if quadrant.bitpix == 16:
        # BZERO 32768: the stored signed value plus 32768 is the unsigned pixel.
        pixels = pixels.astype(np.float32) + np.float32(32768.0)
    else:
        pixels = pixels.astype(np.float32)
    return (
        np.ascontiguousarray(pixels[:, data_cols]),
        np.ascontiguousarray(pixels[:, quadrant.biassec[1]]),
    )


def read_overscan(path: PathLike, quadrant: QuadrantHeader) -> np.ndarray:
    """A validated quadrant's whole overscan section (BIASSEC), float32 ADU, the
    values :func:`read_quadrants` gives: only its columns are copied out of a
    read-only map of the file (a frame's overscan level needs every row before
    any band of its data can be corrected)."""
    path = os.fspath(path)
    if quadrant.data_offset < 0:
        raise ValueError(f"{path}: quadrant {quadrant.extname} has no data offset (not validated)")
    rows, cols = quadrant.biassec
    pixels = np.memmap(
        path, dtype=_PIXEL_TYPES[quadrant.bitpix], mode="r", offset=quadrant.data_offset,
        shape=quadrant.shape,
    )  # fmt: skip
    try:
        overscan = np.array(pixels[rows, cols], dtype=np.float32)
    finally:
        del pixels
    if quadrant.bitpix == 16:
        overscan += np.float32(32768.0)
    return overscan


def read_refcat(path: PathLike) -> RefCatalog:
    """Read a reference catalog from a FITS binary table or an ECSV file.

    The format is taken from the file's content, not its name. Units attached to
    columns are ignored: positions are taken as degrees and magnitudes as mag.

    Parameters
    ----------
    path : str or os.PathLike
        The catalog, with the columns in :data:`REFCAT_COLUMNS`.

    Returns
    -------
    RefCatalog

    Raises
    ------
    RawFileError
        If the file cannot be read, a column is missing or has the wrong type,
        ``source_id`` has missing or duplicated values, or a position is missing
        or out of range.
    """
    path = os.fspath(path)
    table = _read_table(path)
    try:
        columns = {name: _refcat_column(table, name) for name in REFCAT_COLUMNS}
        _check_refcat(columns)
    except _ContractError as err:
        raise RawFileError(path, f"reference catalog: {err}") from None
    for array in columns.values():
        array.flags.writeable = False
    return RefCatalog(path=path, **columns)


# --- opening -------------------------------------------------------------------------


@contextmanager
def _open_raw(path: str) -> Iterator[fits.HDUList]:
    """Open ``path`` read-only, turning astropy's complaints into RawFileError."""
    with _recorded_astropy_warnings() as caught:
        try:
            hdul = fits.open(path, mode="readonly", memmap=False, lazy_load_hdus=False)
        except (OSError, ValueError, fits.VerifyError) as err:
            raise RawFileError(path, f"cannot be opened as FITS: {err}") from None
        with hdul:
            try:
                # Our own truncation check first: its reason names the HDU.
                _check_not_truncated(hdul, path)
                _reject_astropy_warnings(caught)
                yield hdul
                _reject_astropy_warnings(caught)
            except _ContractError as err:
                raise RawFileError(path, str(err)) from None
            except (fits.VerifyError, OSError) as err:
                raise RawFileError(path, f"corrupt header or data: {err}") from None


@contextmanager
def _recorded_astropy_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning; on exit, pass on those that did not come from astropy."""
    # Astropy reports a truncated or corrupt file with warnings and carries on, so the
    # caller judges them instead of letting them leak. catch_warnings swaps
    # process-wide state and is not thread-safe before Python 3.14: run readers in
    # processes (one thread each), not in threads sharing one interpreter.
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AstropyWarning)
            yield caught
    finally:
        for message in caught:
            if not issubclass(message.category, AstropyWarning):
                warnings.warn_explicit(
                    message.message, message.category, message.filename, message.lineno
                )


def _reject_astropy_warnings(caught: list[warnings.WarningMessage]) -> None:
    # One problem often comes as several warnings (a heading, the card, a note).
    said = dict.fromkeys(
        str(message.message).strip()
        for message in caught
        if issubclass(message.category, AstropyWarning)
    )
    if said:
        raise _ContractError(f"file is damaged or truncated (astropy: {' '.join(said)})")


def _check_not_truncated(hdul: fits.HDUList, path: str) -> None:
    if getattr(hdul.fileinfo(0)["file"], "compression", None):
        # The on-disk size of a compressed file says nothing about its FITS layout.
        raise _ContractError("compressed files are not supported; decompress it first")
    file_size = os.path.getsize(path)
    for index in range(len(hdul)):
        info = hdul.fileinfo(index)
        end = info["datLoc"] + info["datSpan"]
        if end > file_size:
            raise _ContractError(
                f"{_where(hdul[index], index)}: file is truncated: its data ends at byte "
                f"{end} but the file has {file_size} bytes"
            )


# --- validation ----------------------------------------------------------------------


def _validate(hdul: fits.HDUList, path: str) -> RawExposure:
    header = _exposure_header(hdul[0].header, path)
    if len(hdul) < 2:
        raise _ContractError("no quadrant extensions (the file has only a primary HDU)")
    science = header.imagetyp == "SCIENCE"
    quadrants: dict[str, QuadrantHeader] = {}
    for index in range(1, len(hdul)):
        quadrant = dataclasses.replace(
            _quadrant_header(hdul[index], index, science=science),
            data_offset=int(hdul.fileinfo(index)["datLoc"]),
        )
        if quadrant.extname in quadrants:
            first = quadrants[quadrant.extname].hdu_index
            raise _ContractError(
                f"HDU {index} ({quadrant.extname}): EXTNAME duplicates that of HDU {first}"
            )
        quadrants[quadrant.extname] = quadrant
    ordered = tuple(sorted(quadrants.values(), key=operator.attrgetter("quadrant")))
    return RawExposure(header=header, quadrants=ordered)


def _exposure_header(header: fits.Header, path: str) -> ExposureHeader:
    where = "primary header"
    _check_no_duplicates(header, where)
    raw_type = _keyword(header, "IMAGETYP", str, where)
    imagetyp = IMAGETYP_ALIASES.get(raw_type.strip().upper())
    if imagetyp is None:
        raise _ContractError(
            f"{where}: IMAGETYP {raw_type!r} is not one of {', '.join(IMAGETYP_ALIASES)}"
        )
    values = {
        key: _keyword(header, key, kind, where)
        for key, (kind, required_for) in _PRIMARY_KEYWORDS.items()
        if imagetyp in required_for
    }
    instrument = _keyword(header, "INSTRUME", str, where, required=False)

    if not _INT64.min <= values["EXPID"] <= _INT64.max:
        raise _ContractError(f"{where}: EXPID {values['EXPID']} does not fit in int64")
    exptime = values["EXPTIME"]
    exposed = imagetyp in ("SCIENCE", "FLAT")
    if exptime < 0 or (exposed and exptime == 0):
        rule = f"> 0 for {imagetyp}" if exposed else ">= 0"
        raise _ContractError(f"{where}: EXPTIME {exptime} is out of range (must be {rule})")
    band = None
    if "FILTER" in values:
        band = values["FILTER"].strip().lower()
        if band not in BANDS:
            raise _ContractError(
                f"{where}: FILTER {values['FILTER']!r} is not one of {', '.join(BANDS)}"
            )
    if "AIRMASS" in values and values["AIRMASS"] < 1:
        raise _ContractError(f"{where}: AIRMASS {values['AIRMASS']} is out of range (must be >= 1)")

    return ExposureHeader(
        path=path,
        imagetyp=imagetyp,
        expid=values["EXPID"],
        mjd=values["MJD-OBS"],
        date_obs=values["DATE-OBS"],
        exptime_s=exptime,
        band=band,
        airmass=values.get("AIRMASS"),
        tel_ra_deg=values.get("TELRA"),
        tel_dec_deg=values.get("TELDEC"),
        out_temp_c=values.get("OUTTEMP"),
        out_rhum_pct=values.get("OUTRHUM"),
        wind_speed_mps=values.get("WINDSPD"),
        led_id=values.get("LEDID"),
        instrument=instrument,
    )


def _quadrant_header(hdu: Any, index: int, *, science: bool) -> QuadrantHeader:
    if not isinstance(hdu, fits.ImageHDU):
        raise _ContractError(
            f"{_where(hdu, index)}: is a {type(hdu).__name__}, not an image extension"
        )
    header = hdu.header
    extname, ccd, qid = _extname(header, index)
    where = f"HDU {index} ({extname})"
    _check_no_duplicates(header, where)
    naxis = header.get("NAXIS")
    if naxis != 2:
        raise _ContractError(f"{where}: array is not 2-D (NAXIS = {naxis})")
    shape = (header["NAXIS2"], header["NAXIS1"])

    for key, expected in (("CCD_ID", ccd), ("QID", qid)):
        value = _keyword(header, key, int, where)
        if value != expected:
            raise _ContractError(f"{where}: {key} = {value} disagrees with EXTNAME")
    gain = _keyword(header, "GAIN", float, where)
    if gain <= 0:
        raise _ContractError(f"{where}: GAIN {gain} is out of range (must be > 0)")
    rdnoise = _keyword(header, "RDNOISE", float, where)
    if rdnoise < 0:
        raise _ContractError(f"{where}: RDNOISE {rdnoise} is out of range (must be >= 0)")
    saturate = _keyword(header, "SATURATE", float, where)
    if saturate <= 0:
        raise _ContractError(f"{where}: SATURATE {saturate} is out of range (must be > 0)")

    _check_pixel_type(header, where)
    datasec, biassec, detsec = _sections(header, where, shape)
    has_wcs = str(header.get("CTYPE1", "")).startswith("RA---TAN")
    if science:
        _check_science_wcs(header, where)
    if header["BITPIX"] < 0:
        _check_finite(hdu.data[datasec], where)
    _check_not_constant(hdu, datasec, where)

    return QuadrantHeader(
        hdu_index=index,
        extname=extname,
        ccd_id=ccd,
        qid=qid,
        quadrant=4 * (ccd - 1) + (qid - 1),
        gain=gain,
        rdnoise_e=rdnoise,
        saturate_adu=saturate,
        datasec=datasec,
        biassec=biassec,
        detsec=detsec,
        shape=shape,
        has_wcs=has_wcs,
        bitpix=int(header["BITPIX"]),
    )


def _extname(header: fits.Header, index: int) -> tuple[str, int, int]:
    extname = _keyword(header, "EXTNAME", str, f"HDU {index}")
    match = _EXTNAME_RE.match(extname)
    if match is None or not 1 <= int(match[1]) <= _N_CCDS:
        raise _ContractError(
            f"HDU {index}: EXTNAME {extname!r} is not of the form 'CCDnn_Qm' "
            f"(nn = 01..{_N_CCDS}, m = 1..4)"
        )
    return extname, int(match[1]), int(match[2])


def _sections(
    header: fits.Header, where: str, shape: tuple[int, int]
) -> tuple[Section, Section, Section]:
    texts = {key: _keyword(header, key, str, where) for key in ("DATASEC", "BIASSEC", "DETSEC")}
    sections = {}
    for key, text in texts.items():
        try:
            sections[key] = parse_section(text)
        except ValueError as err:
            raise _ContractError(f"{where}: {key} is malformed: {err}") from None
    datasec, biassec, detsec = sections["DATASEC"], sections["BIASSEC"], sections["DETSEC"]

    for key in ("DATASEC", "BIASSEC"):
        rows, cols = sections[key]
        if rows.stop > shape[0] or cols.stop > shape[1]:
            raise _ContractError(
                f"{where}: {key} {texts[key]!r} does not fit the array "
                f"(NAXIS1 = {shape[1]}, NAXIS2 = {shape[0]})"
            )
    if biassec[0] != datasec[0]:
        raise _ContractError(
            f"{where}: BIASSEC {texts['BIASSEC']!r} does not cover the same rows as "
            f"DATASEC {texts['DATASEC']!r}"
        )
    if biassec[1].start < datasec[1].stop and datasec[1].start < biassec[1].stop:
        raise _ContractError(
            f"{where}: BIASSEC {texts['BIASSEC']!r} overlaps DATASEC {texts['DATASEC']!r}"
        )
    if _extent(detsec) != _extent(datasec):
        raise _ContractError(
            f"{where}: DETSEC {texts['DETSEC']!r} is not the size of DATASEC {texts['DATASEC']!r}"
        )
    return datasec, biassec, detsec


def _check_no_duplicates(header: fits.Header, where: str) -> None:
    # A lost END card silently merges two headers; the repeated BITPIX, NAXIS... give
    # it away. The standard allows repeats of commentary keywords only.
    counts = Counter(key for key in header if key not in ("", "COMMENT", "HISTORY"))
    for key, count in counts.items():
        if count > 1:
            raise _ContractError(
                f"{where}: keyword {key} appears {count} times (damaged header or a lost END card)"
            )


def _check_science_wcs(header: fits.Header, where: str) -> None:
    for key, prefix in (("CTYPE1", "RA---TAN"), ("CTYPE2", "DEC--TAN")):
        value = header.get(key)
        if value is None:
            raise _ContractError(
                f"{where}: science quadrant has no celestial WCS (keyword {key} missing)"
            )
        if not isinstance(value, str) or not value.startswith(prefix):
            raise _ContractError(
                f"{where}: science quadrant has no celestial WCS "
                f"({key} = {value!r}, expected {prefix!r}...)"
            )
    _build_wcs(header, where)


def _check_finite(section: np.ndarray, where: str) -> None:
    if not np.isfinite(section).any():
        raise _ContractError(f"{where}: data section (DATASEC) is entirely non-finite")


def _check_pixel_type(header: fits.Header, where: str) -> None:
    bitpix, bzero, bscale = header["BITPIX"], header.get("BZERO", 0), header.get("BSCALE", 1)
    if bitpix < 0 or (bitpix == 16 and bzero == 32768 and bscale == 1):
        return
    raise _ContractError(
        f"{where}: BITPIX = {bitpix} with BZERO = {bzero}, BSCALE = {bscale} is not "
        "unsigned 16-bit (BITPIX = 16, BZERO = 32768) nor float"
    )


# Rows of a data section sampled to look for a dead readout; only a section whose
# sample is constant is read in full, so good files cost a few rows per quadrant.
_CONSTANT_SAMPLE_ROWS = 8


def _check_not_constant(hdu: Any, datasec: Section, where: str) -> None:
    rows, cols = datasec
    step = max(1, (rows.stop - rows.start) // _CONSTANT_SAMPLE_ROWS)
    sample = hdu.section[rows.start : rows.stop : step, cols.start : cols.stop]
    if np.ptp(sample) != 0:
        return
    pixels = hdu.section[rows, cols]
    if np.ptp(pixels) == 0:
        raise _ContractError(
            f"{where}: data section (DATASEC) is constant (every pixel {pixels.flat[0]:g} ADU): "
            "a dead or unread quadrant"
        )


def _keyword(
    header: fits.Header, key: str, kind: type, where: str, *, required: bool = True
) -> Any:
    """Return ``header[key]`` checked to be of ``kind`` (int, float or str)."""
    if key not in header:
        if required:
            raise _ContractError(f"{where}: keyword {key} missing")
        return None
    value = header[key]
    if isinstance(value, fits.card.Undefined):
        raise _ContractError(f"{where}: keyword {key} has no value")
    # bool is an int subclass, and a FITS T/F is never a count or a measurement.
    if isinstance(value, bool):
        ok = False
    elif kind is int:
        ok = isinstance(value, int)
    elif kind is float:
        ok = isinstance(value, int | float)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise _ContractError(
            f"{where}: {key} must be {_TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}"
        )
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise _ContractError(f"{where}: {key} is not finite ({value})")
    return value


def _where(hdu: Any, index: int) -> str:
    if index == 0:
        return "primary HDU"
    extname = hdu.header.get("EXTNAME")
    return f"HDU {index} ({extname})" if isinstance(extname, str) else f"HDU {index}"


def _extent(section: Section) -> tuple[int, int]:
    rows, cols = section
    return rows.stop - rows.start, cols.stop - cols.start


# --- pixels --------------------------------------------------------------------------


def _select(
    exposure: RawExposure, quadrants: Iterable[int] | None, path: str
) -> list[QuadrantHeader]:
    if quadrants is None:
        return list(exposure.quadrants)
    wanted = {operator.index(q) for q in quadrants}
    present = {q.quadrant for q in exposure.quadrants}
    unknown = sorted(wanted - present)
    if unknown:
        raise ValueError(
            f"{path}: quadrants {unknown} requested but the file has {sorted(present)}"
        )
    return [q for q in exposure.quadrants if q.quadrant in wanted]


def _build_wcs(header: fits.Header, where: str) -> WCS:
    with warnings.catch_warnings():
        # Astropy "fixes" legal but old-style headers and says so; nothing to act on.
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header, relax=True)
        except (ValueError, KeyError, MemoryError) as err:
            raise _ContractError(f"{where}: WCS cannot be built: {err}") from None
    if wcs.naxis != 2 or not wcs.has_celestial:
        raise _ContractError(f"{where}: WCS is not a 2-D celestial WCS")
    return wcs


# --- reference catalogs --------------------------------------------------------------


def _read_table(path: str) -> Table:
    try:
        with open(path, "rb") as stream:
            start = stream.read(80)
    except OSError as err:
        raise RawFileError(path, f"reference catalog cannot be read: {err}") from None
    if start.startswith(b"SIMPLE  ="):
        options: dict[str, Any] = {"format": "fits", "hdu": 1}
    elif start.startswith(b"# %ECSV"):
        options = {"format": "ascii.ecsv"}
    else:
        raise RawFileError(path, "reference catalog is neither a FITS nor an ECSV table")
    with _recorded_astropy_warnings() as caught:
        # Units are not used (columns are deg and mag by contract), so a unit string
        # astropy does not know is no reason to reject the catalog.
        warnings.simplefilter("ignore", UnitsWarning)
        try:
            table = Table.read(path, **options)
        except (OSError, ValueError, TypeError, KeyError, IndexError) as err:
            raise RawFileError(path, f"reference catalog cannot be read: {err}") from None
        try:
            _reject_astropy_warnings(caught)
        except _ContractError as err:
            raise RawFileError(path, f"reference catalog: {err}") from None
    return table


def _refcat_column(table: Table, name: str) -> np.ndarray:
    if name not in table.colnames:
        raise _ContractError(f"column {name!r} missing")
    column = table[name]
    if column.ndim != 1:
        raise _ContractError(f"column {name!r} is not one value per row (shape {column.shape})")
    masked = np.ma.getmaskarray(column)
    if name == "source_id":
        if not np.issubdtype(column.dtype, np.integer):
            raise _ContractError(f"column 'source_id' must be integer, got {column.dtype.name}")
        if masked.any():
            raise _ContractError(f"column 'source_id' has {masked.sum()} missing values")
        values = np.asarray(column)
        if values.size and (values.max() > _INT64.max):
            raise _ContractError("column 'source_id' has values that do not fit in int64")
        return values.astype(np.int64)
    if not (np.issubdtype(column.dtype, np.floating) or np.issubdtype(column.dtype, np.integer)):
        raise _ContractError(f"column {name!r} must be numeric, got {column.dtype.name}")
    values = np.array(column, dtype=np.float64)
    values[masked] = np.nan
    return values


def _check_refcat(columns: dict[str, np.ndarray]) -> None:
    ids, counts = np.unique(columns["source_id"], return_counts=True)
    duplicated = ids[counts > 1]
    if duplicated.size:
        shown = ", ".join(str(i) for i in duplicated[:5])
        more = f" and {duplicated.size - 5} more" if duplicated.size > 5 else ""
        raise _ContractError(f"duplicate source_id {shown}{more}")
    for name, low, high in (("ra", 0.0, 360.0), ("dec", -90.0, 90.0)):
        bad = ~((columns[name] >= low) & (columns[name] <= high))
        if bad.any():
            raise _ContractError(
                f"column {name!r} has {bad.sum()} missing or out-of-range values "
                f"(must be within [{low:g}, {high:g}] deg)"
            )
