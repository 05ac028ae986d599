"""Zero-point network tasks: features per night, training, scoring
(docs/zp_network.md)."""

from __future__ import annotations

import numpy as np

from ml.zp_features import (
    MAX_STARS,
    FeatureSet,
    catalog_zero_point,
    patch_image,
    star_tensor,
    telemetry_vector,
)
from sim.zpsim import ZPExposure


def features_from_simulation(
    exposures: list[ZPExposure], *, patch_px: int, max_stars: int = MAX_STARS
) -> FeatureSet:
    """The simulator's feature mode through the pipeline's feature code; the
    target is the true offset, nights are labelled by domain and date."""
    if not exposures:
        raise ValueError("features_from_simulation: no exposures")
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
        target_mag=np.array([e.offset_mag for e in exposures]),
        domain=np.array([e.domain for e in exposures], dtype=np.int64),
        night=np.array([f"{e.domain}:{e.night}" for e in exposures]),
        expid=np.array([e.expid for e in exposures], dtype=np.int64),
    )
