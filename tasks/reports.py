"""Per-night reports as Prefect artifacts, on the run the operator opens, and the
static HTML report beside the store (docs/report.md).

The artifacts carry the HTML report's sections for the night (the same tables,
numbers and figures, :mod:`tasks.report.sections`), what this run kept because
it was already complete, and a link to the HTML page. Keys are per night
(``night-<night>``): the UI shows the latest report of a night and its history.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from tasks.io.store import is_local, local_path
from tasks.report import markdown
from tasks.report.data import light_curves, master_trends, night_qa
from tasks.report.html import page_name, write_report
from tasks.report.sections import Block, Table, lightcurves_section, night_sections, num


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lower-case letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def default_report_dir(store: str) -> str:
    """``<store>.report`` beside the store: a folder beside a local one, a prefix
    beside one on an object store (``s3://bucket/photocal.zarr.report``)."""
    if not is_local(store):
        return f"{store.rstrip('/')}.report"
    root = local_path(store)
    return str(root.parent / f"{root.name}.report")


def report_url(report_dir: str, night: str | None = None, base_url: str | None = None) -> str:
    """Where an operator opens the report (a night's page, or the index): under
    ``base_url`` when the directory is published by a web server, else a file
    URL, or the object's URL on an object store."""
    name = page_name(night) if night else "index.html"
    if base_url:
        return f"{base_url.rstrip('/')}/{name}"
    if not is_local(report_dir):
        return f"{report_dir.rstrip('/')}/{name}"
    return local_path(report_dir).joinpath(name).resolve().as_uri()


def run_notes(night: str, qa_groups: Sequence[str], summary: dict[str, Any]) -> list[Block]:
    """What this run did for ``night``: the groups it kept as complete (skipped
    work) and the masters it wrote, among the night's own groups and those of
    its masters."""
    mine = set(qa_groups)
    skipped = [g for g in summary.get("skipped", []) if night in g.split("/") or g in mine]
    written = {g: s for g, s in (summary.get("masters") or {}).items() if g in mine}
    notes: list[Block] = []
    if skipped:
        notes.append(
            "Kept, already complete (not recomputed by this run): "
            + ", ".join(f"`{g}`" for g in skipped)
        )
    else:
        notes.append("Nothing of this night was skipped: every stage run wrote its groups.")
    if written:
        notes.append(
            Table(
                ("master written by this run", "summary"),
                tuple((g, _describe(s)) for g, s in written.items()),
                name="masters-written",
            )
        )
    return notes


def _describe(summary: dict[str, Any]) -> str:
    """A master's summary as ``key value`` pairs, numbers rounded."""
    parts = []
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {num(v, 4)}" for k, v in value.items())
        elif isinstance(value, (int, float)):
            value = num(value, 4)
        parts.append(f"{key.replace('_', ' ')}: {value}")
    return "; ".join(parts)


def publish_night_report(
    store: str,
    night: str,
    summary: dict[str, Any],
    *,
    html_url: str | None = None,
) -> str:
    """Create the night's artifacts in the current run; returns the markdown key."""
    qa = night_qa(store, night)
    used = [m.group for m in qa.masters]
    intro: list[Block] = [f"Store: `{store}`", *run_notes(night, used, summary)]
    if html_url:
        intro.append(f"HTML report of this night: [{html_url}]({html_url})")
    key = artifact_key("night", night)
    create_markdown_artifact(
        key=key,
        markdown=markdown.render(
            f"photocal night {night}", night_sections(qa, master_trends(store)), intro=intro
        ),
        description=f"photocal QA of night {night}",
    )
    if qa.files is not None and qa.files.rejected:
        create_table_artifact(
            key=artifact_key("rejected", night),
            table=[{"file": p, "reason": r} for p, r in qa.files.rejected],
            description=f"files rejected for night {night}",
        )
    if html_url:
        create_link_artifact(
            key=artifact_key("report", night),
            link=html_url,
            link_text=f"HTML QA report, night {night}",
            description=f"static HTML report of night {night} (opens without a server)",
        )
    return key


def publish_lightcurves(store: str, names: Sequence[str]) -> str | None:
    """The ``lightcurves`` artifact of the current run: the report's light-curve
    section for the objects ``names``; its key, or None without any."""
    section = lightcurves_section(light_curves(store, names=names))
    if section is None:
        return None
    key = artifact_key("lightcurves")
    create_markdown_artifact(
        key=key,
        markdown=markdown.render("photocal light curves", [section], intro=[f"Store: `{store}`"]),
        description=f"light curves of {len(names)} object(s)",
    )
    return key


@task(name="night-report")
def night_report_task(
    store: str, night: str, summary: dict[str, Any], html_url: str | None = None
) -> str:
    """Prefect task: :func:`publish_night_report` (its artifacts go to the flow
    run that calls it)."""
    return publish_night_report(store, night, summary, html_url=html_url)


@task(name="lightcurves-report")
def lightcurves_report_task(store: str, names: list[str]) -> str | None:
    """Prefect task: :func:`publish_lightcurves` (on the flow run that calls it)."""
    return publish_lightcurves(store, names)


@task(name="html-report", retries=1, retry_delay_seconds=2)
def html_report_task(store: str, out: str, nights: list[str]) -> dict[str, str]:
    """Write the nights' HTML pages and the index under ``out``; night -> path."""
    files = write_report(store, out, nights)
    return {n: os.fspath(p) for n, p in files.pages.items()}
