"""The names of the store's groups (BRIEF §4, docs/store.md): the one place they
are spelled. Stages, flows and the QA report build every group path here, so a
layout change is one edit and a typo is an AttributeError, not a missing group.

Constants name the parents (what :func:`tasks.io.store.list_groups` and
``list_children`` take); functions name one group.
"""

from __future__ import annotations

INDEX = "index"
"""Parent of ``index/<night>``: one row per raw file of the night."""
BIAS = "masters/bias"
"""Parent of ``masters/bias/<period>``."""
NIGHTS = "nights"
"""Parent of ``nights/<night>/...`` (itself a plain parent, never marked complete)."""
UBERCAL = "ubercal"
"""Parent of ``ubercal/<band>``."""
FEATURES = "ml/features"
"""Parent of ``ml/features/<night>`` (zero-point network inputs)."""
SCORES = "ml/scores"
"""Parent of ``ml/scores/<night>`` (zero-point network predictions)."""
TRANSIENTS = "transients"
"""Parent of ``transients/<night>``."""
LIGHTCURVES = "lightcurves"
"""Parent of ``lightcurves/<name>`` (scene-modelling photometry of a transient)."""
LIGHTCURVES_FORCED = "lightcurves_forced"
"""Parent of ``lightcurves_forced/<name>`` (forced photometry on difference images)."""
FLATS = "masters/flat"
"""Parent of ``masters/flat/<band>`` (one child per band)."""

UNKNOWN_NIGHT = "unknown-night"
"""The night of raw files (``index/unknown-night``) and ingested rows
(``nights/unknown-night/rejected``) whose observing night cannot be read: never
a calendar night, so stages and the report's night list leave it out."""


def index(night: str) -> str:
    """``index/<night>``: the night's raw files, status and reasons."""
    return f"{INDEX}/{night}"


def bias(period: str) -> str:
    """``masters/bias/<period>``: master bias of a calibration period."""
    return f"{BIAS}/{period}"


def flats(band: str) -> str:
    """``masters/flat/<band>``: parent of the band's master flats."""
    return f"{FLATS}/{band}"


def flat(band: str, period: str) -> str:
    """``masters/flat/<band>/<period>``: master flat of a band and period."""
    return f"{flats(band)}/{period}"


def night(night: str) -> str:
    """``nights/<night>``: parent of a night's groups."""
    return f"{NIGHTS}/{night}"


def exposures(night_: str) -> str:
    """``nights/<night>/exposures``: per exposure, telemetry and classical zero points."""
    return f"{night(night_)}/exposures"


def catalog(night_: str) -> str:
    """``nights/<night>/catalog``: per observation photometry."""
    return f"{night(night_)}/catalog"


def patches(night_: str) -> str:
    """``nights/<night>/patches``: image patches for the zero-point network."""
    return f"{night(night_)}/patches"


def rejected(night_: str) -> str:
    """``nights/<night>/rejected``: rows of ingested photometry refused, with reasons."""
    return f"{night(night_)}/rejected"


def kept_reduced(night_: str) -> str:
    """``nights/<night>/reduced``: parent of the night's kept reduced exposures."""
    return f"{night(night_)}/reduced"


def reduced(night_: str, expid: int) -> str:
    """``nights/<night>/reduced/<expid>``: a reduced exposure (fluence, variance,
    mask, WCS), when kept."""
    return f"{kept_reduced(night_)}/{int(expid)}"


def ubercal(band: str) -> str:
    """``ubercal/<band>``: the global zero points and starflat of a band."""
    return f"{UBERCAL}/{band}"


def features(night_: str) -> str:
    """``ml/features/<night>``: the zero-point network's inputs for a night."""
    return f"{FEATURES}/{night_}"


def scores(night_: str) -> str:
    """``ml/scores/<night>``: the zero-point network's predictions for a night."""
    return f"{SCORES}/{night_}"


def transients(night_: str) -> str:
    """``transients/<night>``: localised transients of a night's image pairs."""
    return f"{TRANSIENTS}/{night_}"


def lightcurve(name: str) -> str:
    """``lightcurves/<name>``: per-epoch scene-modelling photometry of one object."""
    return f"{LIGHTCURVES}/{name}"


def lightcurve_forced(name: str) -> str:
    """``lightcurves_forced/<name>``: the same object's forced photometry on
    difference images, calibrated the same way."""
    return f"{LIGHTCURVES_FORCED}/{name}"
