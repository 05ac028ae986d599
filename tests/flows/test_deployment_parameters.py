"""What operators type into the UI form is checked by the deployment's parameter
schema, as the Prefect server checks it at submission (``validate`` with
``raise_on_error``, the server's call), and again by pydantic in the flow."""

from __future__ import annotations

import datetime as dt
import functools
import re
from typing import get_args

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import (
    ValidationError,
    preprocess_schema,
    validate,
)
from pydantic import ValidationError as PydanticError

from flows import deployments
from flows.deployments import last_night
from flows.forms import DATE_PATTERN, NightRange
from flows.pipeline import NIGHTLY_STAGES, STAGES

FLOWS = [
    deployments.nightly,
    deployments.backfill,
    deployments.ubercal,
    deployments.masters,
    deployments.lightcurves,
    deployments.train_zp,
    deployments.score_zp,
    deployments.device_check,
]


@functools.cache
def _schema_of(name: str) -> dict:
    return parameter_schema(getattr(deployments, name)).model_dump_for_openapi()


def _schema(flow) -> dict:
    return _schema_of(flow.fn.__name__)


def _server_accepts(flow, parameters: dict) -> bool:
    """What the server answers (409 when False): its own call."""
    try:
        validate(parameters, _schema(flow), raise_on_error=True)
    except ValidationError:
        return False
    return True


@functools.cache
def _backfill_validator() -> jsonschema.Draft202012Validator:
    # The server's call also checks the schema itself each time (0.1 s); the
    # property tests check many instances against it once checked.
    return jsonschema.Draft202012Validator(preprocess_schema(_schema(deployments.backfill)))


def _range_accepted(start: dt.date, end: dt.date) -> bool:
    nights = {"start": start.isoformat(), "end": end.isoformat()}
    return _backfill_validator().is_valid({"nights": nights})


@pytest.mark.parametrize("flow", FLOWS, ids=lambda f: f.name)
def test_every_parameter_explains_itself(flow):
    schema = _schema(flow)
    required = set(schema.get("required", []))
    for name, prop in schema["properties"].items():
        assert len(prop.get("description", "")) > 20, (flow.name, name)
        assert name in required or "default" in prop, (flow.name, name)
    nested = schema["definitions"].get("NightRange", {}).get("properties", {})
    for name, prop in nested.items():
        assert "evening" in prop["description"], name


def test_backfill_form_shows_the_stage_choices_and_default():
    stages = _schema(deployments.backfill)["properties"]["stages"]
    assert stages["default"] == list(NIGHTLY_STAGES)
    assert stages["items"]["enum"] == [s for s in STAGES if s != "lightcurves"]
    assert get_args(deployments.BackfillStage) == tuple(stages["items"]["enum"])


@pytest.mark.parametrize(
    ("flow", "parameters", "accepted"),
    [
        (deployments.backfill, {"nights": {"start": "2026-03-10", "end": "2026-03-11"}}, True),
        (deployments.backfill, {"nights": {"start": "2026-03-10", "end": "2026-03-10"}}, True),
        (deployments.backfill, {"nights": {"start": "2026-03-11", "end": "2026-03-10"}}, False),
        (deployments.backfill, {"nights": {"start": "2026-12-31", "end": "2026-01-01"}}, False),
        (deployments.backfill, {"nights": {"start": "2026-13-01", "end": "2027-01-01"}}, False),
        (deployments.backfill, {"nights": {"start": "2026-02-29", "end": "2026-03-11"}}, False),
        (deployments.backfill, {"nights": {"start": "2024-02-29", "end": "2026-03-11"}}, True),
        (
            deployments.backfill,
            {"nights": {"start": "2026-03-10", "end": "2026-03-11"}, "stages": ["teleport"]},
            False,
        ),
        (
            deployments.backfill,
            {"nights": {"start": "2026-03-10", "end": "2026-03-11"}, "stages": []},
            False,
        ),
        (
            deployments.backfill,
            {"nights": {"start": "2026-03-10", "end": "2026-03-11"}, "stages": ["lightcurves"]},
            False,
        ),
        (deployments.lightcurves, {"targets": "targets.ecsv"}, True),
        (
            deployments.lightcurves,
            {"targets": "t.ecsv", "nights": {"start": "2026-03-10", "end": "2026-03-12"}},
            True,
        ),
        (deployments.lightcurves, {}, False),
        (deployments.lightcurves, {"targets": ""}, False),
        (
            deployments.lightcurves,
            {"targets": "t.ecsv", "nights": {"start": "2026-03-12", "end": "2026-03-10"}},
            False,
        ),
        (deployments.nightly, {}, True),
        (deployments.nightly, {"night": "2026-03-10"}, True),
        (deployments.nightly, {"night": "2026-13-01"}, False),
        (deployments.masters, {"period": "2026-04-31"}, False),
        (deployments.score_zp, {"night": None}, True),
        (
            deployments.ubercal,
            {"band": "r", "nights": {"start": "2026-03-11", "end": "2026-03-10"}},
            False,
        ),
        (
            deployments.ubercal,
            {"band": "z", "nights": {"start": "2026-03-10", "end": "2026-03-11"}},
            False,
        ),
    ],
)
def test_server_side_schema_refuses_what_the_flow_would(flow, parameters, accepted):
    assert _server_accepts(flow, parameters) is accepted


dates = st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2199, 12, 31))


@settings(max_examples=150, deadline=None)
@given(start=dates, end=dates)
def test_range_rule_is_end_not_before_start(start, end):
    """The digit-by-digit JSON-schema rule against the calendar's order, on any
    two dates."""
    assert _range_accepted(start, end) is (end >= start)


@settings(max_examples=150, deadline=None)
@given(start=dates, days=st.integers(0, 400))
def test_range_rule_near_the_diagonal(start, days):
    """Dates a day, a month, a year apart differ in the last digits only."""
    end = start + dt.timedelta(days=days)
    assert _range_accepted(start, end)
    if days:
        assert not _range_accepted(end, start)


@given(day=dates)
def test_date_pattern_accepts_every_calendar_date(day):
    assert re.match(DATE_PATTERN, day.isoformat())


@pytest.mark.parametrize(
    "text", ["2026-13-01", "2026-00-10", "2026-02-30", "2100-02-29", "2026-04-31", "26-03-10"]
)
def test_date_pattern_refuses_what_is_not_a_date(text):
    assert not re.match(DATE_PATTERN, text)


def test_night_range_is_expanded_to_nights():
    r = NightRange(start=dt.date(2026, 2, 27), end=dt.date(2026, 3, 2))
    assert r.nights() == ["2026-02-27", "2026-02-28", "2026-03-01", "2026-03-02"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": "2026-03-11", "end": "2026-03-10"}, "before start"),
        ({"start": "2000-01-01", "end": "2026-03-11"}, "split backfills"),
        ({"start": "2026-02-30", "end": "2026-03-11"}, "date"),
    ],
)
def test_bad_ranges_are_refused_in_python_with_the_reason(kwargs, message):
    with pytest.raises(PydanticError, match=message):
        NightRange(**kwargs)


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
