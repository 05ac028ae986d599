"""Baselines for the zero-point network, on the same features and splits, and
the metrics of seed 000's table.

- classical: the inverse-variance weighted, clipped mean zero point of the
  exposure's stars (``FeatureSet.catalog_zp_mag``, calib.zeropoint's weighted
  estimator via ml/zp_features.star_zero_points), the honest baseline: what a
  pipeline does without a model (the sigma-clipped median, issue 7's classical,
  is ``median_zp_mag``);
- LUT: linear regression on the telemetry (airmass, weather, band);
- random forests: on the telemetry and image-patch statistics; given the
  classical zero point too (the paper's RF is "multivariate" over both); and
  given every input AZP-RC has, tabulated (plane fit, clear-sky offset, night
  context), the strongest peer a network has to beat. Given a zero point, a
  forest learns the correction to it (trees cannot reproduce a continuous
  offset to the millimagnitude);
- the image-only CNN is AZP-RC with every other branch off (ml/zp_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats
from sklearn.ensemble import RandomForestRegressor

from ml.zp_features import FeatureSet, summary_tensor
from ml.zp_train import discordant_pair_rate

ForestInputs = Literal["telemetry_image", "classical", "all"]

FAILURE_MAG = 0.05
"""A prediction fails when it is off by more than this, or missing (seed 000)."""


def patch_statistics(patch: np.ndarray) -> np.ndarray:
    """Per-exposure image statistics (mean, std, median, 10th and 99th
    percentile of the asinh-scaled patch): shape (n, 5)."""
    flat = patch.reshape(len(patch), -1).astype(np.float64)
    pct = np.percentile(flat, [10, 50, 99], axis=1).T
    return np.column_stack([flat.mean(1), flat.std(1), pct])


def _tabular(features: FeatureSet, inputs: ForestInputs) -> np.ndarray:
    cols = [
        features.telemetry,
        patch_statistics(features.patch),
        np.log1p(features.n_stars)[:, None],
    ]
    summary = summary_tensor(features)
    if inputs == "classical":
        cols.append(summary[:, :3])
    elif inputs == "all":
        cols += [summary, features.context.reshape(len(features), -1)]
    return np.column_stack(cols).astype(np.float64)


def _reference(features: FeatureSet, inputs: ForestInputs) -> np.ndarray:
    """What a forest corrects: the classical zero point where it has one (and
    the clear-sky offset otherwise, given all inputs); 0 without."""
    ref = np.zeros(len(features))
    if inputs == "all":
        ref = np.where(np.isfinite(features.clear_sky_mag), features.clear_sky_mag, ref)
    if inputs != "telemetry_image":
        ref = np.where(np.isfinite(features.catalog_zp_mag), features.catalog_zp_mag, ref)
    return ref


@dataclass
class LUTBaseline:
    """Least-squares linear model of the offset on the telemetry vector."""

    coef: np.ndarray | None = None
    sigma: float = float("nan")

    def fit(self, features: FeatureSet) -> LUTBaseline:
        ok = np.isfinite(features.target_mag)
        X = np.column_stack([features.telemetry[ok], np.ones(ok.sum())]).astype(np.float64)
        self.coef, *_ = np.linalg.lstsq(X, features.target_mag[ok], rcond=None)
        self.sigma = float(np.std(X @ self.coef - features.target_mag[ok], ddof=X.shape[1]))
        return self

    def predict(self, features: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
        if self.coef is None:
            raise RuntimeError("LUTBaseline.predict before fit")
        X = np.column_stack([features.telemetry, np.ones(len(features))]).astype(np.float64)
        return X @ self.coef, np.full(len(features), self.sigma)


@dataclass
class ForestBaseline:
    """Random forest on telemetry and patch statistics, plus the classical zero
    point (``inputs='classical'``) or everything AZP-RC reads (``'all'``; the
    features need their context attached); the uncertainty is the spread of
    the trees."""

    inputs: ForestInputs = "telemetry_image"
    seed: int = 0
    n_estimators: int = 200
    forest: RandomForestRegressor | None = None

    def fit(self, features: FeatureSet) -> ForestBaseline:
        ok = np.isfinite(features.target_mag)
        train = features.select(ok)
        self.forest = RandomForestRegressor(
            n_estimators=self.n_estimators, min_samples_leaf=3, random_state=self.seed, n_jobs=1
        )
        self.forest.fit(
            _tabular(train, self.inputs), train.target_mag - _reference(train, self.inputs)
        )
        return self

    def predict(self, features: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
        if self.forest is None:
            raise RuntimeError("ForestBaseline.predict before fit")
        X = _tabular(features, self.inputs)
        per_tree = np.stack([t.predict(X) for t in self.forest.estimators_])
        return per_tree.mean(0) + _reference(features, self.inputs), per_tree.std(0)


def regression_metrics(
    pred: np.ndarray, sigma: np.ndarray, truth: np.ndarray, *, half95: np.ndarray | None = None
) -> dict[str, float]:
    """Seed 000's table for one method, plus interval coverage: the 68 %
    interval is ``pred +- sigma``, the 95 % one ``pred +- half95`` (a
    calibrated model's; ``1.96 sigma`` for a Gaussian error by default).

    Missing predictions (NaN) count as failures and are left out of RMSE, MAE,
    r and coverage; ``valid`` says how many there were.
    """
    pred, sigma, truth = (np.asarray(a, dtype=np.float64) for a in (pred, sigma, truth))
    half = 1.959964 * sigma if half95 is None else np.asarray(half95, dtype=np.float64)
    ok = np.isfinite(pred) & np.isfinite(truth)
    err = pred[ok] - truth[ok]
    with_sigma = ok & np.isfinite(sigma) & (sigma > 0)
    abs_err = np.abs(pred[with_sigma] - truth[with_sigma])
    z = abs_err / sigma[with_sigma]
    n = int(np.isfinite(truth).sum())
    return {
        "n": n,
        "valid": float(ok.sum() / n) if n else float("nan"),
        "rmse": float(np.sqrt(np.mean(err**2))) if ok.any() else float("nan"),
        "mae": float(np.mean(np.abs(err))) if ok.any() else float("nan"),
        "r": float(stats.pearsonr(pred[ok], truth[ok])[0]) if ok.sum() > 2 else float("nan"),
        "failure": float((np.sum(np.abs(err) > FAILURE_MAG) + (n - ok.sum())) / n)
        if n
        else float("nan"),
        "coverage68": float(np.mean(z < 1.0)) if len(z) else float("nan"),
        "coverage95": float(np.mean(abs_err < half[with_sigma])) if len(z) else float("nan"),
        "discordant": discordant_pair_rate(pred[ok], truth[ok]) if ok.sum() > 1 else float("nan"),
    }
