"""The model sized to the data (``zp_mode='auto'``, ``cells='auto'``, the defaults)
against the fixed 10x10-cell exposure-quadrant model the stage used before, and
the hand-sized model issue 13 found by trial (per-exposure zero points, 4x4
cells), on a small independent camera at catalog level: 8 quadrants of 256x256
pixels, one field, 24 dithered exposures (+-10 % of the focal plane) over three
nights, 400 stars per quadrant down to m = 19.

For each model: the model the sizing rule chose, the zero points (with the
quadrant mean of the starflat, the gauge both models share) against the truth,
their scatter per quadrant across exposures, the bright (m < 16) star
magnitudes against the truth (global offset removed), the cells left at their
prior, chi2/dof. A few seconds.

Run: ``.venv/bin/python benchmarks/ubercal_sizing.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calib.ubercal import ObservationChunk, UbercalOptions, UbercalSolution, solve_ubercal
from sim.catalogsim import CatalogSurvey, CatalogSurveyConfig, simulate_catalog_survey

CAMERA = CatalogSurveyConfig(
    seed=5,
    ccd_cols=(0, 1),
    ccd_rows=(0,),
    quad_nx=256,
    quad_ny=256,
    n_fields_x=1,
    n_fields_y=1,
    visits_per_field=24,
    n_nights=3,
    dither_fraction=0.1,
    stars_per_quadrant=400.0,
    mag_range=(13.0, 19.0),
)
MODELS: dict[str, dict[str, Any]] = {
    "sized to the data (default)": {},
    "exposure-quadrant zp, 10x10 cells (before)": {
        "zp_mode": "exposure_quadrant",
        "cells": (10, 10),
    },
    "exposure zp, 4x4 cells (by hand)": {"zp_mode": "exposure", "cells": (4, 4)},
    "sized to the data, gradient off": {"exposure_gradient": False},
}
BRIGHT_MAG = 16.0


def figures(s: CatalogSurvey, sol: UbercalSolution) -> dict[str, float]:
    rows = np.searchsorted(s.exposures["expid"], sol.expids)
    q = sol.quadrants
    fit = sol.zp_mag
    if sol.starflat is not None:
        level = sol.starflat.dzp_mag[np.searchsorted(sol.starflat.quadrants, q)]
        fit = fit + level.mean(axis=(1, 2))[None]
    d = fit - (s.zp_true[rows][:, q] + s.starflat_true[q].mean(axis=(1, 2))[None])
    d -= np.nanmean(d)
    truth = dict(zip(s.stars["source_id"].tolist(), s.stars["mag"], strict=True))
    ok = ~sol.star_rejected & np.isfinite(sol.star_mag)
    true_mag = np.array([truth[i] for i in sol.source_ids[ok].tolist()])
    dm = (sol.star_mag[ok] - true_mag)[true_mag < BRIGHT_MAG]
    dm -= np.median(dm)
    sf = sol.starflat
    at_prior = (
        int(sf.prior_dominated.sum()) if sf is not None and sf.prior_dominated is not None else 0
    )
    return {
        "zp_rms_mmag": 1e3 * float(np.sqrt(np.nanmean(d**2))),
        "zp_scatter_per_quadrant_mmag": 1e3 * float(np.nanmean(np.nanstd(d, axis=0))),
        "bright_star_rms_mmag": 1e3 * float(np.sqrt(np.mean(dm**2))),
        "cells_at_prior": at_prior,
        "chi2_per_dof": sol.stats.chi2_per_dof,
    }


def main() -> None:
    s = simulate_catalog_survey(CAMERA)
    chunk = ObservationChunk.from_mapping(s.observations)
    print(
        f"{s.n_obs:,} observations, {len(s.exposures['expid'])} exposures, "
        f"{len(s.quadrants)} quadrants of {CAMERA.quad_nx}x{CAMERA.quad_ny}"
    )
    print(
        "| model | chosen | zp rms vs truth mmag | zp scatter per quadrant mmag "
        f"| m < {BRIGHT_MAG:g} stars vs truth mmag | cells at prior | chi2/dof |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, kw in MODELS.items():
        sol = solve_ubercal(
            chunk,
            quad_nx=CAMERA.quad_nx,
            quad_ny=CAMERA.quad_ny,
            reference=s.reference_stars(),
            options=UbercalOptions(**kw),
        )
        f = figures(s, sol)
        sz = sol.sizing
        chosen = (
            f"{sz.zp_mode}, {sz.cells[0]}x{sz.cells[1]}, gradient "
            f"{'on' if sz.gradient else 'off'} ({1e3 * sz.median_gradient_err:.1f} mmag)"
            if sz is not None
            else "-"
        )
        print(
            f"| {name} | {chosen} | {f['zp_rms_mmag']:.2f} | "
            f"{f['zp_scatter_per_quadrant_mmag']:.2f} | {f['bright_star_rms_mmag']:.2f} | "
            f"{f['cells_at_prior']} | {f['chi2_per_dof']:.3f} |"
        )


if __name__ == "__main__":
    main()
