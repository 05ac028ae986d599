"""Stage outputs against the simulator's truth store, as pulls: shared by the
end-to-end tests (tests/integration)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from tasks.io.store import list_groups, read_group


def _truth(truth_store, group: str) -> xr.Dataset:
    return xr.open_zarr(truth_store, group=group, consolidated=False).load()


def _gauge_removed(d: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Differences from the truth less their inverse-variance weighted mean
    (the gauge: ubercal's zero points are relative to an anchored level)."""
    ok = np.isfinite(d) & np.isfinite(err)
    w = 1.0 / err[ok] ** 2
    return d - np.sum(w * d[ok]) / np.sum(w)


def ubercal_pulls(store, truth_store, band: str) -> np.ndarray:
    """(zp - truth) / zp_err of ``ubercal/<band>``, the gauge offset removed.

    Per exposure and quadrant (``zp_mode='exposure_quadrant'``) the truth
    carries each quadrant's mean true starflat (the gauge puts it in the zero
    points); per exposure (``'exposure'``: the zero point repeats along
    quadrants, the starflat's gauge is the focal plane) the truth is the mean
    over quadrants, and each exposure counts once."""
    sol = read_group(store, f"ubercal/{band}")
    zp = _truth(truth_store, "zp").zp.sel(expid=sol.expid, quadrant=sol.quadrant).values
    starflat = _truth(truth_store, f"maps/starflat/{band}").starflat
    truth = zp + starflat.sel(quadrant=sol.quadrant).mean(("y", "x")).values[None]
    value, err = sol.zp.values, sol.zp_err.values
    if sol.attrs["options"]["zp_mode"] == "exposure":
        value, err, truth = value[:, 0], err[:, 0], truth.mean(axis=1)
    d = _gauge_removed(value - truth, err)
    return (d / err).ravel()


def score_pulls(store, truth_store) -> np.ndarray:
    """The network's scored zero points (``ml/scores/<night>``) against the
    truth: per exposure the mean over quadrants of the true zero point (the
    network predicts one per exposure), in units of its own uncertainty."""
    zp = _truth(truth_store, "zp").zp
    pulls = []
    for night in list_groups(store, "ml/scores"):
        s = read_group(store, f"ml/scores/{night}")
        truth = zp.sel(expid=s.expid.values).mean("quadrant").values
        pulls.append((s.zp.values - truth) / s.zp_offset_err.values)
    return np.concatenate(pulls)
