"""What the deployment forms accept, said in the parameters' JSON schema, so that
the Prefect server refuses a bad request when it is submitted (HTTP 409, no flow
run created) instead of a worker starting a run that fails.

Two rules need more than a field type:

- a night is a real calendar date (``2026-13-01`` and ``2026-02-30`` are not):
  the server checks ``pattern`` but not ``format``, so the date gets a pattern;
- a range of nights ends on or after its start. JSON Schema cannot compare two
  values, but ISO dates compare as strings, digit by digit, and "the first digit
  where they differ is larger in ``end``" is a finite rule over ten digits and
  eight positions (:func:`range_schema`). The pydantic validators say the same
  for callers in Python.

Dates are the *evening* dates of nights: the night of 2026-03-10 starts on that
evening and ends on the morning of the 11th (local time at the site).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_RANGE_NIGHTS = 3660
"""Longest range one run takes (10 years): a typo such as 2000 for 2026 must not
start decades of work."""

_DAY31 = r"(0[13578]|1[02])-(0[1-9]|[12]\d|3[01])"
_DAY30 = r"(0[469]|11)-(0[1-9]|[12]\d|30)"
_FEB = r"02-(0[1-9]|1\d|2[0-8])"
_LEAP = r"(\d\d(0[48]|[2468][048]|[13579][26])|([02468][048]|[13579][26])00)-02-29"
DATE_PATTERN = rf"^(\d{{4}}-({_DAY31}|{_DAY30}|{_FEB})|{_LEAP})$"
"""A Gregorian calendar date, YYYY-MM-DD (leap years included)."""

EVENING = (
    "the date of the night's evening, YYYY-MM-DD (the night of 2026-03-10 ends on the "
    "morning of the 11th, local time at the site)"
)

EveningDate = Annotated[dt.date, Field(json_schema_extra={"pattern": DATE_PATTERN})]
"""A night, by its evening date; a real calendar date in the JSON schema too."""


def date_field(default: Any, description: str) -> Any:
    """A flow parameter holding an evening date: the description and the date
    pattern go into the deployment's schema (flow signatures take pydantic
    ``Field`` defaults; Prefect drops the ``Annotated`` metadata's description)."""
    return Field(default, description=description, json_schema_extra={"pattern": DATE_PATTERN})


# Character positions of the digits in YYYY-MM-DD (the dashes are equal in any
# two valid dates).
_DIGITS = (0, 1, 2, 3, 5, 6, 8, 9)


def _both(position: int, start: str, end: str) -> dict[str, Any]:
    """``start`` has one of ``start`` digits and ``end`` one of ``end`` at ``position``."""
    return {
        "properties": {
            "start": {"pattern": f"^.{{{position}}}[{start}]"},
            "end": {"pattern": f"^.{{{position}}}[{end}]"},
        }
    }


def range_schema(positions: tuple[int, ...] = _DIGITS) -> dict[str, Any]:
    """JSON schema of ``end >= start`` for two YYYY-MM-DD strings ``start``, ``end``.

    At the first position: either ``end``'s digit is larger (done), or the two are
    equal and the rest must satisfy the same rule; equal to the last digit is
    ``end == start``. About 13 kB, no references, so it works wherever the
    object's schema is placed.
    """
    position, rest = positions[0], positions[1:]
    larger = [_both(position, str(d), f"{d + 1}-9") for d in range(9)]
    equal = [_both(position, str(d), str(d)) for d in range(10)]
    if not rest:
        return {"anyOf": [*larger, *equal]}
    return {"anyOf": [*larger, {"allOf": [{"anyOf": equal}, range_schema(rest)]}]}


def _add_range_rule(schema: dict[str, Any]) -> None:
    schema["allOf"] = [range_schema()]


class NightRange(BaseModel):
    """A range of nights, first and last included, by their evening dates."""

    model_config = ConfigDict(json_schema_extra=_add_range_rule, frozen=True)

    start: EveningDate = Field(description=f"First night: {EVENING}.")
    end: EveningDate = Field(
        description="Last night, included: its evening date, YYYY-MM-DD; not before start."
    )

    @model_validator(mode="after")
    def _check_range(self) -> NightRange:
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) is before start ({self.start})")
        n = (self.end - self.start).days + 1
        if n > MAX_RANGE_NIGHTS:
            raise ValueError(
                f"{n} nights requested; split backfills into at most {MAX_RANGE_NIGHTS}"
            )
        return self

    def nights(self) -> list[str]:
        """Every night of the range, YYYY-MM-DD, in order."""
        n = (self.end - self.start).days + 1
        return [(self.start + dt.timedelta(days=i)).isoformat() for i in range(n)]
