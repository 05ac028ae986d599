"""Damaged raw files, as a real night sometimes holds: a transfer cut short, a
header written by a misconfigured sequencer, a stray non-FITS file, a frame type
the pipeline does not know, a readout with a wrong geometry.

Each is derived from a good simulated exposure and given its own EXPID, so the
pipeline must reject it for the stated reason while indexing the rest.
"""

from __future__ import annotations

from pathlib import Path

from astropy.io import fits

BAD_EXPID_BASE = 900_000_000


def write_bad_files(raw_root: Path, science: Path, bias: Path) -> dict[str, Path]:
    """Write one bad file of each kind next to the good ones.

    Parameters
    ----------
    raw_root : Path
        Root of the raw tree.
    science, bias : Path
        Good files to derive the damaged ones from (never modified).

    Returns
    -------
    dict
        Kind -> path: ``truncated``, ``missing_keyword``, ``not_fits``,
        ``unknown_imagetyp``, ``bad_section``.
    """
    out_dir = raw_root / "damaged"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        k: out_dir / f"bad_{k}.fits"
        for k in ("truncated", "missing_keyword", "not_fits", "unknown_imagetyp", "bad_section")
    }

    with fits.open(science) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    hdul[0].header["EXPID"] = BAD_EXPID_BASE + 1
    hdul.writeto(paths["truncated"], overwrite=True)
    data = paths["truncated"].read_bytes()
    paths["truncated"].write_bytes(data[: len(data) - 5 * 2880 - 123])

    with fits.open(bias) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    hdul[0].header["EXPID"] = BAD_EXPID_BASE + 2
    del hdul[0].header["MJD-OBS"]
    hdul.writeto(paths["missing_keyword"], overwrite=True)

    paths["not_fits"].write_text("SIMPLE = this is a log file someone saved with a .fits name\n")

    with fits.open(bias) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    hdul[0].header["EXPID"] = BAD_EXPID_BASE + 3
    hdul[0].header["IMAGETYP"] = "FOCUS"
    hdul.writeto(paths["unknown_imagetyp"], overwrite=True)

    with fits.open(bias) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    hdul[0].header["EXPID"] = BAD_EXPID_BASE + 4
    nx = hdul[1].header["NAXIS1"]
    hdul[1].header["DATASEC"] = f"[1:{nx + 40},1:{hdul[1].header['NAXIS2']}]"
    hdul.writeto(paths["bad_section"], overwrite=True)
    return paths
