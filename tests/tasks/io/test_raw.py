"""Tests for tasks.io.raw: the raw FITS contract of docs/raw-fits.md."""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from astropy.wcs import WCS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.io.raw import (
    IMAGETYP_ALIASES,
    REFCAT_COLUMNS,
    RawFileError,
    iter_quadrants,
    parse_section,
    read_quadrants,
    read_refcat,
    validate_file,
)

NY = 20  # rows of every quadrant
NX_DATA = 16  # data columns
N_OVERSCAN = 4  # overscan columns
SCIENCE_KEYWORDS = (
    "IMAGETYP",
    "EXPID",
    "MJD-OBS",
    "DATE-OBS",
    "EXPTIME",
    "FILTER",
    "AIRMASS",
    "TELRA",
    "TELDEC",
    "OUTTEMP",
    "OUTRHUM",
    "WINDSPD",
)
QUADRANT_KEYWORDS = (
    "EXTNAME",
    "CCD_ID",
    "QID",
    "GAIN",
    "RDNOISE",
    "SATURATE",
    "DATASEC",
    "BIASSEC",
    "DETSEC",
)


# --- builders --------------------------------------------------------------------------


def _overscan_left(qid: int) -> bool:
    # The contract puts the overscan on the readout side: left for Q2/Q3.
    return qid in (2, 3)


def _data_values(ccd: int, qid: int) -> np.ndarray:
    """The DATASEC pixels the builder writes, shape (NY, NX_DATA), ADU."""
    start = 1000 + 1000 * (4 * (ccd - 1) + (qid - 1))
    return start + np.arange(NY * NX_DATA, dtype=np.float32).reshape(NY, NX_DATA)


def _overscan_value(ccd: int, qid: int) -> float:
    return 300.0 + 4 * (ccd - 1) + (qid - 1)


def _quadrant_hdu(ccd: int, qid: int, *, science: bool, float_data: bool) -> fits.ImageHDU:
    data = _data_values(ccd, qid)
    overscan = np.full((NY, N_OVERSCAN), _overscan_value(ccd, qid), dtype=np.float32)
    left = _overscan_left(qid)
    pixels = np.hstack([overscan, data] if left else [data, overscan])  # (NY, NX total)
    # uint16 makes astropy write BITPIX = 16 with BZERO = 32768, as the camera does.
    pixels = pixels.astype(np.float32 if float_data else np.uint16)
    hdu = fits.ImageHDU(pixels)
    header = hdu.header
    header["EXTNAME"] = f"CCD{ccd:02d}_Q{qid}"
    header["CCD_ID"] = ccd
    header["QID"] = qid
    header["GAIN"] = 1.5
    header["RDNOISE"] = 4.0
    header["SATURATE"] = 60000.0
    if left:
        header["DATASEC"] = f"[{N_OVERSCAN + 1}:{N_OVERSCAN + NX_DATA},1:{NY}]"
        header["BIASSEC"] = f"[1:{N_OVERSCAN},1:{NY}]"
    else:
        header["DATASEC"] = f"[1:{NX_DATA},1:{NY}]"
        header["BIASSEC"] = f"[{NX_DATA + 1}:{NX_DATA + N_OVERSCAN},1:{NY}]"
    x0 = (qid - 1) % 2 * NX_DATA + 1
    y0 = (qid - 1) // 2 * NY + 1
    header["DETSEC"] = f"[{x0}:{x0 + NX_DATA - 1},{y0}:{y0 + NY - 1}]"
    if science:
        header.update(_tan_sip_cards(ccd, qid))
    return hdu


def _tan_sip_cards(ccd: int, qid: int) -> dict[str, object]:
    return {
        "CTYPE1": "RA---TAN-SIP",
        "CTYPE2": "DEC--TAN-SIP",
        "CRPIX1": 10.5,
        "CRPIX2": 10.5,
        "CRVAL1": 150.0 + 0.01 * ccd,
        "CRVAL2": 2.0 + 0.01 * qid,
        "CD1_1": -2.8e-4,
        "CD1_2": 1.0e-6,
        "CD2_1": -1.0e-6,
        "CD2_2": 2.8e-4,
        "A_ORDER": 3,
        "B_ORDER": 3,
        "A_2_0": 2.0e-6,
        "A_1_1": -1.0e-6,
        "A_3_0": 1.0e-8,
        "B_0_2": 2.0e-6,
        "B_1_2": -1.0e-8,
    }


def build_exposure(
    imagetyp: str = "SCIENCE",
    *,
    quadrants: tuple[tuple[int, int], ...] = ((1, 1), (1, 2)),
    float_data: bool = False,
) -> fits.HDUList:
    """A valid raw exposure: primary header plus one extension per (ccd, qid)."""
    canonical = IMAGETYP_ALIASES[imagetyp.upper()]
    primary = fits.PrimaryHDU()
    header = primary.header
    header["IMAGETYP"] = imagetyp
    header["EXPID"] = 123456
    header["MJD-OBS"] = 60000.25
    header["DATE-OBS"] = "2023-02-25T06:00:00.000"
    header["EXPTIME"] = 0.0 if canonical == "BIAS" else 30.0
    header["INSTRUME"] = "photocal-sim"
    if canonical in ("FLAT", "SCIENCE"):
        header["FILTER"] = "R"
    if canonical == "FLAT":
        header["LEDID"] = 3
    if canonical == "SCIENCE":
        header["AIRMASS"] = 1.25
        header["TELRA"] = 150.0
        header["TELDEC"] = 2.0
        header["OUTTEMP"] = 8.5
        header["OUTRHUM"] = 40
        header["WINDSPD"] = 3.25
    science = canonical == "SCIENCE"
    extensions = [
        _quadrant_hdu(ccd, qid, science=science, float_data=float_data) for ccd, qid in quadrants
    ]
    return fits.HDUList([primary, *extensions])


def write(hdul: fits.HDUList, path: Path) -> Path:
    hdul.writeto(path)
    return path


def rejected(path: Path) -> RawFileError:
    """Validate ``path``, expecting a one-line RawFileError that names it."""
    with warnings.catch_warnings():
        # No astropy warning may leak past the validator, whatever the damage.
        warnings.simplefilter("error")
        with pytest.raises(RawFileError) as info:
            validate_file(path)
    err = info.value
    assert err.path == str(path)
    assert str(err) == f"{path}: {err.reason}"
    assert "\n" not in str(err)
    return err


@pytest.fixture
def science_path(tmp_path: Path) -> Path:
    return write(build_exposure(), tmp_path / "exp.fits")


# --- sections --------------------------------------------------------------------------


def test_parse_section_is_zero_based_half_open():
    assert parse_section("[1:16,1:20]") == (slice(0, 20), slice(0, 16))
    assert parse_section(" [ 5:20 , 3:4 ] ") == (slice(2, 4), slice(4, 20))


@pytest.mark.parametrize(
    "text", ["[1:16,1:20", "1:16,1:20", "[1:16]", "[a:b,1:2]", "[16:1,1:20]", "[0:16,1:20]", ""]
)
def test_parse_section_rejects_malformed(text):
    with pytest.raises(ValueError, match="section") as info:
        parse_section(text)
    assert repr(text) in str(info.value)


# --- good files ------------------------------------------------------------------------


def test_science_file_parses_with_typed_values(science_path):
    exposure = validate_file(science_path)
    header = exposure.header
    assert header.path == str(science_path)
    assert header.imagetyp == "SCIENCE"
    assert header.expid == 123456
    assert type(header.expid) is int
    assert header.mjd == 60000.25
    assert header.date_obs == "2023-02-25T06:00:00.000"
    assert header.exptime_s == 30.0
    assert header.band == "r"
    assert header.airmass == 1.25
    assert (header.tel_ra_deg, header.tel_dec_deg) == (150.0, 2.0)
    assert header.out_temp_c == 8.5
    # Float keywords accept integers and come back as floats.
    assert header.out_rhum_pct == 40.0
    assert type(header.out_rhum_pct) is float
    assert header.wind_speed_mps == 3.25
    assert header.led_id is None
    assert header.instrument == "photocal-sim"

    assert [q.quadrant for q in exposure.quadrants] == [0, 1]
    q1, q2 = exposure.quadrants
    assert (q1.extname, q1.ccd_id, q1.qid, q1.hdu_index) == ("CCD01_Q1", 1, 1, 1)
    assert (q1.gain, q1.rdnoise_e, q1.saturate_adu) == (1.5, 4.0, 60000.0)
    assert q1.shape == (NY, NX_DATA + N_OVERSCAN)
    assert q1.datasec == (slice(0, NY), slice(0, NX_DATA))
    assert q1.biassec == (slice(0, NY), slice(NX_DATA, NX_DATA + N_OVERSCAN))
    assert q2.datasec == (slice(0, NY), slice(N_OVERSCAN, N_OVERSCAN + NX_DATA))
    assert q2.detsec == (slice(0, NY), slice(NX_DATA, 2 * NX_DATA))
    assert q1.has_wcs
    assert q2.has_wcs


def test_quadrants_sorted_by_id_whatever_the_hdu_order(tmp_path):
    hdul = build_exposure(quadrants=((3, 4), (1, 2), (16, 1)))
    exposure = validate_file(write(hdul, tmp_path / "any-name.bin"))
    assert [q.quadrant for q in exposure.quadrants] == [1, 11, 60]
    assert [q.hdu_index for q in exposure.quadrants] == [2, 1, 3]


@pytest.mark.parametrize(
    ("imagetyp", "canonical"),
    [("ZERO", "BIAS"), ("OBJECT", "SCIENCE"), ("DARK", "DARK"), ("science", "SCIENCE")],
)
def test_imagetyp_aliases(tmp_path, imagetyp, canonical):
    path = write(build_exposure(imagetyp), tmp_path / "exp.fits")
    assert validate_file(path).header.imagetyp == canonical


def test_bias_needs_no_filter_or_wcs(tmp_path):
    exposure = validate_file(write(build_exposure("BIAS"), tmp_path / "bias.fits"))
    header = exposure.header
    assert header.imagetyp == "BIAS"
    assert header.exptime_s == 0.0
    assert header.band is None
    assert header.airmass is None
    assert not any(q.has_wcs for q in exposure.quadrants)


def test_flat_reads_led_and_band(tmp_path):
    header = validate_file(write(build_exposure("FLAT"), tmp_path / "flat.fits")).header
    assert (header.imagetyp, header.band, header.led_id) == ("FLAT", "r", 3)
    assert header.airmass is None


def test_keywords_not_required_for_the_type_are_not_read(tmp_path):
    hdul = build_exposure("FLAT")
    hdul[0].header["AIRMASS"] = 0.0  # a dome flat's airmass means nothing
    header = validate_file(write(hdul, tmp_path / "flat.fits")).header
    assert header.airmass is None


def test_validate_file_never_modifies_the_file(science_path):
    before = hashlib.sha256(science_path.read_bytes()).hexdigest()
    mtime = science_path.stat().st_mtime_ns
    science_path.chmod(0o444)
    validate_file(science_path)
    read_quadrants(science_path)
    assert hashlib.sha256(science_path.read_bytes()).hexdigest() == before
    assert science_path.stat().st_mtime_ns == mtime


# --- pixels ----------------------------------------------------------------------------


def test_read_quadrants_splits_data_and_overscan(science_path):
    frames = read_quadrants(science_path)
    assert [f.header.quadrant for f in frames] == [0, 1]
    for frame in frames:
        ccd, qid = frame.header.ccd_id, frame.header.qid
        assert frame.data.dtype == np.float32
        assert frame.overscan.dtype == np.float32
        assert frame.data.shape == (NY, NX_DATA)
        assert frame.overscan.shape == (NY, N_OVERSCAN)
        np.testing.assert_array_equal(frame.data, _data_values(ccd, qid))
        np.testing.assert_array_equal(frame.overscan, _overscan_value(ccd, qid))


def test_read_quadrants_selects_by_quadrant_id(science_path):
    frames = read_quadrants(science_path, quadrants=[1])
    assert [f.header.extname for f in frames] == ["CCD01_Q2"]


def test_read_quadrants_rejects_unknown_ids(science_path):
    with pytest.raises(ValueError, match=r"\[5, 7\]"):
        read_quadrants(science_path, quadrants=[0, 7, 5])


def test_science_wcs_is_shifted_to_the_data_section(science_path):
    frames = read_quadrants(science_path)
    with fits.open(science_path) as hdul:
        full = [WCS(hdul[i].header) for i in (1, 2)]
    for frame, wcs in zip(frames, full, strict=True):
        assert frame.wcs is not None
        assert frame.wcs.sip is not None
        x0 = frame.header.datasec[1].start
        expected = wcs.pixel_to_world_values([x0, x0 + 7.5], [0.0, 13.0])
        got = frame.wcs.pixel_to_world_values([0.0, 7.5], [0.0, 13.0])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


def test_bias_frames_have_no_wcs(tmp_path):
    frames = read_quadrants(write(build_exposure("ZERO"), tmp_path / "bias.fits"))
    assert all(frame.wcs is None for frame in frames)


def test_float_file_is_accepted_with_some_non_finite_pixels(tmp_path):
    hdul = build_exposure(float_data=True)
    hdul[1].data[3, 2] = np.nan
    frames = read_quadrants(write(hdul, tmp_path / "float.fits"))
    assert frames[0].data.dtype == np.float32
    assert np.isnan(frames[0].data[3, 2])


@pytest.mark.parametrize("kind", ["science", "bias", "float"])
def test_iter_quadrants_equals_astropys_read(science_path, tmp_path, kind):
    """Photometry reads an exposure a quadrant at a time with positioned reads
    (a ZTF exposure read whole through astropy was 3.7 GB): the same pixels,
    overscan and WCS as astropy's own read of each HDU, the WCS shifted to the
    data section; ``read_quadrants`` is the same frames as a list."""
    path = {
        "science": science_path,
        "bias": write(build_exposure("ZERO"), tmp_path / "bias.fits"),
        "float": write(build_exposure(float_data=True), tmp_path / "float.fits"),
    }[kind]
    frames = list(iter_quadrants(path))
    assert len(frames) >= 2
    with fits.open(path) as hdul:
        for frame in frames:
            hdu = hdul[frame.header.hdu_index]
            pixels = hdu.data.astype(np.float32)
            assert frame.data.dtype == frame.overscan.dtype == np.float32
            np.testing.assert_array_equal(frame.data, pixels[frame.header.datasec])
            np.testing.assert_array_equal(frame.overscan, pixels[frame.header.biassec])
            if kind == "bias":
                assert frame.wcs is None
            else:
                expected = WCS(hdu.header, relax=True).slice(frame.header.datasec)
                assert frame.wcs.to_header_string(relax=True) == expected.to_header_string(
                    relax=True
                )
    listed = read_quadrants(path)
    assert [f.header for f in listed] == [f.header for f in frames]
    for a, b in zip(listed, frames, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
    assert [f.header.quadrant for f in iter_quadrants(path, quadrants=[1])] == [1]


# --- rejections ------------------------------------------------------------------------


def test_rejects_non_fits(tmp_path):
    path = tmp_path / "noise.fits"
    path.write_bytes(np.random.default_rng(1).bytes(5000))
    assert "cannot be opened as FITS" in rejected(path).reason


def test_rejects_empty_file(tmp_path):
    path = tmp_path / "empty.fits"
    path.write_bytes(b"")
    assert "cannot be opened as FITS" in rejected(path).reason


def test_rejects_missing_file(tmp_path):
    assert "cannot be opened" in rejected(tmp_path / "absent.fits").reason


@pytest.mark.parametrize("cut", [3000, 100])
def test_rejects_truncated_file(science_path, cut):
    # 3000 bytes cuts into the last header; 100 only into the last data block.
    science_path.write_bytes(science_path.read_bytes()[:-cut])
    assert "truncated" in rejected(science_path).reason


def test_truncation_reason_names_the_hdu(science_path):
    science_path.write_bytes(science_path.read_bytes()[:-100])
    assert rejected(science_path).reason.startswith("HDU 2 (CCD01_Q2): file is truncated")


def _replace_card(path: Path, key: str, card: bytes) -> None:
    raw = path.read_bytes()
    start = raw.index(key.encode().ljust(8) + b"=")
    path.write_bytes(raw[:start] + card.ljust(80) + raw[start + 80 :])


@pytest.mark.parametrize(
    ("key", "card"), [("GAIN", b"GAIN    = 1.2.3"), ("EXPID", b"EXPID   = 12A4")]
)
def test_rejects_unparsable_card(science_path, key, card):
    _replace_card(science_path, key, card)
    reason = rejected(science_path).reason
    assert reason.startswith("file is damaged or truncated")
    assert f"Card '{key}' is not FITS standard" in reason


def test_rejects_headers_merged_by_a_lost_end_card(science_path):
    raw = science_path.read_bytes()
    end = raw.index(b"END".ljust(80))  # the primary header's END card
    science_path.write_bytes(raw[:end] + b" " * 80 + raw[end + 80 :])
    assert "appears 2 times" in rejected(science_path).reason


def test_rejects_compressed_file(tmp_path):
    path = write(build_exposure(), tmp_path / "exp.fits.gz")
    assert "compressed files are not supported" in rejected(path).reason


@pytest.mark.parametrize(
    ("imagetyp", "key"),
    [("SCIENCE", key) for key in SCIENCE_KEYWORDS]
    + [("FLAT", key) for key in ("FILTER", "LEDID", "EXPTIME")]
    + [("BIAS", key) for key in ("EXPID", "MJD-OBS", "DATE-OBS", "EXPTIME")]
    + [("DARK", "EXPID")],
)
def test_rejects_missing_primary_keyword(tmp_path, imagetyp, key):
    hdul = build_exposure(imagetyp)
    del hdul[0].header[key]
    reason = rejected(write(hdul, tmp_path / "exp.fits")).reason
    assert reason == f"primary header: keyword {key} missing"


@pytest.mark.parametrize("key", QUADRANT_KEYWORDS)
def test_rejects_missing_quadrant_keyword(tmp_path, key):
    hdul = build_exposure()
    del hdul[2].header[key]
    reason = rejected(write(hdul, tmp_path / "exp.fits")).reason
    where = "HDU 2" if key == "EXTNAME" else "HDU 2 (CCD01_Q2)"
    assert reason == f"{where}: keyword {key} missing"


@pytest.mark.parametrize(
    ("hdu", "key", "value", "expected"),
    [
        (0, "EXPID", "123456", "EXPID must be an integer, got str '123456'"),
        (0, "EXPID", 123456.0, "EXPID must be an integer, got float 123456.0"),
        (0, "EXPTIME", "30", "EXPTIME must be a number, got str '30'"),
        (0, "AIRMASS", True, "AIRMASS must be a number, got bool True"),
        (0, "IMAGETYP", 3, "IMAGETYP must be a string, got int 3"),
        (1, "GAIN", "1.5", "GAIN must be a number, got str '1.5'"),
        (1, "QID", 1.0, "QID must be an integer, got float 1.0"),
        (1, "DATASEC", 5, "DATASEC must be a string, got int 5"),
    ],
)
def test_rejects_wrong_type(tmp_path, hdu, key, value, expected):
    hdul = build_exposure()
    hdul[hdu].header[key] = value
    reason = rejected(write(hdul, tmp_path / "exp.fits")).reason
    where = "primary header" if hdu == 0 else "HDU 1 (CCD01_Q1)"
    assert reason == f"{where}: {expected}"


@pytest.mark.parametrize(
    ("imagetyp", "hdu", "key", "value", "expected"),
    [
        ("SCIENCE", 0, "AIRMASS", 0.5, "AIRMASS 0.5 is out of range (must be >= 1)"),
        ("SCIENCE", 0, "EXPTIME", 0.0, "EXPTIME 0.0 is out of range (must be > 0 for SCIENCE)"),
        ("FLAT", 0, "EXPTIME", 0, "EXPTIME 0.0 is out of range (must be > 0 for FLAT)"),
        ("BIAS", 0, "EXPTIME", -1.0, "EXPTIME -1.0 is out of range (must be >= 0)"),
        ("SCIENCE", 0, "FILTER", "z", "FILTER 'z' is not one of g, r, i"),
        ("SCIENCE", 1, "GAIN", 0.0, "GAIN 0.0 is out of range (must be > 0)"),
        ("SCIENCE", 1, "RDNOISE", -0.1, "RDNOISE -0.1 is out of range (must be >= 0)"),
    ],
)
def test_rejects_out_of_range(tmp_path, imagetyp, hdu, key, value, expected):
    hdul = build_exposure(imagetyp)
    hdul[hdu].header[key] = value
    reason = rejected(write(hdul, tmp_path / "exp.fits")).reason
    assert reason.endswith(f": {expected}")
    assert reason.startswith("primary header" if hdu == 0 else "HDU 1 (CCD01_Q1)")


def test_rejects_unknown_imagetyp(tmp_path):
    hdul = build_exposure()
    hdul[0].header["IMAGETYP"] = "FOO"
    assert rejected(write(hdul, tmp_path / "exp.fits")).reason == (
        "primary header: IMAGETYP 'FOO' is not one of BIAS, ZERO, FLAT, SCIENCE, OBJECT, DARK"
    )


def test_rejects_file_without_extensions(tmp_path):
    hdul = fits.HDUList([build_exposure()[0]])
    assert "no quadrant extensions" in rejected(write(hdul, tmp_path / "exp.fits")).reason


@pytest.mark.parametrize("extname", ["CCD1_Q1", "CCD00_Q1", "CCD17_Q1", "CCD01_Q5", "ccd01_q1"])
def test_rejects_malformed_extname(tmp_path, extname):
    hdul = build_exposure()
    hdul[1].header["EXTNAME"] = extname
    reason = rejected(write(hdul, tmp_path / "exp.fits")).reason
    assert reason.startswith(f"HDU 1: EXTNAME {extname!r} is not of the form 'CCDnn_Qm'")


def test_rejects_duplicate_extname(tmp_path):
    hdul = build_exposure(quadrants=((1, 1), (1, 2), (1, 1)))
    reason = rejected(write(hdul, tmp_path / "exp.fits")).reason
    assert reason == "HDU 3 (CCD01_Q1): EXTNAME duplicates that of HDU 1"


@pytest.mark.parametrize("key", ["CCD_ID", "QID"])
def test_rejects_id_disagreeing_with_extname(tmp_path, key):
    hdul = build_exposure()
    hdul[2].header[key] = 3
    reason = rejected(write(hdul, tmp_path / "exp.fits")).reason
    assert reason == f"HDU 2 (CCD01_Q2): {key} = 3 disagrees with EXTNAME"


@pytest.mark.parametrize("text", ["[1:16,1:20", "[16:1,1:20]", "1:16,1:20"])
def test_rejects_malformed_datasec(tmp_path, text):
    hdul = build_exposure()
    hdul[1].header["DATASEC"] = text
    reason = rejected(write(hdul, tmp_path / "exp.fits")).reason
    assert reason.startswith("HDU 1 (CCD01_Q1): DATASEC is malformed")
    assert repr(text) in reason


@pytest.mark.parametrize(
    ("key", "text", "problem"),
    [
        ("DATASEC", "[1:16,1:21]", "does not fit the array (NAXIS1 = 20, NAXIS2 = 20)"),
        ("BIASSEC", "[17:21,1:20]", "does not fit the array (NAXIS1 = 20, NAXIS2 = 20)"),
        ("BIASSEC", "[17:20,2:20]", "does not cover the same rows as DATASEC"),
        ("BIASSEC", "[16:20,1:20]", "overlaps DATASEC"),
        ("DETSEC", "[1:15,1:20]", "is not the size of DATASEC"),
    ],
)
def test_rejects_sections_that_do_not_fit(tmp_path, key, text, problem):
    hdul = build_exposure()
    hdul[1].header[key] = text
    reason = rejected(write(hdul, tmp_path / "exp.fits")).reason
    assert reason.startswith(f"HDU 1 (CCD01_Q1): {key} {text!r}")
    assert problem in reason


def test_rejects_array_that_is_not_2d(tmp_path):
    hdul = build_exposure()
    header = hdul[2].header.copy()
    hdul[2] = fits.ImageHDU(np.zeros((2, NY, NX_DATA + N_OVERSCAN), np.uint16), header=header)
    reason = rejected(write(hdul, tmp_path / "exp.fits")).reason
    assert reason == "HDU 2 (CCD01_Q2): array is not 2-D (NAXIS = 3)"


def test_rejects_table_extension(tmp_path):
    hdul = build_exposure()
    hdul.append(fits.BinTableHDU(Table({"x": [1, 2]}), name="CCD01_Q3"))
    reason = rejected(write(hdul, tmp_path / "exp.fits")).reason
    assert reason == "HDU 3 (CCD01_Q3): is a BinTableHDU, not an image extension"


def test_rejects_science_without_wcs(tmp_path):
    hdul = build_exposure()
    for key in _tan_sip_cards(1, 2):
        del hdul[2].header[key]
    reason = rejected(write(hdul, tmp_path / "exp.fits")).reason
    assert reason == (
        "HDU 2 (CCD01_Q2): science quadrant has no celestial WCS (keyword CTYPE1 missing)"
    )


def test_rejects_science_with_non_tan_wcs(tmp_path):
    hdul = build_exposure()
    hdul[1].header["CTYPE1"] = "RA---CAR"
    assert "CTYPE1 = 'RA---CAR'" in rejected(write(hdul, tmp_path / "exp.fits")).reason


def test_rejects_float_file_with_all_nan_data_section(tmp_path):
    hdul = build_exposure(float_data=True)
    datasec = parse_section(hdul[2].header["DATASEC"])
    hdul[2].data[datasec] = np.nan  # the overscan stays finite
    reason = rejected(write(hdul, tmp_path / "exp.fits")).reason
    assert reason == "HDU 2 (CCD01_Q2): data section (DATASEC) is entirely non-finite"


def test_raw_file_error_survives_pickling():
    err = pickle.loads(pickle.dumps(RawFileError("/raw/a.fits", "HDU 1: bad")))
    assert (err.path, err.reason, str(err)) == (
        "/raw/a.fits",
        "HDU 1: bad",
        "/raw/a.fits: HDU 1: bad",
    )


def test_raw_file_error_is_one_line():
    err = RawFileError(Path("/raw/a.fits"), "astropy said:\n  something\nbad")
    assert str(err) == "/raw/a.fits: astropy said: something bad"


# --- reference catalogs ----------------------------------------------------------------


def _refcat_table(n: int = 5) -> Table:
    rng = np.random.default_rng(7)
    table = Table()
    table["source_id"] = np.arange(n, dtype=np.int64) + 4_000_000_000_000
    table["ra"] = rng.uniform(149.0, 151.0, n)
    table["dec"] = rng.uniform(1.0, 3.0, n)
    for band in "gri":
        table[f"{band}_mag"] = rng.uniform(14.0, 20.0, n)
        table[f"{band}_magerr"] = rng.uniform(0.001, 0.05, n)
    table["bp_rp"] = rng.uniform(0.2, 2.5, n)
    return table


@pytest.mark.parametrize("fmt", ["ascii.ecsv", "fits"])
def test_read_refcat(tmp_path, fmt):
    table = _refcat_table()
    path = tmp_path / "refcat.dat"  # the format comes from the content
    table.write(path, format=fmt)
    catalog = read_refcat(path)
    assert len(catalog) == 5
    assert catalog.path == str(path)
    assert catalog.source_id.dtype == np.int64
    np.testing.assert_array_equal(catalog.source_id, table["source_id"])
    for name in REFCAT_COLUMNS[1:]:
        values = getattr(catalog, name)
        assert values.dtype == np.float64
        np.testing.assert_array_equal(values, table[name])
        assert not values.flags.writeable


def test_read_refcat_masked_magnitudes_become_nan(tmp_path):
    table = _refcat_table()
    table["i_mag"] = MaskedColumn(table["i_mag"], mask=[False, True, False, False, False])
    path = tmp_path / "refcat.ecsv"
    table.write(path, format="ascii.ecsv")
    i_mag = read_refcat(path).i_mag
    assert np.isnan(i_mag[1])
    assert np.isfinite(np.delete(i_mag, 1)).all()


@pytest.mark.parametrize("fmt", ["ascii.ecsv", "fits"])
def test_read_refcat_rejects_missing_column(tmp_path, fmt):
    table = _refcat_table()
    del table["r_mag"]
    path = tmp_path / "refcat"
    table.write(path, format=fmt)
    with pytest.raises(RawFileError) as info:
        read_refcat(path)
    assert str(info.value) == f"{path}: reference catalog: column 'r_mag' missing"


def test_read_refcat_rejects_duplicate_ids(tmp_path):
    table = _refcat_table()
    table["source_id"][3] = table["source_id"][1]
    path = tmp_path / "refcat.ecsv"
    table.write(path, format="ascii.ecsv")
    with pytest.raises(RawFileError, match=f"duplicate source_id {table['source_id'][1]}"):
        read_refcat(path)


def test_read_refcat_rejects_non_integer_ids(tmp_path):
    table = _refcat_table()
    table["source_id"] = table["source_id"].astype(np.float64)
    path = tmp_path / "refcat.fits"
    table.write(path, format="fits")
    with pytest.raises(RawFileError, match="column 'source_id' must be integer, got float64"):
        read_refcat(path)


def test_read_refcat_rejects_bad_positions(tmp_path):
    table = _refcat_table()
    table["dec"][0] = 91.0
    path = tmp_path / "refcat.ecsv"
    table.write(path, format="ascii.ecsv")
    with pytest.raises(RawFileError, match="column 'dec' has 1 missing or out-of-range"):
        read_refcat(path)


def test_read_refcat_rejects_other_files(tmp_path):
    path = tmp_path / "refcat.csv"
    path.write_text("source_id,ra\n1,2\n")
    with pytest.raises(RawFileError, match="neither a FITS nor an ECSV table"):
        read_refcat(path)


# --- properties (Hypothesis) -----------------------------------------------------------

_PIXEL = st.integers(min_value=1, max_value=100_000)
_SPACE = st.sampled_from(["", " ", "  "])


@given(x=st.tuples(_PIXEL, _PIXEL), y=st.tuples(_PIXEL, _PIXEL), pad=st.lists(_SPACE, min_size=6))
def test_parse_section_round_trips_every_valid_section(x, y, pad):
    (x1, x2), (y1, y2) = sorted(x), sorted(y)
    text = f"{pad[0]}[{pad[1]}{x1}:{x2}{pad[2]},{pad[3]}{y1}:{y2}{pad[4]}]{pad[5]}"
    rows, cols = parse_section(text)
    assert (cols.start + 1, cols.stop, rows.start + 1, rows.stop) == (x1, x2, y1, y2)
    # The slices cut exactly the section's pixels (a broadcast array: no memory).
    full = np.broadcast_to(np.float32(0), (y2 + 1, x2 + 1))
    assert full[rows, cols].shape == (y2 - y1 + 1, x2 - x1 + 1)


_SECTION_ALPHABET = st.sampled_from([*"[]:,0123456789- +x\t", "\n", "１", "٣"])


@given(text=st.one_of(st.text(), st.text(_SECTION_ALPHABET, max_size=20)))
def test_parse_section_accepts_only_valid_sections(text):
    """Any text: a valid 1-based section, or a ValueError that quotes it."""
    stripped = text.strip()
    well_formed = re.fullmatch(r"\[ *\d+ *: *\d+ *, *\d+ *: *\d+ *\]", stripped, re.ASCII)
    if well_formed is None:
        with pytest.raises(ValueError, match="section") as info:
            parse_section(text)
        assert repr(text) in str(info.value)
        return
    x1, x2, y1, y2 = (int(v) for v in re.findall(r"\d+", stripped))
    if x1 < 1 or y1 < 1 or x2 < x1 or y2 < y1:
        with pytest.raises(ValueError, match="section"):
            parse_section(text)
        return
    assert parse_section(text) == (slice(y1 - 1, y2), slice(x1 - 1, x2))


# Values a sequencer might put in a keyword: right and wrong types, edge numbers.
_VALUES = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.booleans(),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
)
_MUTABLE = (
    [(0, k) for k in (*SCIENCE_KEYWORDS, "LEDID", "INSTRUME")]
    + [(1, k) for k in QUADRANT_KEYWORDS]
    + [(1, "NAXIS1"), (2, "CTYPE1")]
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    imagetyp=st.sampled_from(["SCIENCE", "FLAT", "BIAS"]),
    changes=st.lists(
        st.tuples(st.sampled_from(_MUTABLE), st.one_of(st.none(), _VALUES)), min_size=1, max_size=3
    ),
)
def test_any_header_damage_is_accepted_or_rejected_with_one_line(tmp_path, imagetyp, changes):
    """Set or delete (None) up to three keywords of a valid file to arbitrary values:
    the file validates, or is rejected with a one-line RawFileError that names it,
    never another exception or a leaked astropy warning; values read back are the
    values written."""
    hdul = build_exposure(imagetyp)
    path = tmp_path / f"h{abs(hash(repr(changes))) % 10**12}.fits"
    try:
        for (hdu, key), value in changes:
            header = hdul[hdu].header
            if value is None:
                header.remove(key, ignore_missing=True)
            elif key != "NAXIS1":  # the array fixes it; only deleting it damages a header
                header[key] = value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy's own write-time notes
            hdul.writeto(path, overwrite=True, output_verify="silentfix")
    except (fits.VerifyError, ValueError, OSError, TypeError):
        return  # astropy refuses to set or write it (e.g. inf): no file to judge
    try:
        exposure = validate_file(path)
    except RawFileError:
        rejected(path)
        return
    with fits.open(path) as written:
        primary = written[0].header
        assert exposure.header.expid == primary["EXPID"]
        assert exposure.header.mjd == float(primary["MJD-OBS"])
        assert exposure.header.imagetyp == IMAGETYP_ALIASES[primary["IMAGETYP"].strip().upper()]
