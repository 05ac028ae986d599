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
the star's position in the quadrant (x, y: the spatial pattern a cloud edge
leaves), the measurement error, and the instrumental magnitude as the star's
own zero-point offset ``m_ref - m_inst - zp_nominal``. Airmass is per exposure
and goes with the telemetry; the instrumental magnitude enters relative to the
reference so that the network does not have to learn a subtraction to 1 mmag.

The exposure's zero point from its stars comes three ways, all from
calib.zeropoint over the night's exposures at once (so that the extra
per-star scatter is measured on the whole night): the classical, the
inverse-variance weighted clipped mean (the honest baseline); the sigma-clipped
median (what issue 7 compared with); and a weighted plane fit over the
quadrant, whose intercept is the zero point at the centre when clouds leave a
gradient, with a prior on the gradient as wide as the night's (the weighted
mean on a night without gradients). The night context and the clear-sky model (ml/zp_context.py,
ml/zp_clearsky.py) are attached afterwards: they depend on a fitted model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from calib.zeropoint import classical_zeropoints, extra_scatter

STAR_CHANNELS = ("mag_ref", "colour", "x", "y", "log_mag_err", "star_offset")
TELEMETRY_CHANNELS = ("airmass", "out_temp_c", "out_rhum_pct", "wind_mps", "g", "r", "i")
BANDS = ("g", "r", "i")
TARGET_SCALE_MAG = 0.1
"""Offsets are handed to the network in units of 0.1 mag."""
PATCH_SCALE_E_S = 100.0
"""Patches are ``asinh(image / 100 e-/s)``: a dark sky sits near 1, stars rise
logarithmically, and the level (clouds dim stars and brighten the sky) is kept."""
MAX_STARS = 64
SUMMARY_CHANNELS = (
    "classical", "classical_log_err", "has_classical",
    "plane", "plane_log_err", "has_plane",
    "clear_sky", "has_clear_sky",
    "sparse", "sparse_log_err", "has_sparse",
)  # fmt: skip
"""The exposure-level estimates the network reads (:func:`summary_tensor`)."""
CONTEXT_LENGTH = 8
"""Previous exposures of the night the context holds (ml/zp_context.py)."""
CONTEXT_CHANNELS = (
    "dt_h", "residual", "log_err", "has_zp", "same_band", "d_airmass", "d_log_sky", "valid",
    "pull",
)  # fmt: skip
INPUT_NAMES = ("patch", "stars", "n_stars", "summary", "telemetry", "context", "domain")
"""The network's inputs, in the order ``AZPRC.forward`` takes them."""
MIN_PLANE_STARS = 8
"""A plane fit needs this many kept stars (three parameters and some to spare)."""


def star_tensor(
    mag_ref: np.ndarray,
    colour: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
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
    x, y : ndarray, shape (n,)
        Position in the quadrant, -1..1 from its centre.
    mag_inst, mag_inst_err : ndarray, shape (n,), mag
        Instrumental magnitude ``-2.5 log10(flux_e / exptime_s)`` and its error.
    zp_nominal_mag : float, mag
        The band's nominal zero point.
    max_stars : int
        Only the brightest ``max_stars`` usable stars are kept.

    Returns
    -------
    stars : ndarray, shape (max_stars, 6), float32
        Channels :data:`STAR_CHANNELS`, zero-padded after the ``n`` stars.
    n : int
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in (mag_ref, colour, x, y, mag_inst)]
    err = np.asarray(mag_inst_err, dtype=np.float64)
    if len({a.shape for a in [*arrays, err]}) != 1:
        raise ValueError("star_tensor: mag_ref, colour, x, y, mag_inst, mag_inst_err differ")
    if max_stars < 1:
        raise ValueError(f"max_stars must be >= 1, got {max_stars}")
    mag_ref, colour, x, y, mag_inst = arrays
    idx = np.nonzero(_usable(mag_ref, mag_inst, err) & np.isfinite(colour))[0]
    idx = idx[np.argsort(mag_ref[idx], kind="stable")[:max_stars]]
    out = np.zeros((max_stars, len(STAR_CHANNELS)), dtype=np.float32)
    n = len(idx)
    out[:n, 0] = (mag_ref[idx] - 17.0) / 2.0
    out[:n, 1] = colour[idx] - 1.0
    out[:n, 2] = np.clip(np.nan_to_num(x[idx]), -1.5, 1.5)
    out[:n, 3] = np.clip(np.nan_to_num(y[idx]), -1.5, 1.5)
    out[:n, 4] = np.log10(np.maximum(err[idx], 1e-4) / 0.01)
    out[:n, 5] = (mag_ref[idx] - mag_inst[idx] - zp_nominal_mag) / TARGET_SCALE_MAG
    return out, n


def _usable(mag_ref: np.ndarray, mag_inst: np.ndarray, err: np.ndarray) -> np.ndarray:
    return np.isfinite(mag_ref) & np.isfinite(mag_inst) & np.isfinite(err) & (err > 0)


@dataclass(frozen=True)
class StarZeroPoints:
    """The zero-point offsets [mag] the stars of each exposure give, shape (n,)
    each; NaN where an estimator has too few stars (3 for the classical and the
    median, :data:`MIN_PLANE_STARS` for the plane). ``sparse`` is the weighted
    mean of the one or two stars of an exposure too sparse for the classical
    (no clipping is possible with so few: the network weighs it)."""

    classical: np.ndarray
    classical_err: np.ndarray
    median: np.ndarray
    plane: np.ndarray
    plane_err: np.ndarray
    sparse: np.ndarray
    sparse_err: np.ndarray


def star_zero_points(
    star_offset: list[np.ndarray],
    err: list[np.ndarray],
    x: list[np.ndarray],
    y: list[np.ndarray],
    *,
    min_stars: int = 3,
    clip_sigma: float = 3.0,
    median: bool = False,
) -> StarZeroPoints:
    """The zero-point offsets of the exposures of one night from their stars
    (the median only with ``median``: benchmarks compare with it, the network
    does not read it).

    Parameters
    ----------
    star_offset, err : list of ndarray, shape (n_i,), mag
        Per exposure, each usable star's ``m_ref - m_inst - zp_nominal`` and
        the error of ``m_inst``.
    x, y : list of ndarray, shape (n_i,)
        Positions in the quadrant, -1..1 from its centre.

    The classical is calib.zeropoint's weighted estimator and the median its
    default one (no colour term), both over the night at once so the extra
    scatter is measured on every exposure's stars; the plane is a weighted
    least-squares ``a + b x + c y`` over the stars the classical kept, with a
    prior on the gradient as wide as the night's gradients (:func:`_night_planes`),
    and its value is ``a``.
    """
    n_exp = len(star_offset)
    if not (len(err) == len(x) == len(y) == n_exp):
        raise ValueError("star_zero_points: one array per exposure for each argument")
    counts = np.array([len(s) for s in star_offset])
    out = StarZeroPoints(*(np.full(n_exp, np.nan) for _ in fields(StarZeroPoints)))
    if counts.sum() == 0:
        return out
    group = np.repeat(np.arange(n_exp), counts)
    offset = np.concatenate(star_offset).astype(np.float64)
    e = np.concatenate(err).astype(np.float64)
    args = (np.zeros_like(offset), offset, np.zeros_like(offset), group)  # m_ref - m_inst
    common = {"m_inst_err": e, "colour_term": 0.0, "min_stars": min_stars, "clip_sigma": clip_sigma}
    if median:
        med = classical_zeropoints(*args, **common)
        out.median[med.group] = med.zp
    wtd = classical_zeropoints(*args, **common, estimator="weighted")
    out.classical[wtd.group] = wtd.zp
    out.classical_err[wtd.group] = wtd.zp_err
    extra2 = float(np.nan_to_num(wtd.extra_scatter)) ** 2
    planes = []
    for k in np.nonzero(np.isfinite(out.classical))[0]:
        bound = clip_sigma * np.sqrt(err[k] ** 2 + extra2)
        keep = np.abs(star_offset[k] - out.classical[k]) <= bound
        keep &= np.isfinite(x[k]) & np.isfinite(y[k])
        if keep.sum() >= MIN_PLANE_STARS:
            design = np.column_stack([np.ones(keep.sum()), x[k][keep], y[k][keep]])
            planes.append((k, design, star_offset[k][keep], err[k][keep] ** 2))
    for k, value, value_err in _night_planes(planes):
        out.plane[k], out.plane_err[k] = value, value_err
    for k in np.nonzero(~np.isfinite(out.classical) & (counts > 0) & (counts < min_stars))[0]:
        w = 1.0 / (err[k] ** 2 + extra2)
        out.sparse[k] = float(np.sum(w * star_offset[k]) / np.sum(w))
        out.sparse_err[k] = float(1.0 / np.sqrt(np.sum(w)))
    return out


PlaneStars = tuple[int, np.ndarray, np.ndarray, np.ndarray]
"""One exposure's kept stars: its index, the design ``[1, x, y]``, offsets, stated variances."""
_PLANE_ITERATIONS = 4
_MIN_GRADIENT_MAG = 1e-4
"""The prior's width where a night shows no gradient: 0.1 mmag over the
half-quadrant makes the fit the weighted mean."""


def _night_planes(planes: list[PlaneStars]) -> list[tuple[int, float, float]]:
    """The zero point at the quadrant centre of each exposure of one night from
    a weighted plane ``a + b x + c y`` through its kept stars, with a Gaussian
    prior on the gradient ``(b, c)`` whose width the night's exposures set.

    A free plane removes a cloud's gradient but costs what two more parameters
    cost: its intercept scattered 6.6 mmag where the weighted mean of the same
    stars scattered 3.9 on clear nights. The prior makes the fit the weighted
    mean where the night shows no gradient and a plane where it does, in
    proportion. Per night, by empirical Bayes, from free fits repeated
    :data:`_PLANE_ITERATIONS` times (each with the last extra scatter):

    - the stars' extra scatter about the planes (``extra_scatter``, with each
      star's leverage), since on a cloudy night the classical's extra scatter
      holds the gradient's spread too;
    - the gradient prior's variance per axis, the mean over exposures of
      ``(|g|^2 - trace cov g) / 2`` from the free fits (0 when the fitted
      gradients are no larger than their errors).

    Returns ``(index, value, error)``; an exposure whose fit is degenerate is
    left out.
    """
    if not planes:
        return []
    extra2, prior2 = 0.0, 0.0
    for _ in range(_PLANE_ITERATIONS):
        resid, stated, leverage, gradient_excess = [], [], [], []
        for _k, design, offset, var in planes:
            fit = _weighted_plane(design, offset, var + extra2, 0.0)
            if fit is None:
                continue
            coef, cov = fit
            resid.append(offset - design @ coef)
            stated.append(var)
            leverage.append(np.einsum("ij,jk,ik->i", design, cov, design))
            gradient_excess.append(float(coef[1] ** 2 + coef[2] ** 2 - cov[1, 1] - cov[2, 2]) / 2)
        if not resid:
            return []
        extra2 = (
            extra_scatter(np.concatenate(resid), np.concatenate(stated), np.concatenate(leverage))
            ** 2
        )
        prior2 = max(float(np.mean(gradient_excess)), 0.0)
    precision = 1.0 / max(prior2, _MIN_GRADIENT_MAG**2)
    out = []
    for k, design, offset, var in planes:
        fit = _weighted_plane(design, offset, var + extra2, precision)
        if fit is not None:
            coef, cov = fit
            out.append((k, float(coef[0]), float(np.sqrt(cov[0, 0]))))
    return out


def _weighted_plane(
    design: np.ndarray, offset: np.ndarray, var: np.ndarray, gradient_precision: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """Weighted least squares of ``offset`` on ``design`` with a zero-mean
    prior of precision ``gradient_precision`` on the two gradient terms: the
    coefficients and their covariance; None when degenerate."""
    w = 1.0 / var
    normal = design.T @ (design * w[:, None])
    normal[1, 1] += gradient_precision
    normal[2, 2] += gradient_precision
    if np.linalg.cond(normal) > 1e8:
        return None
    cov = np.linalg.inv(normal)
    return cov @ (design.T @ (w * offset)), cov


def log_error_channel(err: np.ndarray, present: np.ndarray, *, missing: float = 2.0) -> np.ndarray:
    """An error as the network reads it: log10(error / 10 mmag), ``missing``
    where there is no estimate."""
    safe = np.where(present & (err > 0), err, 0.01)
    return np.where(present, np.log10(safe / 0.01), missing)


def summary_tensor(features: FeatureSet, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
    """The exposure-level estimates of ``rows`` as the network reads them:
    shape (n, 11), float32, channels :data:`SUMMARY_CHANNELS`; offsets in model
    units (0 where absent, with the ``has_*`` flag 0)."""

    def estimate(value: np.ndarray, err: np.ndarray) -> list[np.ndarray]:
        ok = np.isfinite(value) & np.isfinite(err) & (err > 0)
        return [np.where(ok, value, 0.0) / TARGET_SCALE_MAG, log_error_channel(err, ok), ok]

    clear_sky = features.clear_sky_mag[rows]
    clear = np.isfinite(clear_sky)
    cols = [
        *estimate(features.catalog_zp_mag[rows], features.catalog_zp_err_mag[rows]),
        *estimate(features.plane_zp_mag[rows], features.plane_zp_err_mag[rows]),
        np.where(clear, clear_sky, 0.0) / TARGET_SCALE_MAG,
        clear,
        *estimate(features.sparse_zp_mag[rows], features.sparse_zp_err_mag[rows]),
    ]
    return np.column_stack(cols).astype(np.float32)


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
    stars : ndarray, shape (n, S, 6), float32
    n_stars : ndarray, shape (n,), int64
    telemetry : ndarray, shape (n, 7), float32
    catalog_zp_mag, catalog_zp_err_mag : ndarray, shape (n,), mag
        The classical zero-point offset of all the exposure's usable stars
        (weighted clipped mean, :func:`star_zero_points`) and its error; NaN
        with fewer than 3 stars.
    median_zp_mag : ndarray, shape (n,), mag
        The sigma-clipped median of the same stars (NaN unless asked for).
    plane_zp_mag, plane_zp_err_mag : ndarray, shape (n,), mag
        The weighted plane fit's value at the quadrant centre and its error.
    sparse_zp_mag, sparse_zp_err_mag : ndarray, shape (n,), mag
        The weighted mean of an exposure with only one or two stars.
    log_sky : ndarray, shape (n,)
        log10 of the patch's median [e-/s per pixel].
    mjd : ndarray, shape (n,)
        Exposure time: the night context reads the exposures before.
    clear_sky_mag : ndarray, shape (n,), mag
        The instrument's clear-sky offset for the exposure's band, airmass and
        telemetry (ml/zp_clearsky.py); NaN until attached.
    context : ndarray, shape (n, L, 9), float32
        The night context (ml/zp_context.py); zeros until attached.
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
    median_zp_mag: np.ndarray
    plane_zp_mag: np.ndarray
    plane_zp_err_mag: np.ndarray
    sparse_zp_mag: np.ndarray
    sparse_zp_err_mag: np.ndarray
    log_sky: np.ndarray
    mjd: np.ndarray
    clear_sky_mag: np.ndarray
    context: np.ndarray
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

    def with_context(self, clear_sky_mag: np.ndarray, context: np.ndarray) -> FeatureSet:
        """The same exposures with the clear-sky offsets and night context attached."""
        return replace(self, clear_sky_mag=np.asarray(clear_sky_mag, float), context=context)

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
        "summary": summary_tensor(features, rows),
        "telemetry": np.ascontiguousarray(features.telemetry[rows], dtype=np.float32),
        "context": np.ascontiguousarray(features.context[rows], dtype=np.float32),
        "domain": np.ascontiguousarray(features.domain[rows], dtype=np.int64),
    }


@dataclass(frozen=True)
class ExposureInputs:
    """What one exposure hands the feature code, from the pipeline or the
    simulator: time, telemetry, the patch (e-/s per pixel), the matched clean
    stars (arrays of shape (n,); ``x``, ``y`` -1..1 from the quadrant centre),
    and the target offset (NaN when unknown)."""

    expid: int
    night: str
    domain: int
    mjd: float
    band: str
    airmass: float
    out_temp_c: float
    out_rhum_pct: float
    wind_mps: float
    image_e_s: np.ndarray
    mag_ref: np.ndarray
    colour: np.ndarray
    x: np.ndarray
    y: np.ndarray
    mag_inst: np.ndarray
    mag_inst_err: np.ndarray
    zp_nominal_mag: float
    target_mag: float


def _star_columns(e: ExposureInputs) -> tuple[np.ndarray, ...]:
    """The usable stars' offset, error, x and y."""
    ref, inst, err = (
        np.asarray(a, dtype=np.float64) for a in (e.mag_ref, e.mag_inst, e.mag_inst_err)
    )
    ok = _usable(ref, inst, err)
    x, y = (np.asarray(a, dtype=np.float64)[ok] for a in (e.x, e.y))
    return ref[ok] - inst[ok] - e.zp_nominal_mag, err[ok], x, y


def _log_sky(image_e_s: np.ndarray) -> float:
    finite = np.asarray(image_e_s, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(np.log10(max(float(np.median(finite)), 1e-3))) if finite.size else float("nan")


def build_features(
    exposures: list[ExposureInputs],
    *,
    patch_px: int,
    max_stars: int = MAX_STARS,
    median: bool = False,
) -> FeatureSet:
    """The feature set of many exposures (one code path for every source);
    the stars' zero points are measured night by night (the median too with
    ``median``)."""
    if not exposures:
        raise ValueError("build_features: no exposures")
    stars, counts = [], []
    for e in exposures:
        tensor, n = star_tensor(
            e.mag_ref, e.colour, e.x, e.y, e.mag_inst, e.mag_inst_err,
            zp_nominal_mag=e.zp_nominal_mag, max_stars=max_stars,
        )  # fmt: skip
        stars.append(tensor)
        counts.append(n)
    nights = np.array([f"{e.domain}/{e.night}" for e in exposures])
    zps = {f.name: np.full(len(exposures), np.nan) for f in fields(StarZeroPoints)}
    for night in np.unique(nights):
        rows = np.nonzero(nights == night)[0]
        columns = [_star_columns(exposures[k]) for k in rows]
        found = star_zero_points(*(list(c) for c in zip(*columns, strict=True)), median=median)
        for name in zps:
            zps[name][rows] = getattr(found, name)
    n = len(exposures)
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
        catalog_zp_mag=zps["classical"],
        catalog_zp_err_mag=zps["classical_err"],
        median_zp_mag=zps["median"],
        plane_zp_mag=zps["plane"],
        plane_zp_err_mag=zps["plane_err"],
        sparse_zp_mag=zps["sparse"],
        sparse_zp_err_mag=zps["sparse_err"],
        log_sky=np.array([_log_sky(e.image_e_s) for e in exposures]),
        mjd=np.array([e.mjd for e in exposures], dtype=np.float64),
        clear_sky_mag=np.full(n, np.nan),
        context=np.zeros((n, CONTEXT_LENGTH, len(CONTEXT_CHANNELS)), dtype=np.float32),
        target_mag=np.array([e.target_mag for e in exposures], dtype=np.float64),
        domain=np.array([e.domain for e in exposures], dtype=np.int64),
        night=np.array([e.night for e in exposures]),
        expid=np.array([e.expid for e in exposures], dtype=np.int64),
    )
