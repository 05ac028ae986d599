"""Features of one exposure for the zero-point network (docs/zp_network.md).

One code path for every source: the pipeline's nights (tasks/zp.py reads the
night's catalog, exposures and patches from the store) and the simulator's
feature mode (sim/zpsim.py) both hand this module plain arrays and get the same
tensors back.

Zero-point convention: ``zp = zp_nominal(band) + offset``, in the store's
convention ``m = m_inst + zp``. ``zp_nominal`` is the instrument's clear-sky,
zero-airmass zero point of the band (a constant per instrument, in the model
card); the network predicts ``offset`` (extinction, clouds, telemetry-driven
losses), the same quantity on every instrument.

Star channels (the paper's five, adapted): the reference magnitude, the colour,
the star's distance from the quadrant centre, the measurement error, and the
instrumental magnitude as the star's own zero-point offset
``m_ref - m_inst - zp_nominal``. Airmass is per exposure and goes with the
telemetry; the instrumental magnitude enters relative to the reference so that
the network does not have to learn a subtraction to 1 mmag.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from calib.zeropoint import classical_zeropoints

STAR_CHANNELS = ("mag_ref", "colour", "radius", "log_mag_err", "star_offset")
TELEMETRY_CHANNELS = ("airmass", "out_temp_c", "out_rhum_pct", "wind_mps", "g", "r", "i")
BANDS = ("g", "r", "i")
TARGET_SCALE_MAG = 0.1
"""Offsets are handed to the network in units of 0.1 mag."""
PATCH_SCALE_E_S = 100.0
"""Patches are ``asinh(image / 100 e-/s)``: a dark sky sits near 1, stars rise
logarithmically, and the level (clouds dim stars and brighten the sky) is kept."""
MAX_STARS = 64
INPUT_NAMES = ("patch", "stars", "n_stars", "summary", "telemetry")
"""The network's inputs, in the order ``AZPRC.forward`` takes them."""


def star_tensor(
    mag_ref: np.ndarray,
    colour: np.ndarray,
    radius: np.ndarray,
    mag_inst: np.ndarray,
    mag_inst_err: np.ndarray,
    *,
    zp_nominal_mag: float,
    max_stars: int = MAX_STARS,
) -> tuple[np.ndarray, int]:
    """The star list of one exposure as the catalog encoder reads it.

    Parameters
    ----------
    mag_ref, colour : ndarray, shape (n,), mag
        Reference magnitude in the exposure's band and colour (``bp_rp``).
    radius : ndarray, shape (n,)
        Distance from the quadrant centre over the half-diagonal (0..1).
    mag_inst, mag_inst_err : ndarray, shape (n,), mag
        Instrumental magnitude ``-2.5 log10(flux_e / exptime_s)`` and its error.
    zp_nominal_mag : float, mag
        The band's nominal zero point.
    max_stars : int
        Only the brightest ``max_stars`` usable stars are kept.

    Returns
    -------
    stars : ndarray, shape (max_stars, 5), float32
        Channels :data:`STAR_CHANNELS`, zero-padded after the ``n`` stars.
    n : int
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in (mag_ref, colour, radius, mag_inst)]
    err = np.asarray(mag_inst_err, dtype=np.float64)
    if len({a.shape for a in [*arrays, err]}) != 1:
        raise ValueError("star_tensor: mag_ref, colour, radius, mag_inst, mag_inst_err differ")
    if max_stars < 1:
        raise ValueError(f"max_stars must be >= 1, got {max_stars}")
    mag_ref, colour, radius, mag_inst = arrays
    ok = np.isfinite(mag_ref) & np.isfinite(colour) & np.isfinite(mag_inst)
    ok &= np.isfinite(err) & (err > 0)
    idx = np.nonzero(ok)[0]
    idx = idx[np.argsort(mag_ref[idx], kind="stable")[:max_stars]]
    out = np.zeros((max_stars, len(STAR_CHANNELS)), dtype=np.float32)
    n = len(idx)
    out[:n, 0] = (mag_ref[idx] - 17.0) / 2.0
    out[:n, 1] = colour[idx] - 1.0
    out[:n, 2] = np.clip(radius[idx], 0.0, 1.5)
    out[:n, 3] = np.log10(np.maximum(err[idx], 1e-4) / 0.01)
    out[:n, 4] = (mag_ref[idx] - mag_inst[idx] - zp_nominal_mag) / TARGET_SCALE_MAG
    return out, n


def catalog_zero_point(
    mag_ref: np.ndarray,
    mag_inst: np.ndarray,
    mag_inst_err: np.ndarray,
    *,
    zp_nominal_mag: float,
    min_stars: int = 3,
) -> tuple[float, float]:
    """The classical zero-point offset of one exposure [mag] and its error: the
    sigma-clipped median of the stars' ``m_ref - m_inst - zp_nominal``
    (calib.zeropoint, no colour term). NaN, NaN with fewer than ``min_stars``.

    The paper's catalog-level feature ("weighted average of catalog zero-point
    offsets"), and on its own the honest baseline.
    """
    ref, inst, err = (np.asarray(a, dtype=np.float64) for a in (mag_ref, mag_inst, mag_inst_err))
    ok = np.isfinite(ref) & np.isfinite(inst) & np.isfinite(err) & (err > 0)
    if ok.sum() < min_stars:
        return float("nan"), float("nan")
    zps = classical_zeropoints(
        inst[ok] + zp_nominal_mag,
        ref[ok],
        np.zeros(ok.sum()),
        np.zeros(ok.sum(), dtype=np.int64),
        m_inst_err=err[ok],
        colour_term=0.0,
        min_stars=min_stars,
    )
    return float(zps.zp[0]), float(zps.zp_err[0])


def catalog_summary(zp_mag: np.ndarray, zp_err_mag: np.ndarray) -> np.ndarray:
    """The catalog zero point as the network reads it: shape (n, 3), float32,
    (offset in model units or 0, log10(error / 10 mmag) or 2, present 1/0)."""
    zp, err = np.asarray(zp_mag, dtype=np.float64), np.asarray(zp_err_mag, dtype=np.float64)
    ok = np.isfinite(zp) & np.isfinite(err) & (err > 0)
    return np.column_stack(
        [
            np.where(ok, zp, 0.0) / TARGET_SCALE_MAG,
            np.where(ok, np.log10(np.where(ok, err, 1.0) / 0.01), 2.0),
            ok.astype(np.float64),
        ]
    ).astype(np.float32)


def telemetry_vector(
    *, airmass: float, out_temp_c: float, out_rhum_pct: float, wind_mps: float, band: str
) -> np.ndarray:
    """Telemetry of one exposure, scaled to order one: shape (7,), float32,
    channels :data:`TELEMETRY_CHANNELS` (the band one-hot: extinction per
    airmass depends on it). Missing values (NaN) become the channel's centre."""
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS}, got {band!r}")
    scaled = [
        (airmass - 1.3) / 0.3,
        (out_temp_c - 10.0) / 8.0,
        (out_rhum_pct - 50.0) / 25.0,
        (wind_mps - 5.0) / 4.0,
    ]
    onehot = [float(band == b) for b in BANDS]
    return np.nan_to_num(np.array(scaled + onehot, dtype=np.float32), nan=0.0)


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` pixels of a 2-d image (all of it along an
    axis shorter than ``size``); a view."""
    y0, x0 = max(0, (image.shape[0] - size) // 2), max(0, (image.shape[1] - size) // 2)
    return image[y0 : y0 + size, x0 : x0 + size]


def band_of_telemetry(telemetry: np.ndarray) -> list[str]:
    """The bands back from telemetry vectors' one-hot (:func:`telemetry_vector`);
    ``telemetry`` shape (n, 7)."""
    first = TELEMETRY_CHANNELS.index(BANDS[0])
    onehot = np.asarray(telemetry)[:, first : first + len(BANDS)]
    return [BANDS[k] for k in np.argmax(onehot, axis=1)]


def patch_image(image_e_s: np.ndarray, size: int) -> np.ndarray:
    """An image patch at the model's size: block-averaged by the largest whole
    factor that keeps ``size`` pixels, centre-cropped, edge-padded if smaller,
    then scaled by :data:`PATCH_SCALE_E_S` through asinh. Shape (size, size),
    float32. Non-finite pixels (masked defects) become the patch median."""
    img = np.asarray(image_e_s, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"patch_image: image must be 2-d, got shape {img.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    finite = np.isfinite(img)
    fill = float(np.median(img[finite])) if finite.any() else 0.0
    img = np.where(finite, img, fill)
    f = max(1, min(img.shape) // size)
    ny, nx = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    img = centre_crop(img[:ny, :nx].reshape(ny // f, f, nx // f, f).mean(axis=(1, 3)), size)
    pad_y, pad_x = size - img.shape[0], size - img.shape[1]
    if pad_y or pad_x:
        img = np.pad(
            img, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2)), "edge"
        )
    return np.arcsinh(img / PATCH_SCALE_E_S).astype(np.float32)


@dataclass(frozen=True)
class FeatureSet:
    """Features of many exposures, ready for training or scoring.

    Attributes
    ----------
    patch : ndarray, shape (n, P, P), float32
    stars : ndarray, shape (n, S, 5), float32
    n_stars : ndarray, shape (n,), int64
    telemetry : ndarray, shape (n, 7), float32
    catalog_zp_mag, catalog_zp_err_mag : ndarray, shape (n,), mag
        The classical zero-point offset of all the exposure's usable stars and
        its error (:func:`catalog_zero_point`); NaN with fewer than 3 stars.
    target_mag : ndarray, shape (n,), mag
        The zero-point offset to learn (NaN where unknown, e.g. before ubercal).
    domain : ndarray, shape (n,), int64
        Survey domain (instrument) index.
    night : ndarray, shape (n,), str
        Observing night: splits are made by night, never by exposure.
    expid : ndarray, shape (n,), int64
    """

    patch: np.ndarray
    stars: np.ndarray
    n_stars: np.ndarray
    telemetry: np.ndarray
    catalog_zp_mag: np.ndarray
    catalog_zp_err_mag: np.ndarray
    target_mag: np.ndarray
    domain: np.ndarray
    night: np.ndarray
    expid: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.expid)
        for f in fields(self):
            if len(getattr(self, f.name)) != n:
                raise ValueError(
                    f"FeatureSet.{f.name} has {len(getattr(self, f.name))} rows, not {n}"
                )

    def __len__(self) -> int:
        return len(self.expid)

    def select(self, rows: np.ndarray) -> FeatureSet:
        return FeatureSet(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @staticmethod
    def concat(parts: list[FeatureSet]) -> FeatureSet:
        if not parts:
            raise ValueError("FeatureSet.concat: nothing to concatenate")
        return FeatureSet(
            **{
                f.name: np.concatenate([getattr(p, f.name) for p in parts])
                for f in fields(FeatureSet)
            }
        )


def split_by_night(
    nights: np.ndarray, *, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean train/validation/test masks that never split a night: nights are
    shuffled with ``seed`` and dealt out in the given fractions."""
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions}")
    unique = np.unique(nights)
    if len(unique) < 3:
        raise ValueError(f"need at least 3 nights to split, got {len(unique)}")
    order = np.random.default_rng(seed).permutation(unique)
    n_train = max(1, round(fractions[0] * len(unique)))
    n_val = max(1, round(fractions[1] * len(unique)))
    n_train = min(n_train, len(unique) - 2)
    train, val = set(order[:n_train]), set(order[n_train : n_train + n_val])
    is_train = np.isin(nights, list(train))
    is_val = np.isin(nights, list(val))
    return is_train, is_val, ~(is_train | is_val)


def model_inputs(
    features: FeatureSet, rows: np.ndarray | slice = slice(None)
) -> dict[str, np.ndarray]:
    """The network's inputs as numpy arrays, by name (for onnxruntime)."""
    return {
        "patch": np.ascontiguousarray(features.patch[rows], dtype=np.float32),
        "stars": np.ascontiguousarray(features.stars[rows], dtype=np.float32),
        "n_stars": np.ascontiguousarray(features.n_stars[rows], dtype=np.int64),
        "summary": catalog_summary(
            features.catalog_zp_mag[rows], features.catalog_zp_err_mag[rows]
        ),
        "telemetry": np.ascontiguousarray(features.telemetry[rows], dtype=np.float32),
    }


@dataclass(frozen=True)
class ExposureInputs:
    """What one exposure hands the feature code, from the pipeline or the
    simulator: telemetry, the patch (e-/s per pixel), the matched clean stars
    (arrays of shape (n,)), and the target offset (NaN when unknown)."""

    expid: int
    night: str
    domain: int
    band: str
    airmass: float
    out_temp_c: float
    out_rhum_pct: float
    wind_mps: float
    image_e_s: np.ndarray
    mag_ref: np.ndarray
    colour: np.ndarray
    radius: np.ndarray
    mag_inst: np.ndarray
    mag_inst_err: np.ndarray
    zp_nominal_mag: float
    target_mag: float


def build_features(
    exposures: list[ExposureInputs], *, patch_px: int, max_stars: int = MAX_STARS
) -> FeatureSet:
    """The feature set of many exposures (one code path for every source)."""
    if not exposures:
        raise ValueError("build_features: no exposures")
    stars, counts, zps = [], [], []
    for e in exposures:
        tensor, n = star_tensor(
            e.mag_ref,
            e.colour,
            e.radius,
            e.mag_inst,
            e.mag_inst_err,
            zp_nominal_mag=e.zp_nominal_mag,
            max_stars=max_stars,
        )
        stars.append(tensor)
        counts.append(n)
        zps.append(
            catalog_zero_point(
                e.mag_ref, e.mag_inst, e.mag_inst_err, zp_nominal_mag=e.zp_nominal_mag
            )
        )
    zp = np.array(zps, dtype=np.float64).reshape(-1, 2)
    return FeatureSet(
        patch=np.stack([patch_image(e.image_e_s, patch_px) for e in exposures]),
        stars=np.stack(stars),
        n_stars=np.array(counts, dtype=np.int64),
        telemetry=np.stack(
            [
                telemetry_vector(
                    airmass=e.airmass,
                    out_temp_c=e.out_temp_c,
                    out_rhum_pct=e.out_rhum_pct,
                    wind_mps=e.wind_mps,
                    band=e.band,
                )
                for e in exposures
            ]
        ),
        catalog_zp_mag=zp[:, 0],
        catalog_zp_err_mag=zp[:, 1],
        target_mag=np.array([e.target_mag for e in exposures], dtype=np.float64),
        domain=np.array([e.domain for e in exposures], dtype=np.int64),
        night=np.array([e.night for e in exposures]),
        expid=np.array([e.expid for e in exposures], dtype=np.int64),
    )
