"""The instrument's clear-sky zero point: what an exposure's zero-point offset
would be without clouds, from its band, airmass and telemetry
(docs/zp_network.md).

In clear weather the offset is extinction ``-k_b X`` plus the telemetry-driven
losses, a smooth function of what the telescope records; clouds only ever take
light away. A photometric night's extinction fit, done on every clear night of
an instrument at once, gives that function: a least-squares fit of the
exposures' classical zero points (never the truth: every instrument can fit its
own, including one no model has seen) on

    per band: 1, airmass;  telemetry: t, t^2, t^3, h, h^2, h^3, w, w^2

(``t``, ``h``, ``w`` the scaled temperature, humidity and wind of
ml/zp_features.telemetry_vector), with cloudy nights and clouded exposures
clipped away: a night whose exposures sit mostly below the fit is cloudy, an
exposure far below it is clouded, one far on either side is an outlier. The
scatter left beyond the zero points' own errors is the model's error.

Each instrument (``FeatureSet.domain``) gets its own fit; one pooled over
several instruments stands in for an instrument without one (what a model
trained elsewhere brings to a new telescope before it adapts). An instrument's
own fit starts from the pooled one: it fits the difference, the band
intercepts freely and the rest shrunk towards zero by as much as
``prior_exposures`` exposures would say, so a few nights move the intercepts
and many move everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calib.zeropoint import extra_scatter
from ml.zp_features import BANDS, TELEMETRY_CHANNELS, FeatureSet

CLEAR_SKY_TERMS = (
    *BANDS,
    *(f"{b}*airmass" for b in BANDS),
    "t", "t^2", "t^3", "h", "h^2", "h^3", "w", "w^2",
)  # fmt: skip
_N_PER_BAND = 2 * len(BANDS)


def clear_sky_design(telemetry: np.ndarray) -> np.ndarray:
    """The fit's design matrix, shape (n, 14), columns :data:`CLEAR_SKY_TERMS`,
    from telemetry vectors (n, 7) (ml/zp_features.telemetry_vector)."""
    tel = np.asarray(telemetry, dtype=np.float64)
    if tel.ndim != 2 or tel.shape[1] != len(TELEMETRY_CHANNELS):
        raise ValueError(
            f"telemetry must have shape (n, {len(TELEMETRY_CHANNELS)}), got {tel.shape}"
        )
    x, t, h, w = (tel[:, TELEMETRY_CHANNELS.index(c)] for c in TELEMETRY_CHANNELS[:4])
    onehot = tel[:, 4 : 4 + len(BANDS)]
    return np.column_stack([onehot, onehot * x[:, None], t, t**2, t**3, h, h**2, h**3, w, w**2])


@dataclass(frozen=True)
class ClearSkyModel:
    """One instrument's clear-sky offset.

    Attributes
    ----------
    coef : ndarray, shape (14,), mag
        Coefficients of :data:`CLEAR_SKY_TERMS`.
    scatter_mag : float, mag
        Scatter of clear exposures about the model beyond their own errors.
    n_exposures, n_nights : int
        Clear exposures and nights the fit kept.
    """

    coef: np.ndarray
    scatter_mag: float
    n_exposures: int
    n_nights: int

    def evaluate(self, telemetry: np.ndarray) -> np.ndarray:
        """Clear-sky offsets [mag], shape (n,)."""
        return clear_sky_design(telemetry) @ self.coef

    def to_dict(self) -> dict[str, Any]:
        return {
            "coef": [float(c) for c in self.coef],
            "terms": list(CLEAR_SKY_TERMS),
            "scatter_mag": self.scatter_mag,
            "n_exposures": self.n_exposures,
            "n_nights": self.n_nights,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClearSkyModel:
        if list(d.get("terms", CLEAR_SKY_TERMS)) != list(CLEAR_SKY_TERMS):
            raise ValueError(f"clear-sky model terms {d.get('terms')} are not {CLEAR_SKY_TERMS}")
        return cls(np.array(d["coef"], dtype=np.float64), float(d["scatter_mag"]),
                   int(d["n_exposures"]), int(d["n_nights"]))  # fmt: skip


def fit_clear_sky(
    telemetry: np.ndarray,
    zp_mag: np.ndarray,
    zp_err_mag: np.ndarray,
    night: np.ndarray,
    *,
    clip_low: float = 2.5,
    clip_high: float = 4.0,
    cloudy_night: float = -1.0,
    ridge: float = 1e-3,
    maxiters: int = 15,
    prior: ClearSkyModel | None = None,
    prior_exposures: float = 30.0,
) -> ClearSkyModel:
    """Fit the clear-sky offset of one instrument to its exposures' classical
    zero points.

    Parameters
    ----------
    telemetry : ndarray, shape (n, 7)
    zp_mag, zp_err_mag : ndarray, shape (n,), mag
        Classical zero-point offsets and errors (NaN where there is none).
    night : ndarray, shape (n,)
    clip_low, clip_high : float
        An exposure more than ``clip_low`` sigma below the fit (clouds) or
        ``clip_high`` above it is left out.
    cloudy_night : float
        A night whose median residual in sigma is below this is left out.
    ridge : float
        Shrinks the telemetry terms (relative to the summed weights), which
        keeps a fit on a few nights tame.
    maxiters : int
    prior : ClearSkyModel, optional
        Fit the difference from this model (e.g. the pooled one), all but the
        band intercepts shrunk towards 0 with the weight of ``prior_exposures``
        typical exposures.
    """
    design = clear_sky_design(telemetry)
    y = np.asarray(zp_mag, dtype=np.float64)
    err = np.asarray(zp_err_mag, dtype=np.float64)
    night = np.asarray(night)
    if not (len(y) == len(err) == len(night) == len(design)):
        raise ValueError("fit_clear_sky: telemetry, zp_mag, zp_err_mag and night differ in length")
    ok = np.isfinite(y) & np.isfinite(err) & (err > 0)
    need = design.shape[1] if prior is None else 2
    if ok.sum() < need:
        raise ValueError(
            f"fit_clear_sky: {int(ok.sum())} exposures with a zero point; need >= {need}"
        )
    nights, night_index = np.unique(night, return_inverse=True)
    start = np.zeros(design.shape[1]) if prior is None else prior.coef
    keep, extra2 = ok.copy(), 0.005**2
    coef = start
    for _ in range(maxiters):
        w = 1.0 / (err[keep] ** 2 + extra2)
        shrink = ridge * w.sum() if prior is None else prior_exposures * float(np.median(w))
        coef = start + _solve(design[keep], y[keep] - design[keep] @ start, w, shrink)
        resid = np.where(ok, y - design @ coef, np.nan)
        sigma = np.sqrt(err**2 + extra2)
        pull = resid / sigma
        median_pull = np.array(
            [np.nanmedian(pull[(night_index == k) & ok]) if ((night_index == k) & ok).any()
             else np.nan for k in range(len(nights))]
        )  # fmt: skip
        clear_night = ~(median_pull < cloudy_night)
        new = ok & clear_night[night_index] & (pull > -clip_low) & (pull < clip_high)
        if new.sum() < need:
            break
        extra2 = extra_scatter(resid[new], err[new] ** 2) ** 2
        if np.array_equal(new, keep):
            break
        keep = new
    return ClearSkyModel(
        coef=coef,
        scatter_mag=float(np.sqrt(extra2)),
        n_exposures=int(keep.sum()),
        n_nights=len(np.unique(night[keep])),
    )


def _solve(design: np.ndarray, y: np.ndarray, w: np.ndarray, shrink: float) -> np.ndarray:
    """Weighted least squares, every term but the band intercepts shrunk by
    ``shrink`` (a band with no exposures gets 0 through a tiny ridge)."""
    normal = design.T @ (design * w[:, None])
    penalty = np.full(design.shape[1], shrink)
    penalty[: len(BANDS)] = 1e-6 * w.sum()
    normal += np.diag(penalty)
    return np.linalg.solve(normal, design.T @ (w * y))


@dataclass(frozen=True)
class ClearSkyModels:
    """Clear-sky models by instrument (domain index), and the pooled one that
    stands in for an instrument without its own."""

    by_domain: dict[int, ClearSkyModel] = field(default_factory=dict)
    pooled: ClearSkyModel | None = None

    def evaluate(self, features: FeatureSet) -> np.ndarray:
        """Clear-sky offsets of the exposures [mag], shape (n,); NaN for an
        instrument with no model when there is no pooled one either."""
        out = np.full(len(features), np.nan)
        for d in np.unique(features.domain):
            rows = features.domain == d
            model = self.by_domain.get(int(d), self.pooled)
            if model is not None:
                out[rows] = model.evaluate(features.telemetry[rows])
        return out

    def adapted(self, domain: int, model: ClearSkyModel) -> ClearSkyModels:
        """These models plus (or with a new) ``domain``'s own."""
        return ClearSkyModels({**self.by_domain, int(domain): model}, self.pooled)

    def to_dict(self) -> dict[str, Any]:
        return {
            "by_domain": {str(d): m.to_dict() for d, m in sorted(self.by_domain.items())},
            "pooled": None if self.pooled is None else self.pooled.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClearSkyModels:
        pooled = d.get("pooled")
        return cls(
            {int(k): ClearSkyModel.from_dict(v) for k, v in d.get("by_domain", {}).items()},
            None if pooled is None else ClearSkyModel.from_dict(pooled),
        )


def fit_clear_sky_of(features: FeatureSet, *, prior: ClearSkyModel | None = None) -> ClearSkyModel:
    """:func:`fit_clear_sky` on a feature set's classical zero points (its
    nights are kept apart by domain)."""
    nights = np.char.add(features.domain.astype(str), np.char.add("/", features.night.astype(str)))
    return fit_clear_sky(
        features.telemetry, features.catalog_zp_mag, features.catalog_zp_err_mag, nights,
        prior=prior,
    )  # fmt: skip


def fit_clear_sky_models(features: FeatureSet) -> ClearSkyModels:
    """The pooled clear-sky model of all of ``features`` and, starting from
    it, one per domain (from the classical zero points: no targets). A domain
    with fewer than 2 classical zero points keeps the pooled model."""
    pooled = fit_clear_sky_of(features)
    answered = np.isfinite(features.catalog_zp_mag) & (features.catalog_zp_err_mag > 0)
    by_domain = {
        int(d): fit_clear_sky_of(features.select(features.domain == d), prior=pooled)
        for d in np.unique(features.domain)
        if (answered & (features.domain == d)).sum() >= 2
    }
    return ClearSkyModels(by_domain, pooled)
