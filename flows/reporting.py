"""Night reports at the end of a run, on the flow run that calls this: the
top-level ``photocal-run`` of the command line, or the ``nightly`` and
``backfill`` runs of the deployments (whose pipeline runs are their children,
where an operator does not look)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tasks.io import groups
from tasks.reports import (
    html_report_task,
    lightcurves_report_task,
    night_report_task,
    report_url,
)


def touched_nights(summary: dict[str, Any]) -> list[str]:
    """The nights a run indexed, photometered or kept as complete."""
    nights = set(summary.get("nights", {})) | set(summary.get("photometry", {}))
    for group in summary.get("skipped", []):
        for parent in (groups.INDEX, groups.NIGHTS):
            if group.startswith(parent + "/"):
                nights.add(group.split("/")[1])
    return sorted(nights)


def publish_reports(
    store: str,
    nights: Iterable[str],
    summary: dict[str, Any],
    *,
    report_dir: str | None = None,
    base_url: str | None = None,
) -> dict[str, str]:
    """Artifacts for each night and for the light curves the run measured
    (and, with ``report_dir``, the nights' HTML pages and the index, linked from
    the artifacts); night -> markdown artifact key."""
    nights = list(nights)
    if report_dir is not None:
        pages = [n for n in nights if n != groups.UNKNOWN_NIGHT]
        html_report_task(store, report_dir, pages)
    if summary.get("lightcurves"):
        lightcurves_report_task(store, list(summary["lightcurves"]))
    return {
        night: night_report_task(
            store,
            night,
            summary,
            report_url(report_dir, night, base_url)
            if report_dir is not None and night != groups.UNKNOWN_NIGHT
            else None,
        )
        for night in nights
    }
