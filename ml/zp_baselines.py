"""Baselines for the zero-point network, on the same features and splits, and
the metrics of seed 000's table.

- classical: the sigma-clipped median zero point of the exposure's stars
  (``FeatureSet.catalog_zp_mag``, made by ml/zp_features.catalog_zero_point from
  calib.zeropoint), the honest baseline: what a pipeline does without a model;
- LUT: linear regression on the telemetry (airmass, weather, band);
- random forest on the telemetry and image-patch statistics, and a second one
  that is also given the catalog's zero-point summary (the paper's RF is
  "multivariate" over both);
- the image-only CNN is AZP-RC with the catalog and telemetry branches off
  (ml/zp_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.ensemble import RandomForestRegressor

from ml.zp_features import FeatureSet, catalog_summary
from ml.zp_train import discordant_pair_rate

FAILURE_MAG = 0.05
"""A prediction fails when it is off by more than this, or missing (seed 000)."""


def patch_statistics(patch: np.ndarray) -> np.ndarray:
    """Per-exposure image statistics (mean, std, median, 10th and 99th
    percentile of the asinh-scaled patch): shape (n, 5)."""
    flat = patch.reshape(len(patch), -1).astype(np.float64)
    pct = np.percentile(flat, [10, 50, 99], axis=1).T
    return np.column_stack([flat.mean(1), flat.std(1), pct])


def _tabular(features: FeatureSet, *, with_catalog: bool) -> np.ndarray:
    cols = [
        features.telemetry,
        patch_statistics(features.patch),
        np.log1p(features.n_stars)[:, None],
    ]
    if with_catalog:
        cols.append(catalog_summary(features.catalog_zp_mag, features.catalog_zp_err_mag))
    return np.column_stack(cols).astype(np.float64)


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
    """Random forest on telemetry and patch statistics (plus the classical
    zero point of the stars with ``with_catalog``); the uncertainty is the
    spread of the trees."""

    with_catalog: bool = False
    seed: int = 0
    n_estimators: int = 200
    forest: RandomForestRegressor | None = None

    def fit(self, features: FeatureSet) -> ForestBaseline:
        ok = np.isfinite(features.target_mag)
        self.forest = RandomForestRegressor(
            n_estimators=self.n_estimators, min_samples_leaf=3, random_state=self.seed, n_jobs=1
        )
        self.forest.fit(
            _tabular(features.select(ok), with_catalog=self.with_catalog), features.target_mag[ok]
        )
        return self

    def predict(self, features: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
        if self.forest is None:
            raise RuntimeError("ForestBaseline.predict before fit")
        X = _tabular(features, with_catalog=self.with_catalog)
        per_tree = np.stack([t.predict(X) for t in self.forest.estimators_])
        return per_tree.mean(0), per_tree.std(0)


def regression_metrics(pred: np.ndarray, sigma: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Seed 000's table for one method, plus interval coverage.

    Missing predictions (NaN) count as failures and are left out of RMSE, MAE,
    r and coverage; ``valid`` says how many there were.
    """
    pred, sigma, truth = (np.asarray(a, dtype=np.float64) for a in (pred, sigma, truth))
    ok = np.isfinite(pred) & np.isfinite(truth)
    err = pred[ok] - truth[ok]
    with_sigma = ok & np.isfinite(sigma) & (sigma > 0)
    z = np.abs(pred[with_sigma] - truth[with_sigma]) / sigma[with_sigma]
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
        "coverage95": float(np.mean(z < 1.959964)) if len(z) else float("nan"),
        "discordant": discordant_pair_rate(pred[ok], truth[ok]) if ok.sum() > 1 else float("nan"),
    }
