"""Flows behind the deployments in infra/prefect.yaml: what the nightly schedule
and operators in the Prefect UI start. Data locations and the cluster come from
the environment (flows/settings.py); parameters are what an operator chooses.

Every parameter is a pydantic ``Field`` with a description and a default the
form shows (constraints go in ``Annotated``: of a ``Field`` default Prefect keeps
only the description and the default); dates are evening dates with a calendar
pattern, ranges carry the "end not before start" rule in their JSON schema
(flows/forms.py), so the server refuses a bad request when it is submitted.
Nightly and backfill runs publish their nights' reports (artifacts, the HTML
report) on their own run.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from flows.backfill_progress import BackfillProgress, progress_key
from flows.forms import EVENING, NightRange, date_field
from flows.pipeline import NIGHTLY_STAGES, STAGES, photocal_run
from flows.reporting import publish_reports, touched_nights
from flows.runners import make_task_runner
from flows.settings import PhotocalSettings
from tasks.config import load_config
from tasks.devices import gpu_workers_task, on_gpu_if_any, probe_device_task
from tasks.io import groups
from tasks.masters import period_label
from tasks.progress import listening
from tasks.report.data import report_nights
from tasks.reports import default_report_dir

PER_PERIOD_STAGES = ("masters", "reduce", "photometry")
"""Backfill stages run one calibration period at a time (after one index of
the whole range); the others run once over the whole range."""

ConfigParameter = str | dict[str, Any] | None
"""A deployment's ``config``: a TOML path on the worker, or the tables inline
(``{"ubercal": {"options": {"cells": [4, 4]}}}``); None: PHOTOCAL_CONFIG or the
defaults (tasks/config.py)."""
CONFIG_HELP = (
    "Settings of the stages: a TOML path on the worker, or the tables inline, e.g. "
    '{"ubercal": {"options": {"cells": [4, 4]}}} (tasks/config.py; `photocal config '
    "template` writes a commented file). Empty: PHOTOCAL_CONFIG, else the defaults."
)

BackfillStage = Literal[
    "index", "masters", "reduce", "photometry", "ubercal", "train", "score", "transients"
]  # fmt: skip
"""What a backfill runs: every stage but ``lightcurves``, which needs a targets table
(its own deployment, where the table is a required field: a backfill form could not
refuse "lightcurves without targets" at submission, a rule between two parameters)."""

STAGES_HELP = (
    "Stages to run; they always run in pipeline order (index, masters, reduce, photometry, "
    "ubercal, train, score, transients). index validates the raw tree once for the whole "
    "range; masters, reduce and photometry go one calibration period at a time; ubercal, "
    "train, score and transients run once over the range. Light curves: the lightcurves "
    "deployment."
)


def _config(settings: PhotocalSettings, config: ConfigParameter) -> dict[str, Any]:
    """The run's configuration: ``config`` (or PHOTOCAL_CONFIG) over the worker's
    site longitude; validated here, so a bad one fails the run before any work."""
    site = {"index": {"site_longitude_deg": settings.site_longitude_deg}}
    return load_config(config or settings.config, defaults=site).as_dict()


def _run(settings: PhotocalSettings, config: ConfigParameter = None, **kwargs: Any) -> dict:
    """The pipeline as a child run; reports are published by the caller's run."""
    runner = make_task_runner(
        dask_address=settings.dask_address, workers=settings.workers, cluster=settings.cluster
    )
    return photocal_run.with_options(task_runner=runner)(
        store=settings.store,
        raw=settings.raw,
        refcat=settings.refcat,
        config=_config(settings, config),
        publish=False,
        **kwargs,
    )


def _publish(settings: PhotocalSettings, nights: list[str], summary: dict[str, Any]) -> None:
    """Artifacts of ``nights`` (those the store has) on this run, and their HTML pages."""
    have = set(report_nights(settings.store))
    wanted = [n for n in nights if n in have]
    report_dir = settings.report_dir or default_report_dir(settings.store)
    publish_reports(
        settings.store, wanted, summary, report_dir=report_dir, base_url=settings.report_url
    )
    logger = get_run_logger()
    if summary.get("skipped"):
        logger.info("kept, already complete: %s", ", ".join(summary["skipped"]))
    missing = sorted(set(nights) - have - {groups.UNKNOWN_NIGHT})
    if missing:
        logger.warning(
            "no raw files or groups for %d night(s): %s", len(missing), ", ".join(missing)
        )


def _merge(total: dict[str, Any], part: dict[str, Any]) -> None:
    """Add one pipeline run's summary to a backfill's."""
    for key, value in part.items():
        if isinstance(value, dict):
            total.setdefault(key, {}).update(value)
        elif isinstance(value, list):
            total.setdefault(key, []).extend(value)
        else:
            total.setdefault(key, value)


def last_night(now: dt.datetime, longitude_deg: float) -> str:
    """The night that ended most recently: the evening date before the local date
    (the nightly schedule runs in the morning, local time)."""
    local = now.astimezone(dt.UTC) + dt.timedelta(hours=longitude_deg / 15.0)
    return (local.date() - dt.timedelta(days=1)).isoformat()


def _night_or_last(night: dt.date | None, settings: PhotocalSettings) -> str:
    if night is not None:
        return night.isoformat()
    return last_night(dt.datetime.now(dt.UTC), settings.site_longitude_deg)


@flow(name="nightly", log_prints=True, persist_result=True)
def nightly(
    night: dt.date | None = date_field(
        None,
        f"Night to calibrate: {EVENING}. Empty: the night that just ended at the site "
        "(the schedule's case).",
    ),
    overwrite: bool = Field(
        True,
        description="Recompute what is already in the store: the night's index and catalog, "
        "and the masters of its calibration period, rebuilt from every night of the period "
        "indexed so far (a night's flats and biases change its period's masters). Off: keep "
        "complete groups, only fill in what is missing.",
    ),
    config: ConfigParameter = Field(None, description=CONFIG_HELP),
) -> dict[str, Any]:
    """Calibrate one night (default: the night that just ended at the site)."""
    settings = PhotocalSettings()
    label = _night_or_last(night, settings)
    get_run_logger().info("nightly: night %s, store %s", label, settings.store)
    summary = _run(settings, config, nights=[label], overwrite=overwrite)
    _publish(settings, sorted({label, *touched_nights(summary)}), summary)
    return summary


@flow(name="backfill", log_prints=True, persist_result=True)
def backfill(
    nights: NightRange = Field(
        description="Nights to re-process, first and last included, by their evening dates "
        "(end not before start; at most 3660 nights)."
    ),
    stages: Annotated[list[BackfillStage], Field(min_length=1)] = Field(
        list(NIGHTLY_STAGES), description=STAGES_HELP
    ),
    overwrite: bool = Field(
        False,
        description="Recompute groups that are already complete. Off (the default): complete "
        "groups are kept and their work skipped, so a stopped backfill resumes where it was.",
    ),
    config: ConfigParameter = Field(None, description=CONFIG_HELP),
) -> dict[str, Any]:
    """Re-process a range of nights: the raw tree indexed once, then masters and
    photometry period by period, then the stages over the whole range; complete
    groups are kept unless ``overwrite``. Progress: the artifact
    ``backfill-progress-<this run's id>``."""
    settings = PhotocalSettings()
    resolved = _config(settings, config)
    masters_config = load_config(resolved)["masters"]
    dates = nights.nights()
    wanted = [s for s in STAGES if s in stages]
    by_period: dict[str, list[str]] = {}
    for night in dates:
        by_period.setdefault(period_label(night, masters_config), []).append(night)

    # A range has nights without data: they are listed as missing, not failed.
    def run(nights_: list[str], stages_: list[str]) -> dict[str, Any]:
        return _run(
            settings,
            resolved,
            nights=nights_,
            stages=stages_,
            overwrite=overwrite,
            strict_nights=False,
        )

    tracker = BackfillProgress(
        progress_key(flow_run.id or "local"),
        dates,
        title=f"backfill {nights.start} .. {nights.end}",
    )
    summary: dict[str, Any] = {"nights": {}, "skipped": [], "masters": {}, "missing": []}
    per_period = [s for s in wanted if s in PER_PERIOD_STAGES]
    # With one period the index goes with it: one child run, one Dask cluster.
    first = ["index"] if "index" in wanted and len(by_period) == 1 else []
    with listening(tracker):
        if "index" in wanted and not first:
            tracker.phase(f"index: validating the raw tree once for {len(dates)} nights")
            _merge(summary, run(dates, ["index"]))
        tracker.start_nights()
        for period, period_nights in by_period.items():
            if first or per_period:
                tracker.phase(f"{', '.join(first + per_period)} of period {period}")
                _merge(summary, run(period_nights, first + per_period))
            tracker.nights_done(period_nights)
        rest = [s for s in wanted if s not in ("index", *PER_PERIOD_STAGES)]
        if rest:
            tracker.phase(f"{', '.join(rest)} over the whole range")
            _merge(summary, run(dates, rest))
        tracker.phase("reports")
        _publish(settings, sorted(set(dates) | set(touched_nights(summary))), summary)
        tracker.finish(f"done ({', '.join(wanted)})")
    return summary


@flow(name="ubercal", log_prints=True, persist_result=True)
def ubercal(
    band: Literal["g", "r", "i"] = Field(description="Band to calibrate (no default)."),
    nights: NightRange = Field(
        description="Nights of the fit, first and last included, by their evening dates."
    ),
    config: ConfigParameter = Field(None, description=CONFIG_HELP),
) -> dict[str, Any]:
    """The global ubercal + starflat fit of one band over a range of nights (its
    settings: the [ubercal] table of ``config``)."""
    return _run(
        PhotocalSettings(),
        config,
        nights=nights.nights(),
        stages=["ubercal"],
        ubercal_bands=[band],
        strict_nights=False,
    )


@flow(name="masters", log_prints=True, persist_result=True)
def masters(
    period: dt.date = date_field(
        ...,
        "Any night of the calibration period to rebuild (evening date, YYYY-MM-DD); "
        "periods are fixed blocks of nights from the masters' epoch.",
    ),
    overwrite: bool = Field(
        True, description="Rebuild the period's masters even if complete. Off: fill in only."
    ),
    config: ConfigParameter = Field(None, description=CONFIG_HELP),
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


@flow(name="lightcurves", log_prints=True, persist_result=True)
def lightcurves(
    targets: Annotated[str, Field(min_length=1)] = Field(
        description="Targets table, a path on the worker (ECSV, CSV or FITS: name, ra, dec "
        "[deg], optional no_flux_before / no_flux_after [MJD]): one light curve per row, "
        "written to lightcurves/<name> (and lightcurves_forced/<name>)."
    ),
    nights: NightRange | None = Field(
        None,
        description="Nights whose exposures are the epochs, first and last included, by "
        "their evening dates. Empty: every night with kept reduced images (photometry with "
        "[reduce] keep_reduced = true).",
    ),
    config: ConfigParameter = Field(None, description=CONFIG_HELP),
) -> dict[str, Any]:
    """Scene-modelling light curves of the targets on the ubercal system, beside
    forced photometry on difference images (docs/lightcurves.md); the run carries
    their report (the ``lightcurves`` artifact) and the HTML index lists them."""
    settings = PhotocalSettings()
    summary = _run(
        settings,
        config,
        nights=None if nights is None else nights.nights(),
        stages=["lightcurves"],
        targets=targets,
        strict_nights=False,
    )
    _publish(settings, [], summary)
    return summary["lightcurves"]


CHECKPOINT_HELP = (
    "Checkpoint directory of the zero-point network. Empty: models/azprc beside the store."
)


@flow(name="train-zp", log_prints=True, persist_result=True)
def train_zp(
    nights: NightRange = Field(
        description="Nights whose ubercal zero points are the training targets "
        "(evening dates, first and last included)."
    ),
    checkpoint: str | None = Field(None, description=CHECKPOINT_HELP),
    config: ConfigParameter = Field(None, description=CONFIG_HELP),
) -> dict[str, Any]:
    """Train the zero-point network on the nights (their ubercal zero points are
    the targets) plus simulated nights, on a GPU worker when the cluster has
    one; writes the checkpoint (default: models/azprc beside the store)."""
    return _run(
        PhotocalSettings(),
        config,
        nights=nights.nights(),
        stages=["train"],
        checkpoint=checkpoint,
        strict_nights=False,
    )["zp"]


@flow(name="score-zp", log_prints=True, persist_result=True)
def score_zp(
    night: dt.date | None = date_field(
        None, f"Night to score: {EVENING}. Empty: the night that just ended at the site."
    ),
    checkpoint: str | None = Field(None, description=CHECKPOINT_HELP),
    config: ConfigParameter = Field(None, description=CONFIG_HELP),
) -> dict[str, Any]:
    """Predict every exposure's zero point of a night (default: the night that
    just ended) with the trained network; writes ml/scores/<night>."""
    settings = PhotocalSettings()
    label = _night_or_last(night, settings)
    return _run(settings, config, nights=[label], stages=["score"], checkpoint=checkpoint)["zp"]


@flow(name="device-check", log_prints=True)
def device_check(
    n_gpu_tasks: Annotated[int, Field(ge=0)] = Field(
        4, description="Probes submitted for a GPU worker."
    ),
    n_cpu_tasks: Annotated[int, Field(ge=0)] = Field(
        4, description="Probes submitted without a resource."
    ),
) -> list[dict[str, Any]]:
    """Run probes marked for GPU and unmarked ones; report where each ran and the
    torch device it saw (how cluster operators check their GPU workers)."""
    gpus = gpu_workers_task.submit().result()  # asks the scheduler, from a worker
    with on_gpu_if_any(gpus):
        marked = [probe_device_task.submit(f"gpu-{i}") for i in range(n_gpu_tasks)]
    plain = [probe_device_task.submit(f"cpu-{i}") for i in range(n_cpu_tasks)]
    results = [f.result() for f in marked + plain]
    get_run_logger().info("GPU workers: %s; probes: %s", gpus, results)
    return results
