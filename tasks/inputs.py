"""What each stage needs in the store, night by night, so that nothing asked
for is skipped in silence (docs/store.md, "Missing inputs").

Before a stage runs, :func:`check_stage_inputs` sorts the nights into those it can
work on and those it cannot, each with the group that is missing or incomplete
and why. The flow runs the stage on the first, lists the second in the run's
summary and, when the nights were named (``--night``, the nightly deployment),
fails the run after the others ran (:class:`MissingInputError`). Over a range
(a backfill) the skipped nights are only listed; a stage left with no night at
all fails either way (:func:`raise_for_missing`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from prefect import task

from tasks.io import groups
from tasks.io.groups import UNKNOWN_NIGHT
from tasks.io.store import group_exists, list_children, list_groups, read_group

# Groups each stage reads per night ({night} filled in). Stages not listed
# (index reads raw files, transients simulates its pairs) have no store input.
_NIGHT = "{night}"
_CATALOGS = (groups.catalog(_NIGHT), groups.exposures(_NIGHT))
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "masters": (groups.index(_NIGHT),),
    "reduce": (groups.index(_NIGHT),),
    "photometry": (groups.index(_NIGHT),),
    "ubercal": _CATALOGS,
    "train": _CATALOGS,
    "score": _CATALOGS,
}
_HOW_TO_MAKE = {
    "index": "run the index stage (--raw)",
    "nights": "run the photometry stage, or `photocal ingest` a catalog",
}


class MissingInputError(RuntimeError):
    """Stages were asked for on nights that lack their input.

    ``missing`` lists ``{stage, night, group, reason}``; ``summary`` is the run's
    summary of what was done with the other nights.
    """

    def __init__(self, missing: list[dict[str, str]], summary: dict[str, Any] | None = None):
        self.missing = missing
        self.summary = summary
        lines = [f"{m['stage']} on {m['night']}: {m['group']} {m['reason']}" for m in missing]
        super().__init__(
            f"{len(missing)} requested stage-night(s) lack their input:\n  " + "\n  ".join(lines)
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.missing, self.summary))


def group_problem(store: str, group: str) -> str | None:
    """Why ``group`` cannot be read as a stage input, or None when it can."""
    if group_exists(store, group):
        if group.endswith("/catalog"):
            attrs = read_group(store, group, load=False).attrs
            lacking = [k for k in ("quad_nx", "quad_ny") if k not in attrs]
            if lacking:
                return f"lacks the {'/'.join(lacking)} attrs (the quadrant size)"
        return None
    parent, name = group.rsplit("/", 1)
    how = _HOW_TO_MAKE.get(group.split("/")[0], "run the stage that writes it")
    if name in list_children(store, parent):
        return (
            "is incomplete (no photocal_complete attr: an interrupted write, or written by "
            f"hand; {how})"
        )
    return f"is missing ({how})"


def candidate_nights(store: str, stage: str) -> list[str]:
    """The nights a stage would look at when none are named."""
    inputs = STAGE_INPUTS.get(stage, ())
    if not inputs:
        return []
    root = inputs[0].split("/")[0]
    found = list_groups(store, root) if root == groups.INDEX else list_children(store, root)
    return [n for n in found if n != UNKNOWN_NIGHT]


def check_stage_inputs(
    store: str, stage: str, nights: Iterable[str] | None
) -> tuple[list[str], list[dict[str, str]]]:
    """Split ``nights`` (default: every night the stage finds) into those whose
    inputs for ``stage`` are complete and the others, with the reason."""
    ok: list[str] = []
    missing: list[dict[str, str]] = []
    wanted = candidate_nights(store, stage) if nights is None else sorted(set(nights))
    for night in wanted:
        problem = None
        for template in STAGE_INPUTS.get(stage, ()):
            group = template.format(night=night)
            reason = group_problem(store, group)
            if reason is None and stage in ("reduce", "photometry"):
                reason = _science_problem(store, group)
            if reason is not None:
                problem = {"stage": stage, "night": night, "group": group, "reason": reason}
                break
        if problem is None:
            ok.append(night)
        else:
            missing.append(problem)
    return ok, missing


def _science_problem(store: str, group: str) -> str | None:
    index = read_group(store, group)
    science = index.imagetyp.values == "SCIENCE"
    if np.any(science & (index.status.values == "ok")):
        return None
    return (
        f"has no usable science exposure ({int(np.count_nonzero(science))} science file(s), "
        "all rejected)"
        if science.any()
        else "has no science exposure"
    )


def missing_raw_nights(requested: Iterable[str] | None, found: Iterable[str], raw: str) -> list:
    """The index stage's entries for named nights with no raw file under ``raw``."""
    have = set(found)
    return [
        {
            "stage": "index",
            "night": n,
            "group": groups.index(n),
            "reason": f"not written: no raw file of that night under {raw}",
        }
        for n in sorted(set(requested or ()))
        if n not in have
    ]


def unbuilt_masters(
    nights: Iterable[str], period_of: Callable[[str], str], built: Iterable[str]
) -> list[dict[str, str]]:
    """Nights whose period got no master bias (``built``: the groups written or
    kept by the masters stage): its period had no usable bias frame indexed."""
    done = set(built)
    return [
        {
            "stage": "masters",
            "night": night,
            "group": groups.bias(period_of(night)),
            "reason": "not built: no usable bias frame is indexed in its period",
        }
        for night in sorted(set(nights))
        if groups.bias(period_of(night)) not in done
    ]


def nothing_found(stage: str) -> dict[str, str]:
    """The entry of a stage that found no night with its input at all."""
    return {
        "stage": stage,
        "night": "-",
        "group": STAGE_INPUTS[stage][0],
        "reason": "is in no night of the store: nothing to do",
    }


def raise_for_missing(summary: dict[str, Any], *, named: bool) -> None:
    """Fail the run when a named night lacked a stage's input, or when a stage
    asked for had no night at all to work on; otherwise the summary lists them."""
    missing = summary.get("missing", [])
    if missing and (named or any(m["night"] == "-" for m in missing)):
        raise MissingInputError(missing, summary)


@task(name="check-stage-inputs")
def check_stage_inputs_task(
    store: str, stage: str, nights: list[str] | None
) -> tuple[list[str], list[dict[str, str]]]:
    """Prefect task: :func:`check_stage_inputs`."""
    return check_stage_inputs(store, stage, nights)
