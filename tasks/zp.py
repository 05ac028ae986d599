"""Zero-point network tasks: features per night, training, scoring
(docs/zp_network.md)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from prefect import task
from pydantic import Field

from ml.device import best_device
from ml.zp_baselines import regression_metrics
from ml.zp_checkpoint import (
    ONNX,
    OnnxScorer,
    data_hash,
    export_onnx,
    load_checkpoint,
    save_checkpoint,
)
from ml.zp_clearsky import ClearSkyModels, fit_clear_sky_models
from ml.zp_context import attach_context, attach_context_out_of_night
from ml.zp_features import (
    CONTEXT_CHANNELS,
    CONTEXT_LENGTH,
    MAX_STARS,
    STAR_CHANNELS,
    TELEMETRY_CHANNELS,
    ExposureInputs,
    FeatureSet,
    band_of_telemetry,
    build_features,
    split_by_night,
)
from ml.zp_model import AZPRC, ESTIMATES, AZPRCConfig
from ml.zp_train import (
    TrainConfig,
    predict,
    predict_intervals,
    stars_consistency,
    train_zp_network,
)
from sim.zpsim import DOMAINS, ZPExposure, simulate_zp_exposures
from tasks.config import StageConfig
from tasks.io import groups
from tasks.io.provenance import code_revision, photocal_version, provenance
from tasks.io.raw import RefCatalog, read_refcat
from tasks.io.store import (
    StoreError,
    group_exists,
    is_local,
    list_children,
    local_path,
    read_group,
    write_group,
)
from tasks.logs import run_logger
from tasks.progress import emit


def features_from_simulation(
    exposures: list[ZPExposure], *, patch_px: int, max_stars: int = MAX_STARS, median: bool = False
) -> FeatureSet:
    """The simulator's feature mode through the pipeline's feature code; the
    target is the true offset, nights are labelled by domain and date (the
    median zero point too with ``median``)."""
    return build_features(
        [
            ExposureInputs(
                expid=e.expid,
                night=f"{e.domain}:{e.night}",
                domain=e.domain,
                mjd=e.mjd,
                band=e.band,
                airmass=e.airmass,
                out_temp_c=e.out_temp_c,
                out_rhum_pct=e.out_rhum_pct,
                wind_mps=e.wind_mps,
                image_e_s=e.image_e_s,
                mag_ref=e.mag_ref,
                colour=e.colour,
                x=e.x,
                y=e.y,
                mag_inst=e.mag_inst,
                mag_inst_err=e.mag_inst_err,
                zp_nominal_mag=e.zp_nominal_mag,
                target_mag=e.offset_mag,
            )
            for e in exposures
        ],
        patch_px=patch_px,
        max_stars=max_stars,
        median=median,
    )


# --- the pipeline's nights --------------------------------------------------------


class ZPNetworkConfig(StageConfig, table="zp"):
    """Configuration of the zero-point network stages (features, train, score)."""

    zp_nominal_mag: dict[str, float] = Field(
        default_factory=lambda: {"g": 24.8, "r": 24.6, "i": 24.2},
        description="The instrument's clear-sky, zero-airmass zero point per band [mag]; the "
        "network predicts zp - zp_nominal (docs/zp_network.md).",
    )
    patch_px: int = Field(32, ge=8, description="Model patch side (256 on GPU workers).")
    cnn_channels: tuple[int, int] = Field((16, 32), description="CFE filters (paper: 64, 128).")
    gru_hidden: int = Field(32, ge=1, description="GRU hidden size per direction (paper: 64).")
    max_stars: int = Field(
        32, ge=1, le=MAX_STARS, description="Brightest stars the GRU reads (paper: all; 64 max)."
    )
    domain: int = Field(
        2,
        ge=0,
        le=2,
        description="Domain label of this survey's nights (the simulated training nights are "
        "0 and 1): it gets its own clear-sky model, fitted to its nights' classical zero "
        "points starting from the pooled one.",
    )
    sim_nights: int = Field(
        40,
        ge=0,
        description="Nights of each simulated domain (A, B) added to the training set.",
    )
    sim_exposures_per_night: int = Field(40, ge=1, description="Simulated exposures a night.")
    epochs: int = Field(40, ge=1, description="Upper limit on training epochs.")
    dann_alpha: float = Field(0.01, ge=0, description="Gradient-reversal strength; 0: off.")
    seed: int = Field(0, description="Seeds the simulation, the split and the training.")
    export_onnx: bool = Field(True, description="Also write model.onnx for CPU scoring.")


def _night_targets(
    store: str, band_of: dict[int, str], config: ZPNetworkConfig
) -> dict[int, float]:
    """Ubercal zero point minus nominal, averaged over quadrants, by expid."""
    out: dict[int, float] = {}
    for band in sorted(set(band_of.values())):
        if not group_exists(store, groups.ubercal(band)):
            continue
        ub = read_group(store, groups.ubercal(band))
        zp = np.nanmean(ub.zp.values, axis=1)
        for expid, value in zip(ub.expid.values.tolist(), zp, strict=True):
            if band_of.get(expid) == band and np.isfinite(value):
                out[expid] = float(value) - config.zp_nominal_mag[band]
    return out


def night_features(
    store: str, night: str, refcat: RefCatalog, config: ZPNetworkConfig
) -> FeatureSet:
    """Features of one night's exposures from ``nights/<night>/{exposures,catalog,patches}``
    and the reference catalog; targets from ``ubercal/<band>`` (NaN before ubercal)."""
    exposures = read_group(store, groups.exposures(night))
    catalog = read_group(store, groups.catalog(night))
    # An ingested catalog has no images: its exposures get a blank patch (all
    # NaN, which patch_image turns into zeros), the star list and telemetry stay.
    has_patches = group_exists(store, groups.patches(night))
    patch_of = {}
    if has_patches:
        patches = read_group(store, groups.patches(night))
        patch_of = dict(zip(patches.expid.values.tolist(), patches.patch.values, strict=True))
    blank = np.full((config.patch_px, config.patch_px), np.nan, dtype=np.float32)
    ref_rows = refcat.rows_of(catalog.source_id.values)
    # Clean matched observations grouped by exposure (stable: ascending within one).
    usable = np.nonzero((catalog.flags.values == 0) & (ref_rows >= 0))[0]
    usable = usable[np.argsort(catalog.expid.values[usable], kind="stable")]
    usable_expid = catalog.expid.values[usable]
    nx, ny = float(catalog.attrs["quad_nx"]), float(catalog.attrs["quad_ny"])
    expids = exposures.expid.values.astype(np.int64)
    bands = [str(b) for b in exposures.band.values]
    for band in set(bands):
        if band not in config.zp_nominal_mag:
            raise ValueError(
                f"{groups.night(night)}: band {band!r} has no zp_nominal_mag in the config"
            )
    targets = _night_targets(store, dict(zip(expids.tolist(), bands, strict=True)), config)
    inputs = []
    for k, expid in enumerate(expids.tolist()):
        if has_patches and expid not in patch_of:
            raise StoreError(f"{groups.patches(night)} has no patch for exposure {expid}")
        lo = np.searchsorted(usable_expid, expid, side="left")
        obs = usable[lo : np.searchsorted(usable_expid, expid, side="right")]
        rows = ref_rows[obs]
        x, y = catalog.x.values[obs], catalog.y.values[obs]
        e = exposures.isel(exposure=k)
        inputs.append(
            ExposureInputs(
                expid=expid,
                night=night,
                domain=config.domain,
                mjd=float(e.mjd),
                band=bands[k],
                airmass=float(e.airmass),
                out_temp_c=float(e.out_temp_c),
                out_rhum_pct=float(e.out_rhum_pct),
                wind_mps=float(e.wind_mps),
                image_e_s=patch_of.get(expid, blank),
                mag_ref=getattr(refcat, f"{bands[k]}_mag")[rows],
                colour=refcat.bp_rp[rows],
                x=(x - nx / 2) / (nx / 2),
                y=(y - ny / 2) / (ny / 2),
                mag_inst=catalog.mag_inst.values[obs],
                mag_inst_err=catalog.mag_inst_err.values[obs],
                zp_nominal_mag=config.zp_nominal_mag[bands[k]],
                target_mag=targets.get(expid, np.nan),
            )
        )
    return build_features(inputs, patch_px=config.patch_px, max_stars=config.max_stars)


def _features_dataset(fs: FeatureSet) -> xr.Dataset:
    return xr.Dataset(
        {
            "patch": (("exposure", "py", "px"), fs.patch),
            "stars": (("exposure", "star", "channel"), fs.stars),
            "n_stars": ("exposure", fs.n_stars),
            "telemetry": (("exposure", "telemetry_channel"), fs.telemetry),
            "catalog_zp": ("exposure", fs.catalog_zp_mag),
            "catalog_zp_err": ("exposure", fs.catalog_zp_err_mag),
            "median_zp": ("exposure", fs.median_zp_mag),
            "plane_zp": ("exposure", fs.plane_zp_mag),
            "plane_zp_err": ("exposure", fs.plane_zp_err_mag),
            "sparse_zp": ("exposure", fs.sparse_zp_mag),
            "sparse_zp_err": ("exposure", fs.sparse_zp_err_mag),
            "log_sky": ("exposure", fs.log_sky),
            "mjd": ("exposure", fs.mjd),
            "target": ("exposure", fs.target_mag),
            "domain": ("exposure", fs.domain),
            "night": ("exposure", fs.night.astype(object)),
            "expid": ("exposure", fs.expid),
        },
        coords={
            "channel": list(STAR_CHANNELS),
            "telemetry_channel": list(TELEMETRY_CHANNELS),
        },
    )


def _feature_set(ds: xr.Dataset) -> FeatureSet:
    """The stored features (the clear-sky offsets and night context are the
    model's to attach)."""
    n = ds.sizes["exposure"]
    return FeatureSet(
        patch=ds.patch.values.astype(np.float32),
        stars=ds.stars.values.astype(np.float32),
        n_stars=ds.n_stars.values.astype(np.int64),
        telemetry=ds.telemetry.values.astype(np.float32),
        catalog_zp_mag=ds.catalog_zp.values.astype(np.float64),
        catalog_zp_err_mag=ds.catalog_zp_err.values.astype(np.float64),
        median_zp_mag=ds.median_zp.values.astype(np.float64),
        plane_zp_mag=ds.plane_zp.values.astype(np.float64),
        plane_zp_err_mag=ds.plane_zp_err.values.astype(np.float64),
        sparse_zp_mag=ds.sparse_zp.values.astype(np.float64),
        sparse_zp_err_mag=ds.sparse_zp_err.values.astype(np.float64),
        log_sky=ds.log_sky.values.astype(np.float64),
        mjd=ds.mjd.values.astype(np.float64),
        clear_sky_mag=np.full(n, np.nan),
        context=np.zeros((n, CONTEXT_LENGTH, len(CONTEXT_CHANNELS)), dtype=np.float32),
        target_mag=ds.target.values.astype(np.float64),
        domain=ds.domain.values.astype(np.int64),
        night=np.array([str(v) for v in ds.night.values]),
        expid=ds.expid.values.astype(np.int64),
    )


def write_night_features(
    store: str, night: str, refcat_path: str, config: ZPNetworkConfig
) -> dict[str, int]:
    """Compute and write ``ml/features/<night>``; counts back."""
    fs = night_features(store, night, read_refcat(refcat_path), config)
    attrs = provenance(
        "zp-features",
        config=config,
        inputs=[groups.exposures(night), groups.catalog(night), groups.patches(night)],
        night=night,
        refcat=refcat_path,
        target="ubercal zp (mean over quadrants) - zp_nominal(band), mag; NaN before ubercal",
    )
    write_group(store, groups.features(night), _features_dataset(fs), attrs=attrs)
    return {"exposures": len(fs), "with_target": int(np.isfinite(fs.target_mag).sum())}


def read_features(store: str, nights: list[str]) -> FeatureSet:
    """The stored features of ``nights`` (every one must have been written)."""
    if not nights:
        raise ValueError("read_features: no nights given")
    return FeatureSet.concat([_feature_set(read_group(store, groups.features(n))) for n in nights])


def simulated_training_set(config: ZPNetworkConfig) -> FeatureSet | None:
    """``sim_nights`` nights of simulated domains A and B (None when 0)."""
    if config.sim_nights == 0:
        return None
    exposures = []
    for name in ("A", "B"):
        exposures += simulate_zp_exposures(
            DOMAINS[name],
            n_nights=config.sim_nights,
            exposures_per_night=config.sim_exposures_per_night,
            patch_px=config.patch_px,
            seed=config.seed,
        )
    return features_from_simulation(exposures, patch_px=config.patch_px, max_stars=config.max_stars)


def train_zp(
    store: str, nights: list[str], checkpoint: str, config: ZPNetworkConfig
) -> dict[str, Any]:
    """Train AZP-RC on the stored features of ``nights`` with an ubercal target
    plus the simulated nights; evaluate on held-out nights against the classical
    zero point; write the checkpoint (weights, model card with the clear-sky
    models, ONNX)."""
    parts = []
    if nights:
        parts.append(read_features(store, nights))
    simulated = simulated_training_set(config)
    if simulated is not None:
        parts.append(simulated)
    if not parts:
        raise ValueError("train_zp: no stored nights and no simulated nights (sim_nights = 0)")
    every = FeatureSet.concat(parts)
    with_target = np.unique(every.night[np.isfinite(every.target_mag)])
    if len(with_target) < 3:
        raise ValueError(
            f"train_zp: {len(with_target)} night(s) with targets; need >= 3 "
            "(run ubercal first, or add simulated nights with sim_nights)"
        )
    data = every.select(np.isin(every.night, with_target))
    is_train, is_val, is_test = split_by_night(data.night, seed=config.seed)
    # Clear-sky models from the classical zero points (no targets) of every
    # night but the held-out ones: the survey's nights without an ubercal
    # target too, so that its instrument (config.domain) gets its own fit
    # rather than the simulated domains' pooled one. The context is made on
    # whole nights.
    held_out = np.isin(every.night, np.unique(data.night[is_test]))
    clear_sky = fit_clear_sky_models(every.select(~held_out))
    data = attach_context(data, clear_sky)
    model_config = AZPRCConfig(
        patch_px=config.patch_px, cnn_channels=config.cnn_channels, gru_hidden=config.gru_hidden
    )
    train_config = TrainConfig(epochs=config.epochs, dann_alpha=config.dann_alpha, seed=config.seed)
    epochs = train_config.epochs

    def report(epoch: int) -> None:
        emit("train", "zero-point network", epoch + 1, epochs, "epochs")

    # The intervals are calibrated on the validation nights with each night's
    # clear-sky offsets fitted without it, as a scored night sees them.
    calibration = attach_context_out_of_night(
        data.select(is_val),
        lambda night: fit_clear_sky_models(every.select(~held_out & (every.night != night))),
    )
    trained = train_zp_network(
        model_config,
        data.select(is_train),
        data.select(is_val),
        train_config,
        calibration=calibration,
        on_epoch=report,
    )
    # Early stopping ends before the last epoch: the bar ends where training did.
    ran = len(trained.history) - 1
    emit("train", "zero-point network", ran, ran, "epochs")
    test = data.select(is_test)
    metrics = held_out_metrics(trained.model, test)
    card = {
        "stage_config": config.model_dump(),
        "train_config": train_config.to_dict(),
        "data_sha256": data_hash(data.select(is_train | is_val)),
        "training_nights": {"store": sorted(set(nights)), "simulated": int(config.sim_nights)},
        "split_exposures": {
            "train": int(is_train.sum()),
            "val": int(is_val.sum()),
            "test": int(is_test.sum()),
        },
        "metrics_test_mag": metrics,
        "best_epoch": trained.best_epoch,
        "interval_calibration": {
            "regimes": list(ESTIMATES),
            "rows": "domain",
            "sigma_scale": trained.model.sigma_scale.tolist(),
            "tail_scale": trained.model.tail_scale.tolist(),
        },
        "clear_sky": clear_sky.to_dict(),
        "train_seconds": trained.seconds,
        "device": str(next(trained.model.parameters()).device),
        "photocal": photocal_version(),
        "code_revision": code_revision(),
        "zero_point_convention": "zp = zp_nominal_mag[band] + offset; m = m_inst + zp",
    }
    out = Path(checkpoint)
    if config.export_onnx:
        model = trained.model.cpu()
        out.mkdir(parents=True, exist_ok=True)
        export_onnx(model, test, out / ONNX)
        parity = float(
            np.max(np.abs(OnnxScorer(out / ONNX).predict(test)[0] - predict(model, test)[0]))
        )
        card["onnx_max_abs_diff_mag"] = parity
    save_checkpoint(out, trained.model, card)
    return {"checkpoint": str(out), "metrics": metrics, "exposures": card["split_exposures"]}


def held_out_metrics(model: AZPRC, test: FeatureSet) -> dict[str, dict[str, float]]:
    """AZP-RC and the classical zero point on held-out exposures (features with
    context attached): over all, and where the classical has an answer."""
    pred, sigma, half95 = predict_intervals(model, test)
    answered = np.isfinite(test.catalog_zp_mag)  # the classical needs >= 3 stars
    return {
        "azprc": regression_metrics(pred, sigma, test.target_mag, half95=half95),
        "azprc_where_classical_answers": regression_metrics(
            pred[answered], sigma[answered], test.target_mag[answered], half95=half95[answered]
        ),
        "classical": regression_metrics(
            test.catalog_zp_mag, test.catalog_zp_err_mag, test.target_mag
        ),
    }


def score_zp(store: str, night: str, checkpoint: str) -> dict[str, Any]:
    """Score a night's stored features with a checkpoint (its clear-sky models
    and the night's context); write ``ml/scores/<night>``."""
    model, card = load_checkpoint(checkpoint, device=str(best_device()))
    config = ZPNetworkConfig(**card["stage_config"])
    ds = read_group(store, groups.features(night))
    fs = _feature_set(ds)
    if fs.patch.shape[1] != model.config.patch_px:
        raise ValueError(
            f"{groups.features(night)} has {fs.patch.shape[1]}-px patches, the model "
            f"{model.config.patch_px}: recompute the features with the model's config"
        )
    fs = attach_context(fs, ClearSkyModels.from_dict(card["clear_sky"]))
    offset, sigma, half95 = predict_intervals(model, fs)
    check = stars_consistency(offset, sigma, fs.catalog_zp_mag, fs.catalog_zp_err_mag)
    sigma, half95 = sigma * check.factor, half95 * check.factor
    bands = band_of_telemetry(fs.telemetry)
    nominal = np.array([config.zp_nominal_mag[b] for b in bands])
    scores = xr.Dataset(
        {
            "expid": ("exposure", fs.expid),
            "band": ("exposure", np.array(bands, dtype=object)),
            "zp_offset": ("exposure", offset),
            "zp_offset_err": ("exposure", sigma),
            "zp_offset_err95": ("exposure", half95),
            "zp": ("exposure", nominal + offset),
            "catalog_zp_offset": ("exposure", fs.catalog_zp_mag),
            "catalog_zp_offset_err": ("exposure", fs.catalog_zp_err_mag),
            "clear_sky_offset": ("exposure", fs.clear_sky_mag),
        }
    )
    for name in scores.data_vars:
        if name not in ("expid", "band"):
            scores[name].attrs["units"] = "mag"
    scores["zp_offset_err"].attrs["meaning"] = "68.3 % interval half-width (calibrated)"
    scores["zp_offset_err95"].attrs["meaning"] = "95 % interval half-width (calibrated)"
    attrs = provenance(
        "score-zp",
        config=config,
        inputs=[groups.features(night), str(checkpoint)],
        night=night,
        checkpoint=str(checkpoint),
        model_card={k: card[k] for k in ("data_sha256", "code_revision", "metrics_test_mag")},
        device=str(best_device()),
        convention="zp = zp_nominal_mag[band] + zp_offset; m = m_inst + zp",
        stars_consistency=asdict(check),
    )
    write_group(store, groups.scores(night), scores, attrs=attrs)
    if check.factor > 1:
        run_logger(__name__).warning(
            "%s: the network disagrees with the night's stars (chi2 %.1f over %d "
            "exposures, p %.1e): its intervals widened %.2fx",
            groups.scores(night), check.chi2, check.dof, check.p_value, check.factor,
        )  # fmt: skip
    return {
        "exposures": len(fs),
        "interval_factor": check.factor,
        "median_offset_mag": float(np.median(offset)) if len(fs) else None,
    }


@task(name="zp-features", retries=1, retry_delay_seconds=2)
def night_features_task(
    store: str, night: str, refcat_path: str, config: ZPNetworkConfig
) -> dict[str, int]:
    return write_night_features(store, night, refcat_path, config)


@task(name="train-zp", retries=0)
def train_zp_task(
    store: str, nights: list[str], checkpoint: str, config: ZPNetworkConfig
) -> dict[str, Any]:
    """Runs where it is submitted: on a GPU worker when the flow annotated it so."""
    return train_zp(store, nights, checkpoint, config)


@task(name="score-zp", retries=1, retry_delay_seconds=2)
def score_zp_task(store: str, night: str, checkpoint: str) -> dict[str, Any]:
    return score_zp(store, night, checkpoint)


def default_checkpoint(store: str) -> str:
    """``models/azprc`` beside a local store; object stores must name one."""
    if not is_local(store):
        raise ValueError(f"store {store!r} is not local: give the checkpoint directory")
    return os.path.join(os.path.dirname(os.path.abspath(local_path(store))), "models", "azprc")


@task(name="photometered-nights")
def photometered_nights_task(store: str, nights: list[str] | None) -> list[str]:
    """Nights (of ``nights``, or all) whose catalog and exposures are in the store
    (patches too for photometered nights; ingested ones have none)."""
    found = list_children(store, groups.NIGHTS)
    wanted = found if nights is None else sorted(set(found) & set(nights))
    return [
        n
        for n in sorted(wanted)
        if group_exists(store, groups.catalog(n)) and group_exists(store, groups.exposures(n))
    ]
