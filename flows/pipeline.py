"""The photocal flow: stages wired as Prefect tasks on Dask. Flows only wire."""

from __future__ import annotations

from typing import Any

from prefect import flow, unmapped

from tasks.index import (
    IndexConfig,
    find_raw_files_task,
    group_by_night_task,
    validate_files_task,
    write_index_task,
)

STAGES = ("index",)
"""Stages in execution order (later issues add masters, reduce, photometry, ...)."""


@flow(name="photocal-run", log_prints=True)
def photocal_run(
    store: str,
    raw: str | None = None,
    nights: list[str] | None = None,
    stages: list[str] | None = None,
    index: IndexConfig | None = None,
) -> dict[str, Any]:
    """Run the requested stages over the raw tree and write the Zarr store.

    Returns a small summary: per night the counts by status, and the rejected
    files with their reasons.
    """
    stages = list(STAGES) if stages is None else stages
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known stages: {list(STAGES)}")
    index = index or IndexConfig()
    summary: dict[str, Any] = {"store": store, "nights": {}, "rejected": []}
    if "index" in stages:
        if raw is None:
            raise ValueError("the index stage needs the raw root (--raw)")
        files = find_raw_files_task(raw)
        chunks = [
            files[i : i + index.files_per_task] for i in range(0, len(files), index.files_per_task)
        ]
        validated = validate_files_task.map(unmapped(raw), chunks, unmapped(index))
        by_night = group_by_night_task(validated, nights)
        written = write_index_task.map(
            unmapped(store), list(by_night), unmapped(raw), list(by_night.values()), unmapped(index)
        )
        for night, counts in zip(by_night, written.result(), strict=True):
            summary["nights"][night] = counts
        summary["rejected"] = [
            (r["path"], r["reason"])
            for rows in by_night.values()
            for r in rows
            if r["status"] == "rejected"
        ]
    return summary
