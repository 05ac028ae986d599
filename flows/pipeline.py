"""The photocal flow: stages wired as Prefect tasks on Dask. Flows only wire."""

from __future__ import annotations

from typing import Any, Literal, get_args

from prefect import flow, unmapped

from tasks.devices import gpu_workers_task, on_gpu_if_any
from tasks.index import (
    IndexConfig,
    find_raw_files_task,
    group_by_night_task,
    indexed_nights_task,
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
    has_master,
    plan_masters_task,
    quadrant_chunks,
    reference_period,
)
from tasks.reduce import (
    PhotometryConfig,
    ReduceConfig,
    check_refcat_task,
    photometer_chunk_task,
    plan_reduce_task,
    write_night_task,
)
from tasks.reports import night_report_task
from tasks.resume import forget_results_task
from tasks.transients import (
    TransientsConfig,
    score_pair_task,
    train_transients_task,
    write_transients_task,
)
from tasks.ubercal import UbercalStageConfig, bands_observed_task, ubercal_task
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
) -> dict[str, Any]:
    """Run the requested stages over the raw tree and write the Zarr store.

    With ``overwrite=False`` groups that are already complete are kept and their
    work skipped (how an interrupted backfill resumes). Returns a small summary:
    per night the counts by status, the rejected files with their reasons, the
    masters written and the groups skipped.
    """
    stages = list(NIGHTLY_STAGES) if stages is None else stages
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known stages: {list(STAGES)}")
    index = index or IndexConfig()
    masters = masters or MastersConfig()
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
    }
    if "index" in stages:
        if raw is None:
            raise ValueError("the index stage needs the raw root (--raw)")
        files = find_raw_files_task(raw)
        chunks = [
            files[i : i + index.files_per_task] for i in range(0, len(files), index.files_per_task)
        ]
        validated = validate_files_task.map(unmapped(raw), chunks, unmapped(index))
        by_night = group_by_night_task(validated, nights)
        if not overwrite:
            done = [n for n in by_night if has_master(store, f"index/{n}")]
            summary["skipped"] += [f"index/{n}" for n in done]
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
        summary["masters"] = _masters_stage(store, nights, masters, overwrite, summary["skipped"])
    if "reduce" in stages or "photometry" in stages:
        if refcat is None:
            raise ValueError("the photometry stage needs the reference catalog (--refcat)")
        summary["photometry"] = _photometry_stage(
            store,
            nights,
            refcat,
            reduce or ReduceConfig(),
            photometry or PhotometryConfig(),
            overwrite,
            summary["skipped"],
        )
    if "ubercal" in stages:
        if refcat is None:
            raise ValueError("the ubercal stage needs the reference catalog (--refcat)")
        bands = ubercal_bands or bands_observed_task(store, nights)
        first, last = (min(nights), max(nights)) if nights else (None, None)
        for band in bands:
            config = UbercalStageConfig(band=band, first_night=first, last_night=last)
            summary["ubercal"][band] = ubercal_task.submit(store, refcat, config).result()
    if "train" in stages or "score" in stages:
        if refcat is None:
            raise ValueError("the train and score stages need the reference catalog (--refcat)")
        summary["zp"] = _zp_stage(
            store, nights, refcat, stages, zp or ZPNetworkConfig(), checkpoint
        )
    if "transients" in stages:
        summary["transients"] = _transients_stage(store, nights, transients or TransientsConfig())
    for night, counts in summary["nights"].items():
        night_report_task(store, night, counts, summary)
    forget_results_task(store)  # kept only for recoveries within this run
    return summary


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
            out["train"] = train_zp_task.submit(store, with_photometry, checkpoint, config).result()
        if "score" in stages:
            scored = score_zp_task.map(unmapped(store), with_photometry, unmapped(checkpoint))
            out["score"] = dict(zip(with_photometry, scored.result(), strict=True))
    out["gpu_workers"] = gpus
    return out


def _masters_stage(
    store: str, nights: list[str] | None, config: MastersConfig, overwrite: bool, skipped: list[str]
) -> dict[str, Any]:
    """Master bias, then master flats (which use it), period by period; complete
    groups are kept unless ``overwrite``."""
    out: dict[str, Any] = {}
    plans = plan_masters_task(store, nights, config)
    reference = reference_period(store, plans, config)
    for plan in plans:
        chunks = quadrant_chunks(plan, config)
        group = f"masters/bias/{plan.period}"
        ref = None if reference == plan.period else reference
        if overwrite or not has_master(store, group):
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
        else:
            skipped.append(group)
        for band in plan.flats:
            group = f"masters/flat/{band}/{plan.period}"
            if not overwrite and has_master(store, group):
                skipped.append(group)
                continue
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


def _photometry_stage(
    store: str,
    nights: list[str] | None,
    refcat: str,
    reduce: ReduceConfig,
    photometry: PhotometryConfig,
    overwrite: bool,
    skipped: list[str],
) -> dict[str, Any]:
    """Reduce and photometer each night's science exposures, chunk by chunk."""
    out: dict[str, Any] = {}
    for night in indexed_nights_task(store, nights):
        group = f"nights/{night}/catalog"
        if not overwrite and has_master(store, group):
            skipped.append(group)
            continue
        raw_root, chunks = plan_reduce_task(store, night, reduce)
        if not chunks:
            continue
        parts = photometer_chunk_task.map(
            unmapped(store),
            unmapped(raw_root),
            chunks,
            unmapped(refcat),
            unmapped(night),
            unmapped(reduce),
            unmapped(photometry),
        )
        out[night] = write_night_task(store, night, parts, refcat, reduce, photometry)
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
    out = {
        night: write_transients_task.submit(store, night, parts, config).result()
        for night, parts in scored.items()
    }
    return {"nights": out, "gpu_workers": gpus}
