"""The photocal flow: stages wired as Prefect tasks on Dask. Flows only wire."""

from __future__ import annotations

from typing import Any, Literal, get_args

from prefect import flow, unmapped

from flows.reporting import publish_reports, touched_nights
from tasks.config import load_config
from tasks.devices import gpu_workers_task, on_gpu_if_any
from tasks.index import (
    IndexConfig,
    find_raw_files_task,
    group_by_night_task,
    indexed_nights_task,
    validate_files_task,
    write_index_task,
)
from tasks.inputs import (
    check_stage_inputs_task,
    missing_raw_nights,
    nothing_found,
    raise_for_missing,
    unbuilt_masters,
)
from tasks.io import groups
from tasks.lightcurves import LightcurveConfig, lightcurve_task, plan_lightcurves_task
from tasks.masters import MastersConfig, has_master, period_label
from tasks.progress import forward_from_workers, track
from tasks.reduce import PhotometryConfig, ReduceConfig, check_refcat_task
from tasks.resume import forget_results_task
from tasks.stages import PrefectRun, masters_stage, photometry_stage
from tasks.transients import (
    TransientsConfig,
    score_pair_task,
    train_transients_task,
    write_transients_task,
)
from tasks.ubercal import bands_observed_task, ubercal_task
from tasks.zp import (
    ZPNetworkConfig,
    default_checkpoint,
    night_features_task,
    photometered_nights_task,
    score_zp_task,
    train_zp_task,
)

StageName = Literal[
    "index",
    "masters",
    "reduce",
    "photometry",
    "ubercal",
    "lightcurves",
    "train",
    "score",
    "transients",
]
STAGES: tuple[str, ...] = get_args(StageName)
"""Stages in execution order. ``reduce`` and ``photometry`` run as one step per
exposure chunk: reduced images are not kept (unless ``keep_reduced``)."""
NIGHTLY_STAGES: tuple[str, ...] = ("index", "masters", "reduce", "photometry")
"""What a run does by default: per-night work. ``ubercal`` fits many nights at
once and runs when asked (its own deployment), as do ``train`` and ``score`` (the
zero-point network: ``train`` needs ubercal's targets). ``transients`` (localisation on
simulated reference/new pairs, docs/transients.md) also runs when asked."""


@flow(name="photocal-run", log_prints=True)
def photocal_run(
    store: str,
    raw: str | None = None,
    nights: list[str] | None = None,
    stages: list[str] | None = None,
    index: IndexConfig | None = None,
    masters: MastersConfig | None = None,
    reduce: ReduceConfig | None = None,
    photometry: PhotometryConfig | None = None,
    refcat: str | None = None,
    ubercal_bands: list[str] | None = None,
    transients: TransientsConfig | None = None,
    zp: ZPNetworkConfig | None = None,
    checkpoint: str | None = None,
    overwrite: bool = True,
    config: str | dict[str, Any] | None = None,
    strict_nights: bool = True,
    targets: str | None = None,
    lightcurves: LightcurveConfig | None = None,
    publish: bool = True,
) -> dict[str, Any]:
    """Run the requested stages over the raw tree and write the Zarr store.

    ``config`` is the configuration (a TOML path or a mapping, one table per
    stage: tasks/config.py); a stage's own argument (``index``, ``masters``, ...)
    wins over its table. With ``overwrite=False`` groups that are already
    complete are kept and their work skipped (how an interrupted backfill
    resumes). A night named in ``nights`` that lacks a stage's input fails the
    run once the others are done, unless ``strict_nights`` is False (a range:
    then it is only listed). Returns a small summary: per night the counts by
    status, the rejected files with their reasons, the masters written, the
    groups kept and the stage-nights skipped for a missing input (``missing``).
    With ``publish`` every night the run touched gets its report artifacts on
    this run (deployments publish on their own run instead).
    """
    stages = list(NIGHTLY_STAGES) if stages is None else stages
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known stages: {list(STAGES)}")
    cfg = load_config(config)
    index = index or cfg["index"]
    masters = masters or cfg["masters"]
    if refcat is not None and {"reduce", "photometry", "ubercal"} & set(stages):
        check_refcat_task(refcat)
    summary: dict[str, Any] = {
        "store": store,
        "nights": {},
        "rejected": [],
        "masters": {},
        "photometry": {},
        "ubercal": {},
        "transients": {},
        "skipped": [],
        "missing": [],
        "config_source": cfg.source,
    }
    if "index" in stages:
        if raw is None:
            raise ValueError("the index stage needs the raw root (--raw)")
        files = find_raw_files_task(raw)
        chunks = [
            files[i : i + index.files_per_task] for i in range(0, len(files), index.files_per_task)
        ]
        validated = validate_files_task.map(unmapped(raw), chunks, unmapped(index))
        track(validated, "index", f"{len(files)} raw files", "chunks")
        by_night = group_by_night_task(validated, nights)
        summary["missing"] += missing_raw_nights(nights, by_night, raw)
        if not overwrite:
            done = [n for n in by_night if has_master(store, groups.index(n))]
            summary["skipped"] += [groups.index(n) for n in done]
            by_night = {n: rows for n, rows in by_night.items() if n not in done}
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
        usable = _usable_nights(store, "masters", nights, summary)
        if usable:
            summary["masters"] = masters_stage(
                PrefectRun(),
                store,
                usable,
                masters,
                overwrite=overwrite,
                skipped=summary["skipped"],
            )
            built = [*summary["masters"], *summary["skipped"]]
            summary["missing"] += unbuilt_masters(usable, lambda n: period_label(n, masters), built)
    if "reduce" in stages or "photometry" in stages:
        if refcat is None:
            raise ValueError("the photometry stage needs the reference catalog (--refcat)")
        summary["photometry"] = photometry_stage(
            PrefectRun(),
            store,
            _usable_nights(store, "photometry", nights, summary),
            refcat,
            reduce or cfg["reduce"],
            photometry or cfg["photometry"],
            overwrite=overwrite,
            skipped=summary["skipped"],
        )
    if "ubercal" in stages:
        if refcat is None:
            raise ValueError("the ubercal stage needs the reference catalog (--refcat)")
        usable = _usable_nights(store, "ubercal", nights, summary)
        bands = (ubercal_bands or bands_observed_task(store, usable)) if usable else []
        first, last = (min(nights), max(nights)) if nights else (None, None)
        for band in bands:
            config_b = cfg.build("ubercal", band=band, first_night=first, last_night=last)
            fit = ubercal_task.submit(store, refcat, config_b)
            track([fit], "ubercal", band, "fit")
            summary["ubercal"][band] = fit.result()
    if "lightcurves" in stages:
        if targets is None:
            raise ValueError("the lightcurves stage needs the targets table (--targets)")
        summary["lightcurves"] = _lightcurves_stage(
            store, targets, nights, lightcurves or cfg["lightcurves"]
        )
    if "train" in stages or "score" in stages:
        if refcat is None:
            raise ValueError("the train and score stages need the reference catalog (--refcat)")
        usable = _usable_nights(store, "train" if "train" in stages else "score", nights, summary)
        summary["zp"] = _zp_stage(store, usable, refcat, stages, zp or cfg["zp"], checkpoint)
    if "transients" in stages:
        summary["transients"] = _transients_stage(store, nights, transients or cfg["transients"])
    if publish:
        publish_reports(store, touched_nights(summary), summary)
    forget_results_task(store)  # kept only for recoveries within this run
    raise_for_missing(summary, named=strict_nights and nights is not None)
    return summary


def _usable_nights(
    store: str, stage: str, nights: list[str] | None, summary: dict[str, Any]
) -> list[str]:
    """The nights whose input for ``stage`` is complete; the others go to the
    summary's ``missing`` with the group and the reason."""
    ok, missing = check_stage_inputs_task(store, stage, nights)
    summary["missing"] += missing if ok or missing else [nothing_found(stage)]
    return ok


def _zp_stage(
    store: str,
    nights: list[str] | None,
    refcat: str,
    stages: list[str],
    config: ZPNetworkConfig,
    checkpoint: str | None,
) -> dict[str, Any]:
    """Features of every night with photometry, then training and/or scoring,
    on a GPU worker when the cluster has one."""
    checkpoint = checkpoint or default_checkpoint(store)
    with_photometry = photometered_nights_task(store, nights)
    features = night_features_task.map(
        unmapped(store), with_photometry, unmapped(refcat), unmapped(config)
    )
    out: dict[str, Any] = {
        "checkpoint": checkpoint,
        "features": dict(zip(with_photometry, features.result(), strict=True)),
    }
    gpus = gpu_workers_task.submit().result()
    with on_gpu_if_any(gpus):
        if "train" in stages:
            with forward_from_workers():  # the training task reports its epochs
                trained = train_zp_task.submit(store, with_photometry, checkpoint, config)
                out["train"] = trained.result()
        if "score" in stages:
            scored = score_zp_task.map(unmapped(store), with_photometry, unmapped(checkpoint))
            track(scored, "score", "zero-point network", "nights")
            out["score"] = dict(zip(with_photometry, scored.result(), strict=True))
    out["gpu_workers"] = gpus
    return out


def _transients_stage(
    store: str, nights: list[str] | None, config: TransientsConfig
) -> dict[str, Any]:
    """Train the localiser, then score each night's pairs, on GPU workers when the
    cluster has them; one ``transients/<night>`` group per night (all indexed
    nights by default)."""
    nights = nights or indexed_nights_task(store, None)
    if not nights:
        return {}
    gpus = gpu_workers_task.submit().result()
    with on_gpu_if_any(gpus):
        model = train_transients_task.submit(config)
        scored = {
            night: score_pair_task.map(
                unmapped(model),
                unmapped(night),
                list(range(config.pairs_per_night)),
                unmapped(config),
            )
            for night in nights
        }
    for night, parts in scored.items():
        track(parts, "transients", night, "pairs")
    out = {
        night: write_transients_task.submit(store, night, parts, config).result()
        for night, parts in scored.items()
    }
    return {"nights": out, "gpu_workers": gpus}


def _lightcurves_stage(
    store: str, targets: str, nights: list[str] | None, config: LightcurveConfig
) -> dict[str, Any]:
    """One task per target: scene-model and difference-image light curves
    (``lightcurves/<name>``, ``lightcurves_forced/<name>``)."""
    planned = plan_lightcurves_task(store, targets, nights)
    done = lightcurve_task.map(unmapped(store), planned, unmapped(config))
    track(done, "lightcurves", f"{len(planned)} targets", "targets")
    return {t.name: r for (t, _), r in zip(planned, done.result(), strict=True)}
