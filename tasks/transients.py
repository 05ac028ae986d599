"""Transients stage: localise transients on reference/new pairs and write
``transients/<night>`` (docs/transients.md).

The pipeline does not keep reduced images (a night is terabytes), and the
simulated survey has no reference images, so the stage works on reference/new
pairs simulated for the night (:mod:`sim.transients`), with seeds derived from
the night: it exercises the whole path (training on GPU workers when there are
any, scoring, Magdiff, the group's layout) and scores itself against the
injected truth. Real pairs would enter through :func:`score_pair` unchanged.

Per night the group holds, on dimension ``detection``: ``pair``, ``method``
(the network and, with ``classical``, the difference-image baseline), ``x``,
``y`` [px], ``score`` (the network's probability; the classical matched-filter
|S/N|), ``delta_mag``, ``delta_mag_err``, ``mag_change`` (Magdiff on the
PSF-matched images with the pair's zero point); on ``(pair_index, methods)``:
``n_found`` and ``n_false`` against the truth (a detection within 3 px), and on
``pair_index``: ``seed`` and ``n_injected``.

:func:`run_transients_night` runs a night without Prefect; the ``*_task``
functions are the adapters the flow wires.
"""

from __future__ import annotations

import zlib
from typing import Any, Literal

import numpy as np
import torch
import xarray as xr
from prefect import task
from pydantic import Field

from calib.difference import detect_transients, measure_magdiff, subtract_images
from ml.device import best_device
from ml.transients import (
    HeatmapNet,
    TrainConfig,
    TransientCNN,
    load_localiser,
    match_to_truth,
    pair_channels,
    save_localiser,
    scan_quadrant,
    train_localiser,
)
from sim.transients import PairConfig, simulate_cutouts, simulate_pair
from tasks.config import StageConfig
from tasks.io import groups
from tasks.io.provenance import provenance
from tasks.io.store import write_group

MATCH_PX = 3.0
_DETECTION_VARS = ("pair", "method", "x", "y", "score", "delta_mag", "delta_mag_err", "mag_change")


class TransientsConfig(StageConfig, table="transients"):
    """Configuration of the transients stage."""

    model: Literal["heatmap", "cnn"] = Field(
        "heatmap",
        description="Localiser: the heat-map U-Net (the benchmark's best) or seed 002's CNN.",
    )
    quadrant_px: int = Field(1024, ge=64, description="Side of the simulated quadrants, pixels.")
    pairs_per_night: int = Field(4, ge=1, description="Simulated pairs scored per night.")
    train_pairs: int = Field(20, ge=1, description="Simulated pairs the model is trained on.")
    epochs: int = Field(4, ge=1, description="Training epochs.")
    threshold: float = Field(
        0.9,
        gt=0,
        lt=1,
        description="Minimum network detection score (0.9: 2 false detections per 1k x 1k "
        "quadrant against 26 at 0.5, docs/transients.md).",
    )
    classical: bool = Field(
        True, description="Also write the classical difference-image detections (5 sigma)."
    )
    classical_threshold: float = Field(5.0, gt=0, description="Matched-filter S/N threshold.")
    seed: int = Field(0, description="Seed of the training pairs and of the nights' pairs.")

    def pair_config(self) -> PairConfig:
        return PairConfig(nx=self.quadrant_px, ny=self.quadrant_px)


def pair_seed(config: TransientsConfig, night: str, index: int) -> int:
    """Seed of the ``index``-th pair of ``night`` (stable across runs)."""
    return zlib.crc32(f"{config.seed}/{night}/{index}".encode())


def train_transient_model(config: TransientsConfig) -> bytes:
    """Train the configured localiser on simulated cutouts (on this process's
    best device); returns its checkpoint."""
    train = simulate_cutouts(
        config.pair_config(), range(config.seed + 1000, config.seed + 1000 + config.train_pairs)
    )
    # The initial weights come from torch's global generator: seed it first.
    torch.manual_seed(config.seed)
    model = HeatmapNet() if config.model == "heatmap" else TransientCNN()
    train_localiser(
        model,
        pair_channels(train.images),
        train.xy,
        train.present,
        config=TrainConfig(epochs=config.epochs, seed=config.seed),
        device=best_device(),
    )
    return save_localiser(model)


def score_pair(
    model_blob: bytes, night: str, index: int, config: TransientsConfig
) -> dict[str, Any]:
    """Detections of one pair by the network (and the classical baseline), with
    Magdiff at each, and their match against the injected truth."""
    seed = pair_seed(config, night, index)
    pair = simulate_pair(config.pair_config(), seed=seed)
    model = load_localiser(model_blob)
    det = scan_quadrant(model, pair.ref, pair.new, threshold=config.threshold, device=best_device())
    diff = subtract_images(pair.ref, pair.new, read_noise_e=pair.config.read_noise_e)
    found: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
        config.model: (det.x, det.y, det.score)
    }
    if config.classical:
        cand = detect_transients(diff, threshold=config.classical_threshold)
        found["classical"] = (cand.x, cand.y, np.abs(cand.snr))
    rows: dict[str, list[np.ndarray]] = {k: [] for k in _DETECTION_VARS}
    counts: dict[str, tuple[int, int]] = {}
    truth = pair.truth
    for method, (x, y, score) in found.items():
        mag = measure_magdiff(diff, x, y, zp_mag=pair.config.zp_mag)
        hit, false = match_to_truth(x, y, truth.x, truth.y, radius_px=MATCH_PX)
        counts[method] = (int(hit.sum()), int(false.sum()))
        for name, values in (
            ("pair", np.full(len(x), index)),
            ("method", np.full(len(x), method)),
            ("x", x),
            ("y", y),
            ("score", score),
            ("delta_mag", mag.delta_mag),
            ("delta_mag_err", mag.delta_mag_err),
            ("mag_change", mag.mag_change),
        ):
            rows[name].append(np.asarray(values))
    return {
        "index": index,
        "seed": seed,
        "n_injected": len(truth),
        "counts": counts,
        "rows": {k: np.concatenate(v) for k, v in rows.items()},
    }


def transients_dataset(parts: list[dict[str, Any]]) -> xr.Dataset:
    """The ``transients/<night>`` content from :func:`score_pair` results."""
    parts = sorted(parts, key=lambda p: p["index"])
    methods = list(parts[0]["counts"])
    data = {
        k: ("detection", np.concatenate([p["rows"][k] for p in parts])) for k in _DETECTION_VARS
    }
    n_found = [[p["counts"][m][0] for m in methods] for p in parts]
    n_false = [[p["counts"][m][1] for m in methods] for p in parts]
    return xr.Dataset(
        {
            **data,
            "seed": ("pair_index", np.array([p["seed"] for p in parts], dtype=np.int64)),
            "n_injected": (
                "pair_index",
                np.array([p["n_injected"] for p in parts], dtype=np.int64),
            ),
            "n_found": (("pair_index", "methods"), np.array(n_found, dtype=np.int64)),
            "n_false": (("pair_index", "methods"), np.array(n_false, dtype=np.int64)),
        },
        coords={"pair_index": [p["index"] for p in parts], "methods": methods},
    )


def write_transients(
    store: str, night: str, parts: list[dict[str, Any]], config: TransientsConfig
) -> dict[str, Any]:
    """Write ``transients/<night>``; returns the night's counts per method."""
    ds = transients_dataset(parts)
    write_group(
        store,
        groups.transients(night),
        ds,
        attrs=provenance(
            "transients",
            config=config,
            inputs="simulated reference/new pairs (sim.transients), seeds in `seed`",
            night=night,
        ),
    )
    methods = [str(m) for m in ds.methods.values]
    return {
        "injected": int(ds.n_injected.sum()),
        **{
            m: {"found": int(ds.n_found[:, i].sum()), "false": int(ds.n_false[:, i].sum())}
            for i, m in enumerate(methods)
        },
    }


def run_transients_night(store: str, night: str, config: TransientsConfig) -> dict[str, Any]:
    """The stage for one night without Prefect (tests, debugging)."""
    blob = train_transient_model(config)
    parts = [score_pair(blob, night, i, config) for i in range(config.pairs_per_night)]
    return write_transients(store, night, parts, config)


@task(name="train-transients", retries=0)
def train_transients_task(config: TransientsConfig) -> bytes:
    """Prefect task: :func:`train_transient_model`."""
    return train_transient_model(config)


@task(name="score-transients", retries=1, retry_delay_seconds=2)
def score_pair_task(
    model_blob: bytes, night: str, index: int, config: TransientsConfig
) -> dict[str, Any]:
    """Prefect task: :func:`score_pair`."""
    return score_pair(model_blob, night, index, config)


@task(name="write-transients", retries=1, retry_delay_seconds=2)
def write_transients_task(
    store: str, night: str, parts: list[dict[str, Any]], config: TransientsConfig
) -> dict[str, Any]:
    """Prefect task: :func:`write_transients`."""
    return write_transients(store, night, parts, config)
