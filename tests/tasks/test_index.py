"""Tests for the plain functions of tasks.index on the tiny simulated survey."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tasks.index import (
    UNKNOWN_NIGHT,
    find_raw_files,
    group_by_night,
    index_row,
    mark_duplicate_expids,
    rows_to_dataset,
)
from tasks.io.night import PALOMAR_LONGITUDE_DEG, observing_night
from tasks.io.store import read_group

REASON_WORDS = {
    "truncated": "truncated",
    "missing_keyword": "MJD-OBS",
    "not_fits": "FITS",
    "unknown_imagetyp": "FOCUS",
    "bad_section": "DATASEC",
}
READABLE_MJD = {"truncated", "unknown_imagetyp", "bad_section"}


@pytest.fixture(scope="module")
def truth(tiny_survey) -> xr.Dataset:
    return read_group(tiny_survey.truth, "exposures")


@pytest.fixture(scope="module")
def rows(tiny_survey) -> list[dict]:
    """Index rows of the untouched tiny raw tree; copy a row before changing it."""
    raw = str(tiny_survey.raw)
    return [index_row(raw, p, PALOMAR_LONGITUDE_DEG) for p in find_raw_files(raw)]


def fresh(rows: list[dict]) -> list[dict]:
    return [dict(r) for r in rows]


@pytest.fixture
def raw_copy(tiny_survey, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_survey.raw, tmp_path / "raw"))


def _relpath(tiny_survey, kind: str) -> str:
    return tiny_survey.bad_files[kind].relative_to(tiny_survey.raw).as_posix()


# --- finding files ---------------------------------------------------------------------


def test_find_raw_files_finds_every_file(tiny_survey, truth):
    found = find_raw_files(tiny_survey.raw)
    assert len(found) == truth.sizes["exposure"] + len(REASON_WORDS)
    assert found == sorted(found)
    expected = set(truth["path"].values.tolist()) | {
        _relpath(tiny_survey, kind) for kind in REASON_WORDS
    }
    assert set(found) == expected
    assert all(not Path(p).is_absolute() and (tiny_survey.raw / p).is_file() for p in found)


def test_find_raw_files_skips_hidden_and_partial_files(tiny_survey, raw_copy):
    before = find_raw_files(tiny_survey.raw)
    night_dir = raw_copy / Path(before[0]).parent
    shutil.copy(raw_copy / before[0], night_dir / ".hidden.fits")
    for suffix in (".part", ".tmp", ".lock"):
        shutil.copy(raw_copy / before[0], night_dir / f"incoming.fits{suffix}")
    (raw_copy / ".snapshot" / "deep").mkdir(parents=True)
    shutil.copy(raw_copy / before[0], raw_copy / ".snapshot" / "deep" / "old.fits")
    (raw_copy / "extra" / "deeper").mkdir(parents=True)
    shutil.copy(raw_copy / before[0], raw_copy / "extra" / "deeper" / "renamed.dat")
    assert find_raw_files(raw_copy) == sorted([*before, "extra/deeper/renamed.dat"])


def test_find_raw_files_needs_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_raw_files(tmp_path / "absent")


# --- validating files ------------------------------------------------------------------


def test_good_files_match_the_truth(tiny_survey, truth, rows):
    by_path = {r["path"]: r for r in rows}
    for i, path in enumerate(truth["path"].values.tolist()):
        row = by_path[path]
        assert (row["status"], row["reason"]) == ("ok", ""), path
        assert row["expid"] == int(truth["expid"][i])
        assert row["imagetyp"] == truth["imagetyp"].values[i]
        assert row["filter"] == truth["band"].values[i]
        assert row["mjd"] == pytest.approx(float(truth["mjd"][i]), rel=0, abs=1e-8)
        assert row["night"] == truth["night"].values[i]
        assert row["n_quadrants"] == 8


@pytest.mark.parametrize("kind", sorted(REASON_WORDS))
def test_damaged_files_are_rejected_with_a_reason(tiny_survey, rows, kind):
    row = next(r for r in rows if r["path"] == _relpath(tiny_survey, kind))
    assert row["status"] == "rejected"
    assert REASON_WORDS[kind] in row["reason"]
    assert "\n" not in row["reason"]
    if kind in READABLE_MJD:
        assert row["night"] == observing_night(row["mjd"])
        assert row["night"] in tiny_survey.nights
    else:
        assert np.isnan(row["mjd"])
        assert row["night"] == UNKNOWN_NIGHT


@pytest.mark.parametrize("content", [None, b""])
def test_missing_or_empty_file_is_rejected_without_a_night(tmp_path, content):
    if content is not None:
        (tmp_path / "exp.fits").write_bytes(content)
    row = index_row(str(tmp_path), "exp.fits", PALOMAR_LONGITUDE_DEG)
    assert (row["status"], row["night"], row["path"]) == ("rejected", UNKNOWN_NIGHT, "exp.fits")
    assert "cannot be opened" in row["reason"]


def test_validating_never_modifies_raw_files(tiny_survey):
    def digests() -> dict[str, tuple[str, int]]:
        return {
            str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(tiny_survey.raw.rglob("*"))
            if p.is_file()
        }

    before = digests()
    raw = str(tiny_survey.raw)
    for path in find_raw_files(raw):
        index_row(raw, path, PALOMAR_LONGITUDE_DEG)
    assert digests() == before


# --- duplicates and nights -------------------------------------------------------------


@pytest.mark.parametrize("copy_name", ["zz/copy.fits", "00000000/copy.fits"])
def test_duplicate_expid_rejects_the_later_path(tiny_survey, raw_copy, copy_name):
    original = find_raw_files(raw_copy)[0]
    (raw_copy / copy_name).parent.mkdir()
    shutil.copy(raw_copy / original, raw_copy / copy_name)
    rows = [index_row(str(raw_copy), p, PALOMAR_LONGITUDE_DEG) for p in find_raw_files(raw_copy)]
    random.Random(0).shuffle(rows)  # first by path wins, whatever the order of the rows
    mark_duplicate_expids(rows)
    first, second = sorted([original, copy_name])
    by_path = {r["path"]: r for r in rows}
    assert by_path[first]["status"] == "ok"
    assert by_path[second]["status"] == "rejected"
    expid = by_path[first]["expid"]
    assert f"EXPID {expid}" in by_path[second]["reason"]
    assert first in by_path[second]["reason"]
    rejected = sorted(r["path"] for r in rows if r["status"] == "rejected")
    damaged = [_relpath(tiny_survey, kind) for kind in REASON_WORDS]
    assert rejected == sorted([second, *damaged])


def test_group_by_night_without_filter_keeps_every_row(tiny_survey, rows):
    groups = group_by_night(fresh(rows))
    assert list(groups) == sorted([*tiny_survey.nights, UNKNOWN_NIGHT])
    assert sum(len(g) for g in groups.values()) == len(rows)
    for night, group in groups.items():
        assert all(r["night"] == night for r in group)
    assert sorted(r["path"] for r in groups[UNKNOWN_NIGHT]) == sorted(
        _relpath(tiny_survey, kind) for kind in REASON_WORDS.keys() - READABLE_MJD
    )


def test_group_by_night_filter_keeps_unknown_night(tiny_survey, rows):
    second = tiny_survey.nights[1]
    groups = group_by_night(fresh(rows), [second])
    assert list(groups) == [second, UNKNOWN_NIGHT]
    assert len(groups[second]) == sum(r["night"] == second for r in rows)
    assert group_by_night(fresh(rows), ["1999-01-01"]).keys() == {UNKNOWN_NIGHT}


# --- the index dataset -----------------------------------------------------------------


def test_rows_to_dataset_columns_and_dtypes(rows):
    ds = rows_to_dataset(fresh(rows))
    expected = {
        "path": object,
        "expid": np.int64,
        "imagetyp": object,
        "filter": object,
        "mjd": np.float64,
        "status": object,
        "reason": object,
    }
    for name, dtype in expected.items():
        assert ds[name].dims == ("file",), name
        assert ds[name].dtype == dtype, name
    assert ds.sizes["file"] == len(rows)
    assert ds["path"].values.tolist() == sorted(r["path"] for r in rows)
    by_path = {r["path"]: r for r in rows}
    for i, path in enumerate(ds["path"].values.tolist()):
        assert ds["status"].values[i] == by_path[path]["status"]
        assert ds["reason"].values[i] == by_path[path]["reason"]
        assert ds["expid"].values[i] == by_path[path]["expid"]


def test_rows_to_dataset_is_deterministic(rows):
    shuffled = fresh(rows)
    random.Random(1).shuffle(shuffled)
    xr.testing.assert_identical(rows_to_dataset(fresh(rows)), rows_to_dataset(shuffled))
