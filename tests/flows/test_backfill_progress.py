"""The backfill's progress description: nights done, and when the rest should be."""

from __future__ import annotations

import datetime as dt

import pytest

from flows.backfill_progress import eta_text, progress_key

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("elapsed_s", "done", "total", "expected"),
    [
        (0.0, 0, 10, "ETA after the first night"),
        # 2 nights in 10 min: 8 more take 40 min.
        (600.0, 2, 10, "ETA 2026-12-02 12:40 UTC (in 40 min)"),
        (3600.0, 1, 3, "ETA 2026-12-02 14:00 UTC (in 2 h 00 min)"),
        (10.0, 9, 10, "ETA 2026-12-02 12:00 UTC (in under a minute)"),
        (100.0, 10, 10, "all nights done"),
    ],
)
def test_eta_is_the_rest_at_the_rate_so_far(elapsed_s, done, total, expected):
    assert eta_text(elapsed_s, done, total, NOW) == expected


def test_each_run_has_its_own_key():
    a = progress_key("0b7e8a2c-1111-4c5e-9a44-6f7a3d2e9b10")
    b = progress_key("5d1f0c3e-2222-4c5e-9a44-6f7a3d2e9b10")
    assert a != b
    assert a.startswith("backfill-progress-")
    assert a == a.lower()
