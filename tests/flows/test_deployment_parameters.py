"""What operators type into the UI form is validated before any work starts."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from flows.deployments import BackfillParameters, last_night
from flows.pipeline import NIGHTLY_STAGES


def test_backfill_range_is_expanded_to_nights():
    p = BackfillParameters(start=dt.date(2026, 2, 27), end=dt.date(2026, 3, 2))
    assert p.nights() == ["2026-02-27", "2026-02-28", "2026-03-01", "2026-03-02"]
    assert p.stages == list(NIGHTLY_STAGES)
    assert p.overwrite is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": "2026-03-11", "end": "2026-03-10"}, "before start"),
        ({"start": "2026-03-10", "end": "2026-03-11", "stages": ["teleport"]}, "teleport"),
        ({"start": "2026-03-10", "end": "2026-03-11", "stages": []}, "at least 1"),
        ({"start": "2000-01-01", "end": "2026-03-11"}, "split backfills"),
        ({"start": "2026-02-30", "end": "2026-03-11"}, "date"),
    ],
)
def test_bad_backfill_parameters_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        BackfillParameters(**kwargs)


@pytest.mark.parametrize(
    ("utc", "expected"),
    [
        # 15:00 UTC = 07:08 local mean time at Palomar: the night of the 10th just ended.
        ("2026-03-11T15:00:00", "2026-03-10"),
        # Late evening local time, still the 11th locally: the last ended night is the 10th.
        ("2026-03-12T05:00:00", "2026-03-10"),
    ],
)
def test_nightly_default_is_the_night_that_just_ended(utc, expected):
    now = dt.datetime.fromisoformat(utc).replace(tzinfo=dt.UTC)
    assert last_night(now, -116.865) == expected
