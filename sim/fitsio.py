"""Write raw exposures and the reference catalog as a camera and a catalog
service would (docs/raw-fits.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time

from sim.camera import Camera
from sim.catalog import StarCatalog
from sim.config import BANDS, InstrumentConfig
from sim.instrument import Instrument
from sim.schedule import Exposure


def primary_header(exposure: Exposure, instrument: InstrumentConfig) -> fits.Header:
    e = exposure
    hdr = fits.Header()
    hdr["ORIGIN"] = ("photocal-sim", "simulated camera")
    hdr["INSTRUME"] = instrument.name
    hdr["IMAGETYP"] = e.imagetyp
    hdr["EXPID"] = (e.expid, "unique exposure id")
    hdr["MJD-OBS"] = (round(e.mjd, 8), "[d] UTC MJD at exposure start")
    hdr["DATE-OBS"] = Time(e.mjd, format="mjd", scale="utc").isot
    hdr["EXPTIME"] = (e.exptime_s, "[s]")
    if e.band is not None:
        hdr["FILTER"] = e.band
    if e.led_id is not None:
        hdr["LEDID"] = (e.led_id, "dome-flat LED")
    if e.imagetyp == "SCIENCE":
        hdr["AIRMASS"] = round(float(e.airmass), 5)
        hdr["TELRA"] = (round(float(e.tel_ra_deg), 7), "[deg]")
        hdr["TELDEC"] = (round(float(e.tel_dec_deg), 7), "[deg]")
        hdr["OUTTEMP"] = (round(float(e.out_temp_c), 2), "[deg C] outside temperature")
        hdr["OUTRHUM"] = (round(float(e.out_rhum_pct), 2), "[%] outside relative humidity")
        hdr["WINDSPD"] = (round(float(e.wind_mps), 2), "[m/s] wind speed")
    return hdr


def quadrant_hdu(
    raw: np.ndarray,
    quadrant: int,
    camera: Camera,
    instrument: Instrument,
    exposure: Exposure,
) -> fits.ImageHDU:
    g = camera.by_id[quadrant]
    elec = instrument.electronics(quadrant)
    hdu = fits.ImageHDU(data=raw, name=g.extname)
    hdr = hdu.header
    hdr["CCD_ID"] = g.ccd_id
    hdr["QID"] = g.qid
    hdr["GAIN"] = (round(elec.gain_e_per_adu, 5), "[e-/ADU]")
    hdr["RDNOISE"] = (round(elec.read_noise_e, 4), "[e-]")
    hdr["SATURATE"] = (elec.saturate_adu, "[ADU]")
    for key, value in g.sections().items():
        hdr[key] = value
    if exposure.imagetyp == "SCIENCE":
        for key, value, comment in camera.wcs_cards(
            quadrant, exposure.tel_ra_deg, exposure.tel_dec_deg
        ):
            hdr[key] = (value, comment)
    return hdu


def write_exposure(path: Path, primary: fits.Header, hdus: list[fits.ImageHDU]) -> None:
    """Write atomically: a crash never leaves a half-written raw file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    fits.HDUList([fits.PrimaryHDU(header=primary), *hdus]).writeto(tmp, overwrite=True)
    tmp.replace(path)


def write_refcat(path: Path, catalog: StarCatalog) -> int:
    """Write the reference catalog (FITS table); returns the number of rows."""
    sel = catalog.in_refcat
    cols: dict[str, np.ndarray] = {
        "source_id": catalog.source_id[sel],
        "ra": catalog.ra_deg[sel],
        "dec": catalog.dec_deg[sel],
    }
    for b in BANDS:
        cols[f"{b}_mag"] = catalog.ref_mag_obs[b][sel].astype(np.float32)
        cols[f"{b}_magerr"] = catalog.ref_magerr[b][sel].astype(np.float32)
    cols["bp_rp"] = catalog.bp_rp[sel].astype(np.float32)
    table = Table(cols)
    for name in ("ra", "dec"):
        table[name].unit = "deg"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.write(path, format="fits", overwrite=True)
    return int(sel.sum())
