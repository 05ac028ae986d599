"""Reduce and photometer one ZTF-size quadrant (3072 x 3080 px, ~10,000 stars)
and time each step; the aperture step is timed next to its peer, sep.sum_circle,
on the same image and apertures.

    .venv/bin/python benchmarks/photometry.py [--quadrant 20] [--seed 0] [--repeat 3]

The quadrant is rendered by the simulator's own renderer (the `ztf` preset), not
the whole 64-quadrant exposure; every simulated star with its centre on the
quadrant is photometered (the reference catalog holds the r < 21 half); the
masters are the simulator's true bias and
flat of that quadrant (the flat normalised on the quadrant: the normalisation
does not change the timings). Prints per-step wall times, the ratio to sep, and
the projection to a 64-quadrant exposure.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from calib.photometry import aperture_sums, catalog_positions, photometer_quadrant
from calib.pixel_area import pixel_area_map
from calib.reduce import reduce_quadrant, to_fluence
from sim.config import make_config
from sim.survey import Survey


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def render_quadrant(quadrant: int, seed: int) -> dict[str, Any]:
    """One science quadrant of the ztf preset, with its masters, WCS and refcat."""
    survey = Survey(make_config("ztf", seed=seed))
    exposure = next(e for e in survey.exposures if e.imagetyp == "SCIENCE")
    stars = survey.stars_on(exposure)[quadrant]
    raw, _ = survey.renderer.science(
        quadrant, exposure, stars, cosmics_per_mpix=survey.config.camera.cosmics_per_mpix
    )
    g = survey.camera.by_id[quadrant]
    header = fits.Header()
    for key, value, comment in survey.camera.wcs_cards(
        quadrant, exposure.tel_ra_deg, exposure.tel_dec_deg
    ):
        header[key] = (value, comment)
    header["NAXIS"], header["NAXIS1"], header["NAXIS2"] = 2, raw.shape[1], raw.shape[0]
    wcs = WCS(header).slice((slice(0, g.ny), g.data_slice))
    inst = survey.instrument
    flat = inst.flat_response(quadrant, exposure.band)
    elec = inst.electronics(quadrant)
    cat = survey.catalog
    return {
        "data": raw[:, g.data_slice].astype(np.float32),
        "overscan": raw[:, g.overscan_slice].astype(np.float32),
        "bias": inst.bias_pattern(quadrant, exposure.night_index).astype(np.float32),
        "flat": (flat / flat.mean()).astype(np.float32),
        "defects": inst.defects(quadrant),
        "gain": elec.gain_e_per_adu,
        "read_noise_e": elec.read_noise_e,
        "saturate_adu": elec.saturate_adu,
        "wcs": wcs,
        # Every simulated star is forced (13 < r < 22), not only the catalog's
        # r < 21 half: the issue's ~10,000 stars per quadrant.
        "ra": cat.ra_deg,
        "dec": cat.dec_deg,
        "ref_mag": cat.ref_mag_obs[exposure.band],
        "n_rendered": len(stars.x),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quadrant", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="best of N for each step")
    args = parser.parse_args()
    import sep

    t0 = time.perf_counter()
    q = render_quadrant(args.quadrant, args.seed)
    print(f"rendered quadrant {args.quadrant}: {q['data'].shape}, {q['n_rendered']} stars "
          f"with light on it, in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    shape = q["data"].shape
    t_area, area = _best(lambda: pixel_area_map(q["wcs"], shape), args.repeat)
    t_reduce, reduced = _best(
        lambda: reduce_quadrant(
            q["data"], q["overscan"], bias_adu=q["bias"], flat=q["flat"], gain=q["gain"],
            read_noise_e=q["read_noise_e"], saturate_adu=q["saturate_adu"], pixel_area=area,
            defects=q["defects"],
        ),
        args.repeat,
    )  # fmt: skip
    t_pos, (rows, x, y) = _best(
        lambda: catalog_positions(q["wcs"], q["ra"], q["dec"], shape), args.repeat
    )
    ref_mag = q["ref_mag"][rows]
    t_phot, phot = _best(lambda: photometer_quadrant(reduced, x, y, ref_mag), args.repeat)

    # The aperture step alone, ours and sep's, on the same fluence image and apertures.
    fluence, variance = to_fluence(reduced.surface_brightness, reduced.pixel_area, reduced.variance)
    img = np.ascontiguousarray(fluence, dtype=np.float64)
    var = np.ascontiguousarray(variance, dtype=np.float64)
    px, py, r = phot.x, phot.y, phot.aperture_radius_px
    t_ours, (ours, _) = _best(lambda: aperture_sums(img, px, py, r, variance=var), args.repeat)
    t_sep, (theirs, _, _) = _best(
        lambda: sep.sum_circle(img, px, py, r, var=var, subpix=0), args.repeat
    )
    rel = np.max(np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1.0))

    per_quadrant = t_area + t_reduce + t_pos + t_phot
    per_quadrant_cached = t_reduce + t_pos + t_phot
    cores = os.cpu_count() or 1
    print(f"forced stars on the quadrant: {len(phot.index)}  (clean: "
          f"{int(np.sum(phot.flags == 0))}), FWHM {phot.fwhm_px:.2f} px, aperture r = "
          f"{r:.2f} px")  # fmt: skip
    ap = phot.aperture_correction
    print(f"aperture correction {ap.value:.4f} +- {ap.err:.4f} from {ap.n_stars} stars")
    print(f"{'step':<40}{'wall s':>10}")
    for name, t in (
        ("pixel-area map (once per quadrant)", t_area),
        ("reduce (overscan..flat, masks, CRs)", t_reduce),
        ("catalog -> pixel positions (SIP)", t_pos),
        ("photometer_quadrant (all of it)", t_phot),
        ("  aperture step, ours (photutils)", t_ours),
        ("  aperture step, sep.sum_circle", t_sep),
    ):
        print(f"{name:<40}{t:>10.3f}")
    print(f"aperture step: ours / sep = {t_ours / t_sep:.1f}x; max relative difference "
          f"{rel:.1e} over {len(px)} apertures")  # fmt: skip
    print(f"per quadrant: {per_quadrant:.2f} s ({per_quadrant_cached:.2f} s with the area "
          f"map cached); a 64-quadrant exposure: {64 * per_quadrant_cached:.0f} s on one core, "
          f"~{64 * per_quadrant_cached / cores:.0f} s on this machine's {cores} cores")  # fmt: skip


if __name__ == "__main__":
    main()
