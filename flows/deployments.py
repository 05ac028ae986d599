"""Flows behind the deployments in infra/prefect.yaml: what the nightly schedule
and operators in the Prefect UI start. Data locations and the cluster come from
the environment (flows/settings.py); parameters are what an operator chooses."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from pydantic import BaseModel, Field, model_validator

from flows.pipeline import NIGHTLY_STAGES, StageName, photocal_run
from flows.runners import make_task_runner
from flows.settings import PhotocalSettings
from tasks.config import load_config
from tasks.devices import gpu_workers_task, on_gpu_if_any, probe_device_task
from tasks.masters import period_label

MAX_BACKFILL_NIGHTS = 3660
ConfigParameter = str | dict[str, Any] | None
"""A deployment's ``config``: a TOML path on the worker, or the tables inline
(``{"ubercal": {"options": {"cells": [4, 4]}}}``); None: PHOTOCAL_CONFIG or the
defaults (tasks/config.py)."""


class BackfillParameters(BaseModel):
    """A backfill request, as the UI form sends it."""

    start: dt.date = Field(description="First night (YYYY-MM-DD, evening date).")
    end: dt.date = Field(description="Last night, inclusive.")
    stages: list[StageName] = Field(
        default_factory=lambda: list(NIGHTLY_STAGES),
        min_length=1,
        description="Stages to run, in pipeline order.",
    )
    overwrite: bool = Field(False, description="Recompute groups that are already complete.")

    @model_validator(mode="after")
    def _check_range(self) -> BackfillParameters:
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) is before start ({self.start})")
        n = (self.end - self.start).days + 1
        if n > MAX_BACKFILL_NIGHTS:
            raise ValueError(
                f"{n} nights requested; split backfills into at most {MAX_BACKFILL_NIGHTS}"
            )
        return self

    def nights(self) -> list[str]:
        n = (self.end - self.start).days + 1
        return [(self.start + dt.timedelta(days=i)).isoformat() for i in range(n)]


def _config(settings: PhotocalSettings, config: ConfigParameter) -> dict[str, Any]:
    """The run's configuration: ``config`` (or PHOTOCAL_CONFIG) over the worker's
    site longitude; validated here, so a bad one fails the run before any work."""
    site = {"index": {"site_longitude_deg": settings.site_longitude_deg}}
    return load_config(config or settings.config, defaults=site).as_dict()


def _run(settings: PhotocalSettings, config: ConfigParameter = None, **kwargs: Any) -> dict:
    runner = make_task_runner(
        dask_address=settings.dask_address, workers=settings.workers, cluster=settings.cluster
    )
    return photocal_run.with_options(task_runner=runner)(
        store=settings.store,
        raw=settings.raw,
        refcat=settings.refcat,
        config=_config(settings, config),
        **kwargs,
    )


def last_night(now: dt.datetime, longitude_deg: float) -> str:
    """The night that ended most recently: the evening date before the local date
    (the nightly schedule runs in the morning, local time)."""
    local = now.astimezone(dt.UTC) + dt.timedelta(hours=longitude_deg / 15.0)
    return (local.date() - dt.timedelta(days=1)).isoformat()


@flow(name="nightly", log_prints=True, persist_result=True)
def nightly(
    night: dt.date | None = None, overwrite: bool = True, config: ConfigParameter = None
) -> dict[str, Any]:
    """Calibrate one night (default: the night that just ended at the site)."""
    settings = PhotocalSettings()
    label = (
        night.isoformat()
        if night
        else last_night(dt.datetime.now(dt.UTC), settings.site_longitude_deg)
    )
    get_run_logger().info("nightly: night %s, store %s", label, settings.store)
    return _run(settings, config, nights=[label], overwrite=overwrite)


@flow(name="backfill", log_prints=True, persist_result=True)
def backfill(
    start: dt.date,
    end: dt.date,
    stages: list[StageName] | None = None,
    overwrite: bool = False,
    config: ConfigParameter = None,
) -> dict[str, Any]:
    """Re-process a range of nights, one calibration period at a time; complete
    groups are skipped unless ``overwrite``, so a stopped backfill resumes."""
    params = BackfillParameters(
        start=start,
        end=end,
        stages=list(NIGHTLY_STAGES) if stages is None else stages,
        overwrite=overwrite,
    )
    settings = PhotocalSettings()
    resolved = _config(settings, config)
    per_night = [st for st in params.stages if st != "ubercal"]
    by_period: dict[str, list[str]] = {}
    masters_config = load_config(resolved)["masters"]
    for night in params.nights():
        by_period.setdefault(period_label(night, masters_config), []).append(night)
    steps = len(by_period) + ("ubercal" in params.stages)
    progress = create_progress_artifact(
        progress=0.0,
        key="backfill-progress",
        description=f"backfill {params.start} .. {params.end}",
    )
    done: dict[str, Any] = {"periods": {}, "skipped": [], "missing": [], "ubercal": {}}
    for k, (period, nights) in enumerate(by_period.items(), start=1):
        if per_night:
            result = _run(
                settings,
                resolved,
                nights=nights,
                stages=per_night,
                overwrite=params.overwrite,
                strict_nights=False,
            )
            done["periods"][period] = {
                "nights": result["nights"],
                "masters": list(result["masters"]),
            }
            done["skipped"] += result["skipped"]
            done["missing"] += result["missing"]
        update_progress_artifact(artifact_id=progress, progress=100.0 * k / steps)
    if "ubercal" in params.stages:
        # One global fit over the whole range, not one per period.
        result = _run(
            settings, resolved, nights=params.nights(), stages=["ubercal"], strict_nights=False
        )
        done["ubercal"] = result["ubercal"]
        done["missing"] += result["missing"]
        update_progress_artifact(artifact_id=progress, progress=100.0)
    return done


@flow(name="ubercal", log_prints=True, persist_result=True)
def ubercal(
    band: Literal["g", "r", "i"], start: dt.date, end: dt.date, config: ConfigParameter = None
) -> dict[str, Any]:
    """The global ubercal + starflat fit of one band over a range of nights (its
    settings: the [ubercal] table of ``config``)."""
    params = BackfillParameters(start=start, end=end, stages=["ubercal"])
    return _run(
        PhotocalSettings(),
        config,
        nights=params.nights(),
        stages=["ubercal"],
        ubercal_bands=[band],
        strict_nights=False,
    )


@flow(name="masters", log_prints=True, persist_result=True)
def masters(
    period: dt.date, overwrite: bool = True, config: ConfigParameter = None
) -> dict[str, Any]:
    """Rebuild the master bias and flats of the period containing ``period``."""
    settings = PhotocalSettings()
    resolved = _config(settings, config)
    masters_config = load_config(resolved)["masters"]
    label = period_label(period.isoformat(), masters_config)
    start = dt.date.fromisoformat(label)
    days = masters_config.period_days
    nights = [(start + dt.timedelta(days=i)).isoformat() for i in range(days)]
    return _run(
        settings,
        resolved,
        nights=nights,
        stages=["masters"],
        overwrite=overwrite,
        strict_nights=False,
    )


@flow(name="train-zp", log_prints=True, persist_result=True)
def train_zp(
    start: dt.date,
    end: dt.date,
    checkpoint: str | None = None,
    config: ConfigParameter = None,
) -> dict[str, Any]:
    """Train the zero-point network on the nights ``start``..``end`` (their
    ubercal zero points are the targets) plus simulated nights, on a GPU worker
    when the cluster has one; writes the checkpoint (default: models/azprc
    beside the store)."""
    params = BackfillParameters(start=start, end=end, stages=["train"])
    return _run(
        PhotocalSettings(),
        config,
        nights=params.nights(),
        stages=["train"],
        checkpoint=checkpoint,
        strict_nights=False,
    )["zp"]


@flow(name="score-zp", log_prints=True, persist_result=True)
def score_zp(
    night: dt.date | None = None, checkpoint: str | None = None, config: ConfigParameter = None
) -> dict[str, Any]:
    """Predict every exposure's zero point of a night (default: the night that
    just ended) with the trained network; writes ml/scores/<night>."""
    settings = PhotocalSettings()
    label = (
        night.isoformat()
        if night
        else last_night(dt.datetime.now(dt.UTC), settings.site_longitude_deg)
    )
    return _run(settings, config, nights=[label], stages=["score"], checkpoint=checkpoint)["zp"]


@flow(name="device-check", log_prints=True)
def device_check(n_gpu_tasks: int = 4, n_cpu_tasks: int = 4) -> list[dict[str, Any]]:
    """Run probes marked for GPU and unmarked ones; report where each ran and the
    torch device it saw (how cluster operators check their GPU workers)."""
    gpus = gpu_workers_task.submit().result()  # asks the scheduler, from a worker
    with on_gpu_if_any(gpus):
        marked = [probe_device_task.submit(f"gpu-{i}") for i in range(n_gpu_tasks)]
    plain = [probe_device_task.submit(f"cpu-{i}") for i in range(n_cpu_tasks)]
    results = [f.result() for f in marked + plain]
    get_run_logger().info("GPU workers: %s; probes: %s", gpus, results)
    return results
