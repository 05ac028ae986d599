"""The bad-input corpus (sim/badfiles.py, every kind) against the index stage's
functions: each bad file rejected with a one-line reason naming the file and the
problem, the good files untouched by it, the raw bytes never modified; a reference
catalog with missing columns refused with its reason."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import pytest

from sim.badfiles import ALL_KINDS, DEMO_KINDS, write_bad_files, write_refcat_missing_columns
from tasks.index import find_raw_files, group_by_night, index_row, rows_to_dataset
from tasks.io.night import PALOMAR_LONGITUDE_DEG
from tasks.io.raw import RawFileError, read_refcat, validate_file
from tasks.io.store import read_group

#: Kind -> words its reason must contain (the problem, and the HDU/keyword).
REASONS = {
    "truncated": ("truncated", "HDU"),
    "missing_keyword": ("keyword MJD-OBS missing",),
    "not_fits": ("cannot be opened as FITS",),
    "unknown_imagetyp": ("IMAGETYP 'FOCUS'",),
    "bad_section": ("DATASEC", "does not fit"),
    "random_bytes": ("cannot be opened as FITS",),
    "mistyped_keyword": ("EXPTIME must be a number", "'thirty'"),
    "wrong_bitpix": ("BITPIX = 32", "HDU 1"),
    "wrong_shape": ("not 2-D", "NAXIS = 3"),
    "wrong_geometry": ("quadrant layout", "64x128", "128x128"),
    "all_nan_quadrant": ("entirely non-finite", "HDU 2"),
    "all_zero_quadrant": ("constant", "0 ADU", "HDU 2"),
    "duplicate_expid": ("EXPID", "duplicates"),
    "flat_without_ledid": ("keyword LEDID missing",),
    "unknown_filter": ("FILTER 'z'",),
}


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def indexed(bad_corpus) -> tuple[dict[str, str], dict[str, list[dict]]]:
    """Digests of the raw tree before indexing, and the rows per night."""
    raw, _ = bad_corpus
    before = _digests(raw)
    rows = [index_row(str(raw), p, PALOMAR_LONGITUDE_DEG) for p in find_raw_files(raw)]
    return before, group_by_night(rows)


def test_the_corpus_has_every_kind(bad_corpus):
    _, bad = bad_corpus
    assert set(bad) == set(ALL_KINDS) == set(REASONS)
    assert len(ALL_KINDS) == 15


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_each_bad_file_is_rejected_with_its_reason(bad_corpus, indexed, kind):
    raw, bad = bad_corpus
    _, by_night = indexed
    rel = bad[kind].relative_to(raw).as_posix()
    (row,) = [r for rows in by_night.values() for r in rows if r["path"] == rel]
    assert row["status"] == "rejected"
    for word in REASONS[kind]:
        assert word in row["reason"], (kind, row["reason"])
    assert "\n" not in row["reason"]
    # The stored index row names the file; the exception, when one is raised, too.
    ds = rows_to_dataset(by_night[row["night"]])
    i = ds["path"].values.tolist().index(rel)
    assert (ds["status"].values[i], ds["reason"].values[i]) == ("rejected", row["reason"])
    if kind not in ("duplicate_expid", "wrong_geometry"):  # judged night by night
        with pytest.raises(RawFileError) as err:
            validate_file(bad[kind])
        assert str(err.value).startswith(f"{bad[kind]}: ")
        assert len(str(err.value).splitlines()) == 1


def test_good_files_are_all_accepted(tiny_survey, indexed):
    _, by_night = indexed
    truth = read_group(tiny_survey.truth, "exposures")
    ok = sorted(r["path"] for rows in by_night.values() for r in rows if r["status"] == "ok")
    assert ok == sorted(truth["path"].values.tolist())
    n_rejected = sum(r["status"] == "rejected" for rows in by_night.values() for r in rows)
    assert n_rejected == len(ALL_KINDS)


def test_raw_files_are_byte_identical_after_indexing(bad_corpus, indexed):
    raw, _ = bad_corpus
    before, _ = indexed
    for p in find_raw_files(raw):  # and once more, reading pixels
        with contextlib.suppress(RawFileError):
            validate_file(raw / p)
    assert _digests(raw) == before


@pytest.mark.parametrize("fmt", ["fits", "ecsv"])
def test_refcat_with_missing_columns_is_refused_with_its_reason(tiny_survey, tmp_path, fmt):
    path = write_refcat_missing_columns(tiny_survey.refcat, tmp_path / f"refcat.{fmt}")
    before = path.read_bytes()
    with pytest.raises(RawFileError) as err:
        read_refcat(path)
    message = str(err.value)
    assert message == f"{path}: reference catalog: column 'g_mag' missing"
    assert path.read_bytes() == before


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown bad-file kinds"):
        write_bad_files(tmp_path, tmp_path, tmp_path, kinds=("melted",))


def test_demo_kinds_keep_their_files(tiny_survey):
    """The session fixture (and the demo) still get exactly the five historical kinds."""
    assert tuple(tiny_survey.bad_files) == DEMO_KINDS
