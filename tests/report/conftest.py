"""The store the report tests read (tests/report/report_store.py)."""

from __future__ import annotations

import pytest
from report_store import build_report_store


@pytest.fixture(scope="session")
def report_store(tiny_survey, tmp_path_factory) -> str:
    return build_report_store(str(tmp_path_factory.mktemp("report") / "photocal.zarr"), tiny_survey)
