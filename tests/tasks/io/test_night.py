"""Tests for tasks.io.night: the observing night runs local noon to local noon."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import PurePosixPath

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tasks.io.night import PALOMAR_LONGITUDE_DEG, observing_night
from tasks.io.store import read_group

MJD_ZERO = dt.datetime(1858, 11, 17)
PALOMAR_OFFSET = dt.timedelta(hours=7, minutes=47, seconds=27.6)  # 116.865 deg / 15 deg per h


def mjd(utc: dt.datetime) -> float:
    return (utc - MJD_ZERO) / dt.timedelta(days=1)


def palomar(local: dt.datetime) -> float:
    """MJD of a Palomar local mean solar time."""
    return mjd(local + PALOMAR_OFFSET)


def test_palomar_offset_matches_the_longitude():
    assert PALOMAR_OFFSET / dt.timedelta(hours=1) == pytest.approx(-PALOMAR_LONGITUDE_DEG / 15)


def test_evening_and_after_midnight_share_the_evening_date():
    evening = palomar(dt.datetime(2026, 3, 10, 18, 0))  # 01:47 UTC on 11 March
    morning = palomar(dt.datetime(2026, 3, 11, 3, 0))
    assert observing_night(evening) == "2026-03-10"
    assert observing_night(morning) == "2026-03-10"
    assert observing_night(morning, PALOMAR_LONGITUDE_DEG) == "2026-03-10"


def test_night_changes_at_local_noon():
    second = dt.timedelta(seconds=1)
    noon = dt.datetime(2026, 3, 11, 12, 0)
    assert observing_night(palomar(noon - second)) == "2026-03-10"
    assert observing_night(palomar(noon + second)) == "2026-03-11"
    # Afternoon calibrations belong to the night that follows.
    assert observing_night(palomar(dt.datetime(2026, 3, 11, 15, 30))) == "2026-03-11"


def test_year_boundary():
    assert observing_night(palomar(dt.datetime(2027, 1, 1, 2, 0))) == "2026-12-31"


def test_eastern_longitude():
    lon = 150.0  # local mean time = UTC + 10 h

    def local(t: dt.datetime) -> float:
        return mjd(t - dt.timedelta(hours=10))

    assert observing_night(local(dt.datetime(2026, 3, 10, 18, 0)), lon) == "2026-03-10"
    # 23:00 UTC on 10 March is 09:00 local on the 11th: still the night of the 10th.
    assert observing_night(local(dt.datetime(2026, 3, 11, 9, 0)), lon) == "2026-03-10"
    # 03:00 UTC on 11 March is 13:00 local: the next night has begun.
    assert observing_night(local(dt.datetime(2026, 3, 11, 13, 0)), lon) == "2026-03-11"
    assert observing_night(local(dt.datetime(2026, 3, 11, 11, 59, 59)), lon) == "2026-03-10"


def test_longitude_conventions_agree():
    t = mjd(dt.datetime(2026, 3, 11, 4, 0))  # 18:00 local mean time at 150 W
    assert observing_night(t, 210.0) == observing_night(t, -150.0) == "2026-03-10"


def test_tiny_survey_nights_follow_mjd(tiny_survey):
    exposures = read_group(tiny_survey.truth, "exposures")
    nights = exposures["night"].values.tolist()
    assert nights == [observing_night(float(m)) for m in exposures["mjd"].values]
    assert sorted(set(nights)) == list(tiny_survey.nights)


def test_raw_folder_is_not_the_night(tiny_survey):
    exposures = read_group(tiny_survey.truth, "exposures")
    folders = [PurePosixPath(p).parts[0] for p in exposures["path"].values.tolist()]
    labels = [n.replace("-", "") for n in exposures["night"].values.tolist()]
    assert all(len(f) == 8 and f.isdigit() for f in folders)  # UTC date YYYYMMDD
    differs = [f != n for f, n in zip(folders, labels, strict=True)]
    assert any(differs)
    assert not all(differs)  # so no fixed shift maps a folder to its night either


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_rejects_non_finite_mjd(value):
    with pytest.raises(ValueError, match="mjd must be finite"):
        observing_night(value)


@pytest.mark.parametrize("lon", [500.0, -180.5, math.nan])
def test_rejects_bad_longitude(lon):
    with pytest.raises(ValueError, match="longitude_deg"):
        observing_night(60000.0, lon)


@settings(max_examples=300, deadline=None, database=None)
@given(
    t=st.floats(min_value=40_000.0, max_value=80_000.0),
    lon=st.floats(min_value=-180.0, max_value=180.0),
)
def test_night_is_the_local_date_twelve_hours_earlier(t, lon):
    lon = (lon + 180.0) % 360.0 - 180.0  # +180 and -180 are one meridian
    local_days = t + lon / 360.0 - 0.5
    # Exactly at local noon the label is decided by the last bit; stay clear of it.
    assume(abs(local_days - round(local_days)) > 1e-6)
    local_mean_time = MJD_ZERO + dt.timedelta(days=t) + dt.timedelta(hours=lon / 15.0)
    expected = (local_mean_time - dt.timedelta(hours=12)).date()
    assert expected == (MJD_ZERO + dt.timedelta(days=math.floor(local_days))).date()
    night = observing_night(t, lon)
    assert night == expected.isoformat()
    next_night = dt.date.fromisoformat(observing_night(t + 1.0, lon))
    assert next_night - dt.date.fromisoformat(night) == dt.timedelta(days=1)
