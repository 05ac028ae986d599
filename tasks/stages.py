"""The wiring of the per-night stages, written once: which task runs after which,
over which chunks. The flow (:mod:`flows.pipeline`) runs it with Prefect on Dask
(:class:`PrefectRun`); benchmarks, tests and debugging run the same wiring in this
process with the task bodies (:class:`SequentialRun`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from prefect import unmapped
from prefect.exceptions import UpstreamTaskError

from tasks.index import indexed_nights_task
from tasks.io import groups
from tasks.masters import (
    MastersConfig,
    begin_master_task,
    build_bias_task,
    build_flat_task,
    commit_bias_task,
    commit_flat_task,
    flat_levels_task,
    has_master,
    plan_masters_task,
    quadrant_chunks,
    reference_period,
)
from tasks.progress import emit, track
from tasks.reduce import (
    PhotometryConfig,
    ReduceConfig,
    photometer_chunk_task,
    plan_reduce_task,
    write_night_task,
)

__all__ = ["PrefectRun", "Run", "SequentialRun", "masters_stage", "photometry_stage"]


class Run(Protocol):
    """How a stage's tasks are run: one call, or one call per element of the
    mapped arguments (``prefect.unmapped`` marks the shared ones)."""

    def one(self, task: Any, *args: Any) -> Any: ...

    def map(self, task: Any, *args: Any) -> Any: ...

    def wait(self, results: Any, stage: str, label: str, unit: str) -> None:
        """Wait for what ``map`` returned, reporting progress (tasks/progress.py)."""


class PrefectRun:
    """Inside a flow: tasks are Prefect task runs on the flow's task runner."""

    def one(self, task: Any, *args: Any) -> Any:
        """The task's result. A task whose upstream futures did not complete (a
        mapped chunk that failed, its worker killed past its retries) ends in
        Prefect's NotReady state, and a direct call then returns None: the night
        went unwritten and the flow said Completed (seen on the 64-quadrant
        night, docs/nightly.md). That raises here, naming the task."""
        state = task(*args, return_state=True)
        if state.is_completed() or state.is_failed() or state.is_crashed():
            return state.result()  # the value, or the task's own exception raised
        raise UpstreamTaskError(f"{task.name}: {state.name}: {state.message}")

    def map(self, task: Any, *args: Any) -> Any:
        return task.map(*args)

    def wait(self, results: Any, stage: str, label: str, unit: str) -> None:
        track(results, stage, label, unit)


class SequentialRun:
    """In this process, one task body after the other (no Prefect, no Dask)."""

    def one(self, task: Any, *args: Any) -> Any:
        return task.fn(*args)

    def map(self, task: Any, *args: Any) -> list[Any]:
        mapped = [list(a) for a in args if not isinstance(a, unmapped)]
        n = len(mapped[0]) if mapped else 0
        calls: list[list[Any]] = [[] for _ in range(n)]
        for a in args:
            values: Iterable[Any] = [a.value] * n if isinstance(a, unmapped) else a
            for call, value in zip(calls, values, strict=True):
                call.append(value)
        return [task.fn(*call) for call in calls]

    def wait(self, results: Any, stage: str, label: str, unit: str) -> None:
        emit(stage, label, len(results), len(results), unit)  # already done


def masters_stage(
    run: Run,
    store: str,
    nights: list[str] | None,
    config: MastersConfig,
    *,
    overwrite: bool = True,
    skipped: list[str] | None = None,
) -> dict[str, Any]:
    """Master bias, then master flats (which use it), period by period, one task
    per quadrant chunk; complete groups are kept unless ``overwrite`` (their
    names appended to ``skipped``). Returns the summaries by group."""
    skipped = skipped if skipped is not None else []
    out: dict[str, Any] = {}
    plans = run.one(plan_masters_task, store, nights, config)
    reference = reference_period(store, plans, config)
    for plan in plans:
        chunks = quadrant_chunks(plan, config)
        group = groups.bias(plan.period)
        ref = None if reference == plan.period else reference
        if overwrite or not has_master(store, group):
            staging = run.one(begin_master_task, store, group, plan, None)
            stats = run.map(
                build_bias_task, unmapped(store), unmapped(plan), chunks, unmapped(staging),
                unmapped(ref), unmapped(config),
            )  # fmt: skip
            run.wait(stats, "masters", group, "quadrant chunks")
            out[group] = run.one(commit_bias_task, store, plan, staging, stats, ref, config)
        else:
            skipped.append(group)
        for band in plan.flats:
            group = groups.flat(band, plan.period)
            if not overwrite and has_master(store, group):
                skipped.append(group)
                continue
            levels = run.map(
                flat_levels_task, unmapped(store), unmapped(plan), unmapped(band), chunks,
                unmapped(config),
            )  # fmt: skip
            staging = run.one(begin_master_task, store, group, plan, band)
            sums = run.map(
                build_flat_task, unmapped(store), unmapped(plan), unmapped(band), chunks,
                unmapped(staging), unmapped(levels), unmapped(config),
            )  # fmt: skip
            run.wait(sums, "masters", group, "quadrant chunks")
            out[group] = run.one(commit_flat_task, store, plan, band, staging, sums, config)
    return out


def photometry_stage(
    run: Run,
    store: str,
    nights: list[str] | None,
    refcat: str,
    reduce: ReduceConfig,
    photometry: PhotometryConfig,
    *,
    overwrite: bool = True,
    skipped: list[str] | None = None,
    raw_root: str | None = None,
) -> dict[str, Any]:
    """Reduce and photometer each night's science exposures, one task per chunk of
    ``reduce.exposures_per_task`` exposures, then one task per night writes its
    groups; ``raw_root`` overrides the indexed one. Returns the counts by night."""
    skipped = skipped if skipped is not None else []
    out: dict[str, Any] = {}
    for night in run.one(indexed_nights_task, store, nights):
        group = groups.catalog(night)
        if not overwrite and has_master(store, group):
            skipped.append(group)
            continue
        indexed_root, chunks = run.one(plan_reduce_task, store, night, reduce)
        if not chunks:
            continue
        parts = run.map(
            photometer_chunk_task, unmapped(store), unmapped(raw_root or indexed_root), chunks,
            unmapped(refcat), unmapped(night), unmapped(reduce), unmapped(photometry),
        )  # fmt: skip
        run.wait(parts, "photometry", night, "exposure chunks")
        out[night] = run.one(write_night_task, store, night, parts, refcat, reduce, photometry)
    return out
