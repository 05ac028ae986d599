"""What the QA report says, read from the store: per night the files, the
photometry, the masters used and their stability, the zero points of every
exposure (ubercal, classical, network), the ubercal fit of its band, transients
and light curves. Numbers and arrays only; nothing here draws or formats.

Each reader returns ``None`` (or an empty tuple) when the stage that writes its
groups did not run for the night, so a report says what is missing instead of
failing.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import xarray as xr

from tasks.io import groups
from tasks.io.store import group_exists, list_children, list_groups, read_group

T = TypeVar("T", xr.Dataset, xr.DataArray)

MAP_PX = 96
"""Longest side of a quadrant in the bias delta maps (pixels are sub-sampled):
enough to see column structure and amplifier glow, small enough for a page."""


@dataclass(frozen=True)
class FileCount:
    imagetyp: str
    status: str
    n: int


@dataclass(frozen=True)
class Files:
    """``index/<night>``: raw files by frame type and status, rejections with reasons."""

    counts: tuple[FileCount, ...]
    rejected: tuple[tuple[str, str], ...]
    """(path relative to the raw root, reason)."""
    raw_root: str

    @property
    def n_ok(self) -> int:
        return sum(c.n for c in self.counts if c.status == "ok")

    @property
    def n_rejected(self) -> int:
        return len(self.rejected)


@dataclass(frozen=True)
class BandPhotometry:
    band: str
    exposures: int
    observations: int
    clean: int
    """Observations with no flag set (the ones ubercal and the zero points use)."""


@dataclass(frozen=True)
class Photometry:
    """``nights/<night>/catalog``: counts per band."""

    bands: tuple[BandPhotometry, ...]

    @property
    def exposures(self) -> int:
        return sum(b.exposures for b in self.bands)

    @property
    def observations(self) -> int:
        return sum(b.observations for b in self.bands)

    @property
    def clean(self) -> int:
        return sum(b.clean for b in self.bands)


@dataclass(frozen=True)
class Master:
    """A master frame the night was (or would be) reduced with."""

    group: str
    kind: str
    """``'bias'`` or ``'flat'``."""
    band: str | None
    period: str
    summary: dict[str, Any]
    """The stage's summary attrs (stability numbers)."""
    reference_period: str | None = None
    delta_maps: dict[str, np.ndarray] = field(default_factory=dict)
    """Bias: master minus the reference period's, ADU, per quadrant name (sub-sampled)."""
    ratio_hist: dict[str, np.ndarray] = field(default_factory=dict)
    """Flat: this night's daily / master flat ratio histogram per LED, all quadrants."""
    ratio_edges: np.ndarray | None = None
    led_ratio: tuple[tuple[int, float, float, float], ...] = ()
    """Flat: per LED, this night's median ratio, its robust rms and outlier
    fraction, over quadrants (median)."""


@dataclass(frozen=True)
class PeriodTrend:
    """One calibration period of a master's stability trend."""

    period: str
    values: dict[str, float]


@dataclass(frozen=True)
class MasterTrends:
    """Stability numbers of every period in the store, by master."""

    bias: tuple[PeriodTrend, ...]
    flats: dict[str, tuple[PeriodTrend, ...]]


@dataclass(frozen=True)
class ExposureZeroPoints:
    """Zero points of the night's science exposures, mag (``m = m_inst + zp``),
    each the mean over the exposure's quadrants; NaN where a stage did not
    give one. All arrays have shape (n_exposures,), sorted by expid."""

    expid: np.ndarray
    band: np.ndarray
    mjd: np.ndarray
    airmass: np.ndarray
    ubercal: np.ndarray
    ubercal_err: np.ndarray
    classic: np.ndarray
    classic_err: np.ndarray
    network: np.ndarray
    network_err: np.ndarray

    @property
    def has_ubercal(self) -> bool:
        return bool(np.isfinite(self.ubercal).any())

    @property
    def has_network(self) -> bool:
        return bool(np.isfinite(self.network).any())


@dataclass(frozen=True)
class UbercalFit:
    """``ubercal/<band>``: the global fit whose nights include this one."""

    band: str
    nights: tuple[str, ...]
    stats: dict[str, Any]
    qa: dict[str, Any]
    star_mag: np.ndarray
    star_rms: np.ndarray
    """Per star with a finite rms: the rms of its residuals, mag."""
    bin_mag: np.ndarray
    bin_median_rms: np.ndarray
    bin_n_stars: np.ndarray
    plots: dict[str, bytes]
    """The stage's focal-plane maps (PNG): ``starflat_png``, ``residual_png``."""


@dataclass(frozen=True)
class NetworkCard:
    """The zero-point network that scored the night: its checkpoint and held-out metrics."""

    checkpoint: str
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Transients:
    """``transients/<night>``: detections on the night's reference/new pairs."""

    methods: tuple[str, ...]
    injected: int
    found: dict[str, int]
    false: dict[str, int]
    method: np.ndarray
    score: np.ndarray
    delta_mag: np.ndarray


@dataclass(frozen=True)
class LightCurve:
    """``lightcurves/<name>``: per epoch, calibrated scene-modelling photometry."""

    name: str
    expid: np.ndarray
    mjd: np.ndarray
    band: np.ndarray
    mag: np.ndarray
    mag_err: np.ndarray
    flux_njy: np.ndarray
    flux_njy_err: np.ndarray
    flags: np.ndarray
    in_night: np.ndarray
    """Epochs taken in the report's night (all False on the index page)."""
    forced_flux_njy: np.ndarray
    forced_flux_njy_err: np.ndarray
    """The same epochs by forced photometry on difference images
    (``lightcurves_forced/<name>``), NaN where it has none."""

    @property
    def measured(self) -> int:
        """Epochs with a scene-model flux."""
        return int(np.count_nonzero(np.isfinite(self.flux_njy)))

    @property
    def has_forced(self) -> bool:
        return bool(np.isfinite(self.forced_flux_njy).any())


@dataclass(frozen=True)
class NightQA:
    """Everything the report shows about one night."""

    night: str
    files: Files | None
    photometry: Photometry | None
    masters: tuple[Master, ...]
    zeropoints: ExposureZeroPoints | None
    ubercal: tuple[UbercalFit, ...]
    network: NetworkCard | None
    transients: Transients | None
    lightcurves: tuple[LightCurve, ...]


# -- the store's nights ------------------------------------------------------------


def report_nights(store: str | os.PathLike) -> list[str]:
    """Nights with an index or night groups, in order (files of unknown night excluded)."""
    found = set(list_groups(store, groups.INDEX)) | set(list_children(store, groups.NIGHTS))
    found.discard(groups.UNKNOWN_NIGHT)
    return sorted(found)


def night_files(store: str | os.PathLike, night: str) -> Files | None:
    """``index/<night>`` by frame type and status; None without an index."""
    if not group_exists(store, groups.index(night)):
        return None
    idx = read_group(store, groups.index(night))
    types = [str(t) or "unreadable" for t in idx.imagetyp.values]
    status = [str(s) for s in idx.status.values]
    counts = Counter(zip(types, status, strict=True))
    rejected = tuple(
        (str(p), str(r))
        for p, s, r in zip(idx.path.values, status, idx.reason.values, strict=True)
        if s == "rejected"
    )
    return Files(
        counts=tuple(FileCount(t, s, n) for (t, s), n in sorted(counts.items())),
        rejected=rejected,
        raw_root=str(idx.attrs.get("raw_root", "")),
    )


def night_photometry(store: str | os.PathLike, night: str) -> Photometry | None:
    """Exposures, observations and clean observations per band; None before photometry."""
    if not (group_exists(store, groups.catalog(night)) and _has_exposures(store, night)):
        return None
    exposures = read_group(store, groups.exposures(night))
    catalog = _load(read_group(store, groups.catalog(night), load=False)[["expid", "flags"]])
    band_of = dict(zip(exposures.expid.values.tolist(), exposures.band.values, strict=True))
    obs_band = np.array([str(band_of.get(int(e), "?")) for e in catalog.expid.values])
    clean = catalog.flags.values == 0
    exp_bands = np.array([str(b) for b in exposures.band.values])
    return Photometry(
        tuple(
            BandPhotometry(
                band=b,
                exposures=int(np.count_nonzero(exp_bands == b)),
                observations=int(np.count_nonzero(obs_band == b)),
                clean=int(np.count_nonzero(clean & (obs_band == b))),
            )
            for b in sorted(set(exp_bands))
        )
    )


def _has_exposures(store: str | os.PathLike, night: str) -> bool:
    return group_exists(store, groups.exposures(night))


# -- masters -------------------------------------------------------------------


def _period_of(periods: list[str], night: str) -> str | None:
    """The period containing ``night``: the latest that starts on or before it."""
    return max((p for p in periods if p <= night), default=None)


def night_bands(store: str | os.PathLike, night: str) -> list[str]:
    """Bands observed in the night: from its exposures, else its index."""
    if _has_exposures(store, night):
        return sorted({str(b) for b in read_group(store, groups.exposures(night)).band.values})
    if not group_exists(store, groups.index(night)):
        return []
    idx = read_group(store, groups.index(night))
    ok = idx.status.values == "ok"
    return sorted({str(b) for b in idx["filter"].values[ok] if str(b)})


def night_masters(store: str | os.PathLike, night: str) -> tuple[Master, ...]:
    """The master bias and flats of the night: those its exposures were reduced
    with, else the ones of the period containing it."""
    used: dict[str, set[str]] = {"bias": set(), "flat": set()}
    exposures = read_group(store, groups.exposures(night)) if _has_exposures(store, night) else None
    if exposures is not None and "bias_period" in exposures:
        # Ingested photometry names no masters ("").
        used["bias"] = {str(p) for p in exposures.bias_period.values if str(p)}
        used["flat"] = {
            f"{b}/{p}"
            for b, p in zip(exposures.band.values, exposures.flat_period.values, strict=True)
            if str(p)
        }
    else:
        period = _period_of(list_groups(store, groups.BIAS), night)
        used["bias"] = {period} if period else set()
        for band in night_bands(store, night):
            period = _period_of(list_groups(store, groups.flats(band)), night)
            if period:
                used["flat"].add(f"{band}/{period}")
    out = [_bias_master(store, p) for p in sorted(used["bias"])]
    out += [_flat_master(store, night, *bp.split("/")) for bp in sorted(used["flat"])]
    return tuple(m for m in out if m is not None)


def _bias_master(store: str | os.PathLike, period: str) -> Master | None:
    group = groups.bias(period)
    if not group_exists(store, group):
        return None
    ds = read_group(store, group, load=False)
    reference = ds.attrs.get("reference_period")
    maps: dict[str, np.ndarray] = {}
    if reference:
        names = ds.attrs.get("extnames") or [str(q) for q in ds.quadrant.values]
        step = max(1, int(np.ceil(max(ds.sizes["y"], ds.sizes["x"]) / MAP_PX)))
        # One quadrant at a time: a ZTF-sized master is GBs.
        for i, name in enumerate(names):
            maps[str(name)] = _load(ds.delta_ref.isel(quadrant=i)).values[::step, ::step]
    return Master(
        group=group,
        kind="bias",
        band=None,
        period=period,
        summary=dict(ds.attrs.get("summary", {})),
        reference_period=reference,
        delta_maps=maps,
    )


def _flat_master(store: str | os.PathLike, night: str, band: str, period: str) -> Master | None:
    group = groups.flat(band, period)
    if not group_exists(store, group):
        return None
    ds = read_group(store, group, load=False)
    hist: dict[str, np.ndarray] = {}
    led_ratio: list[tuple[int, float, float, float]] = []
    edges = None
    if "ratio_hist" in ds and night in [str(n) for n in ds.night.values]:
        small = ds[["ratio_hist", "ratio_median", "ratio_rms", "ratio_outlier_fraction"]]
        small = _load(small.sel(night=night))
        centres = small.ratio_bin.values
        width = float(centres[1] - centres[0]) if len(centres) > 1 else 1.0
        edges = np.append(centres - width / 2, centres[-1] + width / 2)
        for led in small.led.values:
            one = small.sel(led=led)
            hist[f"LED {int(led)}"] = one.ratio_hist.sum("quadrant").values
            led_ratio.append(
                (
                    int(led),
                    _nanmedian(one.ratio_median.values),
                    _nanmedian(one.ratio_rms.values),
                    _nanmedian(one.ratio_outlier_fraction.values),
                )
            )
    return Master(
        group=group,
        kind="flat",
        band=band,
        period=period,
        summary=dict(ds.attrs.get("summary", {})),
        ratio_hist=hist,
        ratio_edges=edges,
        led_ratio=tuple(led_ratio),
    )


def _load(obj: T) -> T:
    """Load a lazy selection in this thread: the report may run inside a task on
    a Dask worker, where the default scheduler would submit to the worker's own
    cluster and, with every thread busy, wait for itself."""
    return obj.compute(scheduler="synchronous")


def _nanmedian(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=float)
    return float(np.median(a[np.isfinite(a)])) if np.isfinite(a).any() else float("nan")


def master_trends(store: str | os.PathLike) -> MasterTrends:
    """Stability of every master period in the store (from the groups' summaries)."""
    bias = []
    for period in list_groups(store, groups.BIAS):
        s = read_group(store, groups.bias(period), load=False).attrs.get("summary", {})
        bias.append(
            PeriodTrend(
                period,
                {
                    # The reference period is, by definition, 0 from itself.
                    "mean_delta_adu": 0.0
                    if s.get("is_reference")
                    else _num(s.get("mean_delta_adu")),
                    "max_outlier_fraction": _num(s.get("max_outlier_fraction")),
                    "n_hot": _num(s.get("n_hot")),
                    "flagged_quadrants": float(len(s.get("flagged_quadrants") or [])),
                },
            )
        )
    flats: dict[str, tuple[PeriodTrend, ...]] = {}
    for band in list_children(store, groups.FLATS):
        rows = []
        for period in list_groups(store, groups.flats(band)):
            s = read_group(store, groups.flat(band, period), load=False).attrs.get("summary", {})
            rows.append(
                PeriodTrend(
                    period,
                    {
                        "ratio_rms_max": _num(s.get("ratio_rms_max")),
                        "ratio_outlier_fraction_max": _num(s.get("ratio_outlier_fraction_max")),
                        "n_dead": _num(s.get("n_dead")),
                        "n_defects": _num(s.get("n_defects")),
                    },
                )
            )
        flats[band] = tuple(rows)
    return MasterTrends(bias=tuple(bias), flats=flats)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


# -- zero points -----------------------------------------------------------------


def _mean_over_quadrants(zp: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the mean of the finite zero points and the error of that mean
    (from the finite errors among them)."""
    ok = np.isfinite(zp)
    n = ok.sum(axis=1)
    var = np.where(ok & np.isfinite(err), err, 0.0) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, zp, 0.0).sum(axis=1) / n
        mean_err = np.sqrt(var.sum(axis=1)) / n
    return np.where(n > 0, mean, np.nan), np.where(n > 0, mean_err, np.nan)


def night_zeropoints(store: str | os.PathLike, night: str) -> ExposureZeroPoints | None:
    """Every science exposure of the night with its classical, ubercal and
    network zero points; None before photometry."""
    if not _has_exposures(store, night):
        return None
    exp = read_group(store, groups.exposures(night)).sortby("expid")
    expid = exp.expid.values.astype(np.int64)
    bands = np.array([str(b) for b in exp.band.values])
    nan = np.full((len(expid), 1), np.nan)
    classic, classic_err = _mean_over_quadrants(
        exp.zp_classic.values if "zp_classic" in exp else nan,
        exp.zp_classic_err.values if "zp_classic_err" in exp else nan,
    )
    ubercal = np.full(len(expid), np.nan)
    ubercal_err = np.full(len(expid), np.nan)
    for band in sorted(set(bands)):
        if not group_exists(store, groups.ubercal(band)):
            continue
        sol = read_group(store, groups.ubercal(band))
        rows = np.flatnonzero(bands == band)
        have = np.isin(expid[rows], sol.expid.values)
        if not have.any():
            continue
        picked = sol.sel(expid=expid[rows][have])
        zp, err = _mean_over_quadrants(picked.zp.values, picked.zp_err.values)
        ubercal[rows[have]], ubercal_err[rows[have]] = zp, err
    network = np.full(len(expid), np.nan)
    network_err = np.full(len(expid), np.nan)
    if group_exists(store, groups.scores(night)):
        scores = read_group(store, groups.scores(night))
        pos = {int(e): i for i, e in enumerate(expid)}
        for e, z, s in zip(
            scores.expid.values, scores.zp.values, scores.zp_offset_err.values, strict=True
        ):
            if int(e) in pos:
                network[pos[int(e)]], network_err[pos[int(e)]] = z, s
    return ExposureZeroPoints(
        expid=expid,
        band=bands,
        mjd=exp.mjd.values.astype(float),
        airmass=exp.airmass.values.astype(float) if "airmass" in exp else nan[:, 0],
        ubercal=ubercal,
        ubercal_err=ubercal_err,
        classic=classic,
        classic_err=classic_err,
        network=network,
        network_err=network_err,
    )


def night_ubercal(store: str | os.PathLike, night: str) -> tuple[UbercalFit, ...]:
    """The ubercal fits (one per band) whose nights include ``night``."""
    out = []
    for band in list_groups(store, groups.UBERCAL):
        sol = read_group(store, groups.ubercal(band))
        nights = tuple(str(n) for n in (sol.attrs.get("inputs") or {}).get("nights", []))
        if night not in nights:
            continue
        rms = sol.star_rms.values
        ok = np.isfinite(rms) & np.isfinite(sol.star_mag.values)
        plots = {
            name: sol[name].values.astype(np.uint8).tobytes()
            for name in ("starflat_png", "residual_png")
            if name in sol
        }
        out.append(
            UbercalFit(
                band=band,
                nights=nights,
                stats=dict(sol.attrs.get("fit_statistics", {})),
                qa=dict(sol.attrs.get("qa", {})),
                star_mag=sol.star_mag.values[ok],
                star_rms=rms[ok],
                bin_mag=sol.mag_bin.values,
                bin_median_rms=sol.repeatability_median.values,
                bin_n_stars=sol.repeatability_n_stars.values,
                plots=plots,
            )
        )
    return tuple(out)


def night_network(store: str | os.PathLike, night: str) -> NetworkCard | None:
    """The checkpoint that scored the night and its held-out metrics."""
    if not group_exists(store, groups.scores(night)):
        return None
    attrs = read_group(store, groups.scores(night), load=False).attrs
    card = attrs.get("model_card") or {}
    return NetworkCard(
        checkpoint=str(attrs.get("checkpoint", "")), metrics=dict(card.get("metrics_test_mag", {}))
    )


# -- transients and light curves ---------------------------------------------------


def night_transients(store: str | os.PathLike, night: str) -> Transients | None:
    """Detections and counts of ``transients/<night>``; None when the stage did not run."""
    if not group_exists(store, groups.transients(night)):
        return None
    ds = read_group(store, groups.transients(night))
    methods = tuple(str(m) for m in ds.methods.values)
    return Transients(
        methods=methods,
        injected=int(ds.n_injected.sum()),
        found={m: int(ds.n_found.sel(methods=m).sum()) for m in methods},
        false={m: int(ds.n_false.sel(methods=m).sum()) for m in methods},
        method=np.array([str(m) for m in ds.method.values]),
        score=ds.score.values.astype(float),
        delta_mag=ds.delta_mag.values.astype(float),
    )


LIGHTCURVE_VARIABLES = (
    "expid",
    "mjd",
    "band",
    "flux_njy",
    "flux_njy_err",
    "mag",
    "mag_err",
    "flags",
)
"""What a ``lightcurves/<name>`` group holds per epoch (BRIEF §4)."""


def _read_light_curve(store: str | os.PathLike, group: str) -> dict[str, np.ndarray]:
    ds = read_group(store, group)
    missing = [v for v in LIGHTCURVE_VARIABLES if v not in ds.variables]
    if missing:
        raise ValueError(f"{group}: missing {missing} (BRIEF §4)")
    return {v: ds[v].values for v in LIGHTCURVE_VARIABLES}


def _forced_fluxes(
    store: str | os.PathLike, name: str, expid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``lightcurves_forced/<name>``'s flux and error at the epochs ``expid``."""
    flux = np.full(len(expid), np.nan)
    err = np.full(len(expid), np.nan)
    if group_exists(store, groups.lightcurve_forced(name)):
        forced = _read_light_curve(store, groups.lightcurve_forced(name))
        row = {int(e): i for i, e in enumerate(forced["expid"])}
        for i, e in enumerate(expid.tolist()):
            if int(e) in row:
                flux[i] = forced["flux_njy"][row[int(e)]]
                err[i] = forced["flux_njy_err"][row[int(e)]]
    return flux, err


def light_curves(
    store: str | os.PathLike, night: str | None = None, *, names: Sequence[str] | None = None
) -> tuple[LightCurve, ...]:
    """Every light curve (``night=None``), or those with an epoch in ``night``:
    an exposure of the night, or an MJD within the night's files when it has
    no exposures group; ``names`` picks objects."""
    found = list_groups(store, groups.LIGHTCURVES)
    names = found if names is None else [n for n in names if n in found]
    if not names:
        return ()
    expids, mjd_range = _night_epochs(store, night) if night else (None, None)
    out = []
    for name in names:
        lc = _read_light_curve(store, groups.lightcurve(name))
        in_night = np.zeros(len(lc["mjd"]), dtype=bool)
        if expids is not None:
            in_night = np.isin(lc["expid"], expids)
        elif mjd_range is not None:
            in_night = (lc["mjd"] >= mjd_range[0]) & (lc["mjd"] <= mjd_range[1])
        if night and not in_night.any():
            continue
        order = np.argsort(lc["mjd"], kind="stable")
        forced, forced_err = _forced_fluxes(store, name, lc["expid"][order])
        out.append(
            LightCurve(
                name=name,
                expid=lc["expid"][order].astype(np.int64),
                mjd=lc["mjd"][order].astype(float),
                band=np.array([str(b) for b in lc["band"][order]]),
                mag=lc["mag"][order].astype(float),
                mag_err=lc["mag_err"][order].astype(float),
                flux_njy=lc["flux_njy"][order].astype(float),
                flux_njy_err=lc["flux_njy_err"][order].astype(float),
                flags=lc["flags"][order].astype(np.int64),
                in_night=in_night[order],
                forced_flux_njy=forced,
                forced_flux_njy_err=forced_err,
            )
        )
    return tuple(out)


def _night_epochs(
    store: str | os.PathLike, night: str
) -> tuple[np.ndarray | None, tuple[float, float] | None]:
    if _has_exposures(store, night):
        return read_group(store, groups.exposures(night)).expid.values, None
    if group_exists(store, groups.index(night)):
        mjd = read_group(store, groups.index(night)).mjd.values
        mjd = mjd[np.isfinite(mjd)]
        if mjd.size:
            return None, (float(mjd.min()), float(mjd.max()))
    return None, None


# -- one night ---------------------------------------------------------------------


def night_qa(store: str | os.PathLike, night: str) -> NightQA:
    """Everything the report shows about ``night``; of the files whose night is
    unknown (:data:`~tasks.io.groups.UNKNOWN_NIGHT`) only the files: nothing else
    belongs to them, and the name, compared as a date, would pick the latest
    masters period."""
    if night == groups.UNKNOWN_NIGHT:
        return NightQA(night, night_files(store, night), None, (), None, (), None, None, ())
    return NightQA(
        night=night,
        files=night_files(store, night),
        photometry=night_photometry(store, night),
        masters=night_masters(store, night),
        zeropoints=night_zeropoints(store, night),
        ubercal=night_ubercal(store, night),
        network=night_network(store, night),
        transients=night_transients(store, night),
        lightcurves=light_curves(store, night),
    )


# -- across nights (the index page) -------------------------------------------------


@dataclass(frozen=True)
class NightSummary:
    """One row of the index page."""

    night: str
    files: Files | None
    photometry: Photometry | None
    ubercal_median: dict[str, float]
    """Median ubercal zero point of the night's exposures per band, mag."""
    network_rms: float
    """RMS of network minus ubercal zero points over the night's exposures, mag."""


def night_summary(store: str | os.PathLike, night: str) -> NightSummary:
    zp = night_zeropoints(store, night)
    medians: dict[str, float] = {}
    rms = float("nan")
    if zp is not None:
        for band in sorted(set(zp.band)):
            v = zp.ubercal[zp.band == band]
            if np.isfinite(v).any():
                medians[band] = float(np.nanmedian(v))
        d = zp.network - zp.ubercal
        if np.isfinite(d).any():
            rms = float(np.sqrt(np.nanmean(d**2)))
    return NightSummary(
        night=night,
        files=night_files(store, night),
        photometry=night_photometry(store, night),
        ubercal_median=medians,
        network_rms=rms,
    )
