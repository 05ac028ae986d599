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
from tasks.masters import (
    MastersConfig,
    begin_master_task,
    build_bias_task,
    build_flat_task,
    commit_bias_task,
    commit_flat_task,
    flat_levels_task,
    plan_masters_task,
    quadrant_chunks,
    reference_period,
)

STAGES = ("index", "masters")
"""Stages in execution order (later issues add masters, reduce, photometry, ...)."""


@flow(name="photocal-run", log_prints=True)
def photocal_run(
    store: str,
    raw: str | None = None,
    nights: list[str] | None = None,
    stages: list[str] | None = None,
    index: IndexConfig | None = None,
    masters: MastersConfig | None = None,
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
    masters = masters or MastersConfig()
    summary: dict[str, Any] = {"store": store, "nights": {}, "rejected": [], "masters": {}}
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
    if "masters" in stages:
        summary["masters"] = _masters_stage(store, nights, masters)
    return summary


def _masters_stage(store: str, nights: list[str] | None, config: MastersConfig) -> dict[str, Any]:
    """Master bias, then master flats (which use it), period by period."""
    out: dict[str, Any] = {}
    plans = plan_masters_task(store, nights, config)
    reference = reference_period(store, plans, config)
    for plan in plans:
        chunks = quadrant_chunks(plan, config)
        group = f"masters/bias/{plan.period}"
        ref = None if reference == plan.period else reference
        staging = begin_master_task(store, group, plan, None)
        stats = build_bias_task.map(
            unmapped(store),
            unmapped(plan),
            chunks,
            unmapped(staging),
            unmapped(ref),
            unmapped(config),
        )
        out[group] = commit_bias_task(store, plan, staging, stats, ref, config)
        for band in plan.flats:
            group = f"masters/flat/{band}/{plan.period}"
            levels = flat_levels_task.map(
                unmapped(store), unmapped(plan), unmapped(band), chunks, unmapped(config)
            )
            staging = begin_master_task(store, group, plan, band)
            sums = build_flat_task.map(
                unmapped(store),
                unmapped(plan),
                unmapped(band),
                chunks,
                unmapped(staging),
                unmapped(levels),
                unmapped(config),
            )
            out[group] = commit_flat_task(store, plan, band, staging, sums, config)
    return out
