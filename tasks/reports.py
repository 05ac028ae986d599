"""Per-night reports as Prefect artifacts: what operators read in the UI."""

from __future__ import annotations

import re
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lower-case letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def night_markdown(night: str, counts: dict[str, int], summary: dict[str, Any]) -> str:
    rejected = [(p, r) for p, r in summary.get("rejected", []) if p]
    lines = [
        f"# photocal night {night}",
        "",
        f"Store: `{summary.get('store')}`",
        "",
        "| status | files |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(counts.items())),
        "",
    ]
    if rejected:
        lines += ["## Rejected files", "", "| file | reason |", "|---|---|"]
        lines += [f"| `{p}` | {r.replace('|', '/')} |" for p, r in rejected]
        lines.append("")
    masters = summary.get("masters", {})
    if masters:
        lines += ["## Masters written in this run", "", "| group | summary |", "|---|---|"]
        for group, s in masters.items():
            lines.append(f"| `{group}` | {', '.join(f'{k}: {v}' for k, v in s.items())} |")
        lines.append("")
    if summary.get("skipped"):
        lines += ["Skipped (already complete): " + ", ".join(f"`{g}`" for g in summary["skipped"])]
    return "\n".join(lines)


@task(name="night-report")
def night_report_task(
    store: str, night: str, counts: dict[str, int], summary: dict[str, Any]
) -> str:
    """Markdown artifact for the night, and a table of its rejected files."""
    key = artifact_key("night", night)
    create_markdown_artifact(
        key=key,
        markdown=night_markdown(night, counts, summary),
        description=f"photocal summary of night {night}",
    )
    rows = [{"file": p, "reason": r} for p, r in summary.get("rejected", [])]
    if rows:
        create_table_artifact(
            key=artifact_key("rejected", night),
            table=rows,
            description=f"files rejected for night {night}",
        )
    return key
