"""The night's context of an exposure: the exposures of the same night before
it (docs/zp_network.md).

What the stars of one exposure cannot say, the night can: whether it has been
clear so far, how far the recent exposures sat below the clear-sky zero point
(clouds come and go over tens of minutes), how the sky has brightened. Each
exposure gets the ``CONTEXT_LENGTH`` exposures of its night that came before
it (strictly earlier, so a real-time scorer has them too), latest first, one
row each (channels ml/zp_features.CONTEXT_CHANNELS):

- ``dt_h``: time since that exposure, in units of 2 h;
- ``residual``: its classical zero point minus its clear-sky offset, in model
  units (0.1 mag), or its classical zero point alone without a clear-sky model;
- ``log_err``, ``has_zp``: its classical error, and whether it had one;
- ``same_band``: 1 when it was taken in the same band;
- ``d_airmass``: airmass now minus then, over 0.3;
- ``d_log_sky``: the sky now minus then, in mag (clouds brighten it);
- ``valid``: 1 for a real row, 0 for padding;
- ``pull``: the residual over the classical error, through asinh (a clear
  night sits within a few sigma of 0, a cloud far below).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ml.zp_clearsky import ClearSkyModels
from ml.zp_features import (
    CONTEXT_CHANNELS,
    CONTEXT_LENGTH,
    TARGET_SCALE_MAG,
    FeatureSet,
    log_error_channel,
)

_C = {name: k for k, name in enumerate(CONTEXT_CHANNELS)}


def night_context(features: FeatureSet, clear_sky_mag: np.ndarray) -> np.ndarray:
    """The context rows of every exposure, shape (n, CONTEXT_LENGTH, 9), float32.

    ``clear_sky_mag`` (n,) is each exposure's clear-sky offset (NaN: none, and
    the residuals are the classical zero points themselves). Exposures are
    ordered by ``mjd`` within a night (``expid`` breaks ties and stands in for
    a missing time); nights are told apart by domain and name.
    """
    n = len(features)
    clear = np.asarray(clear_sky_mag, dtype=np.float64)
    if clear.shape != (n,):
        raise ValueError(f"clear_sky_mag must have shape ({n},), got {clear.shape}")
    zp, err = features.catalog_zp_mag, features.catalog_zp_err_mag
    has = np.isfinite(zp) & np.isfinite(err) & (err > 0)
    resid = np.where(has, zp - np.nan_to_num(clear), 0.0) / TARGET_SCALE_MAG
    pull = np.arcsinh(np.where(has, resid * TARGET_SCALE_MAG / np.where(has, err, 1.0), 0.0))
    log_err = log_error_channel(err, has)
    band = np.argmax(features.telemetry[:, 4:7], axis=1)
    airmass = features.telemetry[:, 0].astype(np.float64)  # (X - 1.3) / 0.3
    sky = np.nan_to_num(features.log_sky.astype(np.float64))
    mjd = np.where(np.isfinite(features.mjd), features.mjd, 0.0)
    out = np.zeros((n, CONTEXT_LENGTH, len(CONTEXT_CHANNELS)), dtype=np.float32)
    keys = np.char.add(features.domain.astype(str), np.char.add("/", features.night.astype(str)))
    for key in np.unique(keys):
        rows = np.nonzero(keys == key)[0]
        order = rows[np.lexsort((features.expid[rows], mjd[rows]))]
        for lag in range(1, min(CONTEXT_LENGTH, len(order) - 1) + 1):
            now, then = order[lag:], order[:-lag]
            row = out[now, lag - 1]
            row[:, _C["dt_h"]] = np.clip((mjd[now] - mjd[then]) * 24.0 / 2.0, 0.0, 6.0)
            row[:, _C["residual"]] = resid[then]
            row[:, _C["log_err"]] = log_err[then]
            row[:, _C["has_zp"]] = has[then]
            row[:, _C["same_band"]] = band[now] == band[then]
            row[:, _C["d_airmass"]] = airmass[now] - airmass[then]
            row[:, _C["d_log_sky"]] = np.clip(-2.5 * (sky[now] - sky[then]), -3.0, 3.0)
            row[:, _C["valid"]] = 1.0
            row[:, _C["pull"]] = pull[then]
            out[now, lag - 1] = row
    return out


def attach_context(features: FeatureSet, clear_sky: ClearSkyModels | None) -> FeatureSet:
    """``features`` with its clear-sky offsets (none without models) and night
    context attached. Call it on whole nights, before selecting exposures: the
    context of an exposure is made of the exposures before it."""
    clear = np.full(len(features), np.nan) if clear_sky is None else clear_sky.evaluate(features)
    return features.with_context(clear, night_context(features, clear))


def attach_context_out_of_night(
    features: FeatureSet, fit_without: Callable[[str], ClearSkyModels | None]
) -> FeatureSet:
    """:func:`attach_context` with each night's clear-sky offsets from models
    fitted without that night (``fit_without(night)``): what a scored night
    sees, for the nights the intervals are calibrated on. Their clear-sky
    models were fitted on them, and an instrument with ten nights fits its own
    closely enough that intervals calibrated in sample held 63 % instead of 68
    on its later nights (a diagnostic on the benchmark's domain C;
    docs/zp_network.md, "Intervals"). Rows stay in their order."""
    clear = np.full(len(features), np.nan)
    context = np.zeros((len(features), CONTEXT_LENGTH, len(CONTEXT_CHANNELS)), dtype=np.float32)
    for night in np.unique(features.night):
        rows = np.nonzero(features.night == night)[0]
        part = attach_context(features.select(rows), fit_without(str(night)))
        clear[rows], context[rows] = part.clear_sky_mag, part.context
    return features.with_context(clear, context)
