"""The observing night of an exposure, from its time and the site longitude."""

from __future__ import annotations

import datetime as dt
import math

MJD_EPOCH = dt.date(1858, 11, 17)
PALOMAR_LONGITUDE_DEG = -116.8650


def observing_night(mjd: float, longitude_deg: float = PALOMAR_LONGITUDE_DEG) -> str:
    """Night label ``YYYY-MM-DD``: the local date of the evening the night began.

    A night runs from local noon to the next local noon in local mean solar time
    (UTC + longitude / 15 h), so afternoon calibrations and the science that
    follows after midnight share the evening's date. File names and folders are
    never used.

    Parameters
    ----------
    mjd : float
        UTC modified Julian date (``MJD-OBS``).
    longitude_deg : float
        East-positive site longitude in degrees.
    """
    if not math.isfinite(mjd):
        raise ValueError(f"mjd must be finite, got {mjd}")
    if not -180.0 <= longitude_deg <= 360.0:
        raise ValueError(f"longitude_deg must be in [-180, 360], got {longitude_deg}")
    # 210 E and -150 are the same site and must give the same night.
    wrapped = (longitude_deg + 180.0) % 360.0 - 180.0
    local_noon_based = mjd + wrapped / 360.0 - 0.5
    return (MJD_EPOCH + dt.timedelta(days=math.floor(local_noon_based))).isoformat()
