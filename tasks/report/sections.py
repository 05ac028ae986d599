"""The report's content: titled sections of paragraphs, formatted tables and
figures, built from :mod:`tasks.report.data`. The HTML report and the Prefect
artifacts render the same sections, so they say the same thing with the same
numbers, rounded once here.

Rounding: magnitudes to 0.1 mmag (4 decimals), differences in mmag to 0.1,
fractions as percentages to 0.01 %, ADU to 0.001.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.io import groups
from tasks.report import figures
from tasks.report.data import (
    ExposureZeroPoints,
    Files,
    LightCurve,
    Master,
    MasterTrends,
    NightQA,
    NightSummary,
    Photometry,
    UbercalFit,
)

MISSING = "–"


# -- the content model ----------------------------------------------------------


@dataclass(frozen=True)
class Link:
    text: str
    href: str


Cell = str | Link


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    caption: str = ""
    name: str = ""
    """A stable identifier (HTML ``data-table``), for readers and tests."""


@dataclass(frozen=True)
class Figure:
    png: bytes
    caption: str
    name: str
    """File-name-safe identifier, unique on its page."""


Block = str | Table | Figure


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    blocks: tuple[Block, ...] = field(default_factory=tuple)


NIGHT_SECTIONS = (
    ("files", "Raw files"),
    ("photometry", "Photometry"),
    ("masters", "Masters used and their stability"),
    ("zeropoints", "Zero points per exposure"),
    ("ubercal", "Ubercal fit, starflat and residual maps"),
    ("repeatability", "Repeatability against magnitude"),
    ("network", "Zero-point network against ubercal"),
)
"""Sections of every night page, in order; ``transients`` and ``lightcurves``
follow where those stages wrote groups for the night."""


# -- numbers as text ------------------------------------------------------------


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float, np.number)) and math.isfinite(x)


def mag(x: Any) -> str:
    """A magnitude (or zero point), 0.1 mmag."""
    return f"{x:.4f}" if _finite(x) else MISSING


def mmag(x_mag: Any) -> str:
    """A magnitude difference or error given in mag, shown in mmag to 0.1."""
    return f"{1e3 * x_mag:.1f}" if _finite(x_mag) else MISSING


def pct(fraction: Any) -> str:
    return f"{100 * fraction:.2f} %" if _finite(fraction) else MISSING


def num(x: Any, digits: int = 3) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{x:.{digits}f}" if _finite(x) else MISSING


def count(n: Any) -> str:
    return str(int(n)) if _finite(n) else MISSING


# -- night sections -------------------------------------------------------------


def files_section(files: Files | None) -> Section:
    sid, title = NIGHT_SECTIONS[0]
    if files is None:
        return Section(sid, title, ("No index for this night: the index stage did not run.",))
    types = sorted({c.imagetyp for c in files.counts})
    by = {(c.imagetyp, c.status): c.n for c in files.counts}
    rows = tuple((t, count(by.get((t, "ok"), 0)), count(by.get((t, "rejected"), 0))) for t in types)
    rows += (("all", count(files.n_ok), count(files.n_rejected)),)
    blocks: list[Block] = [
        f"Raw root: `{files.raw_root}`",
        Table(("frame type", "ok", "rejected"), rows, name="files"),
    ]
    if files.rejected:
        blocks.append(
            Table(
                ("file", "reason"),
                tuple((p, r) for p, r in files.rejected),
                caption=f"{files.n_rejected} rejected files of this night, with the reason",
                name="rejected",
            )
        )
    else:
        blocks.append("No file of this night was rejected.")
    return Section(sid, title, tuple(blocks))


def photometry_section(phot: Photometry | None) -> Section:
    sid, title = NIGHT_SECTIONS[1]
    if phot is None:
        return Section(sid, title, ("No night catalog: the photometry stage did not run.",))
    rows = tuple(
        (
            b.band,
            count(b.exposures),
            count(b.observations),
            count(b.clean),
            pct(_ratio(b.clean, b.observations)),
        )
        for b in phot.bands
    )
    rows += (
        (
            "all",
            count(phot.exposures),
            count(phot.observations),
            count(phot.clean),
            pct(_ratio(phot.clean, phot.observations)),
        ),
    )
    return Section(
        sid,
        title,
        (
            Table(
                ("band", "exposures", "observations", "clean", "clean fraction"),
                rows,
                caption="Reference-star observations in nights/<night>/catalog; "
                "clean = no flag set",
                name="photometry",
            ),
        ),
    )


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _master_row(m: Master) -> tuple[Cell, ...]:
    s = m.summary
    if m.kind == "bias":
        state = (
            "reference period"
            if s.get("is_reference")
            else (
                f"UNSTABLE in quadrants {s['flagged_quadrants']}"
                if s.get("flagged_quadrants")
                else "stable"
            )
        )
        return (
            m.group,
            count(s.get("nframes")),
            f"{count(s.get('n_hot'))} hot",
            "" if s.get("is_reference") else f"{num(s.get('mean_delta_adu'))} ADU",
            "" if s.get("is_reference") else pct(s.get("max_outlier_fraction")),
            state,
        )
    return (
        m.group,
        MISSING,
        f"{count(s.get('n_defects'))} defects ({count(s.get('n_dead'))} dead)",
        f"ratio rms <= {pct(s.get('ratio_rms_max'))}",
        pct(s.get("ratio_outlier_fraction_max")),
        f"normalisation {num(s.get('normalisation'), 4)}",
    )


def masters_section(night: str, masters: Sequence[Master], trends: MasterTrends | None) -> Section:
    sid, title = NIGHT_SECTIONS[2]
    if not masters:
        return Section(sid, title, ("No master covers this night: the masters stage did not run.",))
    blocks: list[Block] = [
        Table(
            (
                "group",
                "frames",
                "defects",
                "mean delta / ratio rms",
                "worst outlier fraction",
                "state",
            ),
            tuple(_master_row(m) for m in masters),
            caption="Bias: against the reference period (outliers per quadrant, seed 004's 0.6 % "
            "threshold). Flats: daily/master ratio over all nights of the period.",
            name="masters",
        )
    ]
    for m in masters:
        if m.kind == "bias" and m.delta_maps:
            blocks.append(
                Figure(
                    figures.bias_delta_map(m),
                    f"{m.group} minus the reference master bias {m.reference_period}, per quadrant",
                    f"bias-delta-{m.period}",
                )
            )
        if m.kind == "flat" and m.ratio_hist:
            blocks.append(
                Table(
                    ("LED", "median ratio", "robust rms", "outlier fraction"),
                    tuple(
                        (str(led), num(med, 4), pct(rms), pct(out))
                        for led, med, rms, out in m.led_ratio
                    ),
                    caption=f"Daily flat of {night} / {m.group}, median over quadrants",
                    name=f"flat-ratio-{m.band}",
                )
            )
            blocks.append(
                Figure(
                    figures.flat_ratio_histogram(m, night),
                    f"Daily flat of {night} divided by {m.group}: every good pixel, per LED",
                    f"flat-ratio-{m.band}-{m.period}",
                )
            )
    if trends is not None and trends.bias:
        blocks.append(
            Figure(
                figures.master_trends(trends, highlight=[m.period for m in masters]),
                "Every period in the store; the periods of this night are shaded",
                "master-trends",
            )
        )
    return Section(sid, title, tuple(blocks))


def zeropoints_section(zp: ExposureZeroPoints | None) -> Section:
    sid, title = NIGHT_SECTIONS[3]
    if zp is None or not len(zp.expid):
        return Section(sid, title, ("No exposures group: the photometry stage did not run.",))
    rows = tuple(
        (
            count(zp.expid[i]),
            zp.band[i],
            num(zp.mjd[i], 5),
            num(zp.airmass[i], 3),
            mag(zp.ubercal[i]),
            mmag(zp.ubercal_err[i]),
            mag(zp.classic[i]),
            mmag(zp.classic_err[i]),
            mag(zp.network[i]),
            mmag(zp.network_err[i]),
        )
        for i in range(len(zp.expid))
    )
    notes = []
    if not zp.has_ubercal:
        notes.append(
            "No ubercal fit covers this night yet (the ubercal stage runs over many nights)."
        )
    if not zp.has_network:
        notes.append("The zero-point network has not scored this night (score stage).")
    return Section(
        sid,
        title,
        (
            Figure(figures.zero_points(zp), "Zero point of each science exposure", "zeropoints"),
            *notes,
            Table(
                (
                    "expid",
                    "band",
                    "MJD",
                    "airmass",
                    "ubercal [mag]",
                    "± [mmag]",
                    "classical [mag]",
                    "± [mmag]",
                    "network [mag]",
                    "± [mmag]",
                ),
                rows,
                caption="Mean over the exposure's quadrants; "
                "m = m_inst + zp (+ starflat for ubercal)",
                name="zeropoints",
            ),
        ),
    )


def _fit_row(fit: UbercalFit) -> tuple[Cell, ...]:
    s, q = fit.stats, fit.qa
    return (
        fit.band,
        f"{fit.nights[0]} .. {fit.nights[-1]} ({len(fit.nights)})" if fit.nights else MISSING,
        count(s.get("n_used")),
        count(s.get("n_clipped")),
        count(s.get("n_rejected_stars")),
        num(s.get("chi2_per_dof"), 3),
        num(s.get("converged")) if "converged" in s else MISSING,
        mmag(q.get("repeatability_bright_median_mag")),
        mmag(q.get("residual_map_rms_mag")),
        mmag(q.get("starflat_rms_mag")),
        mmag(q.get("zp_err_median_mag")),
    )


def ubercal_section(fits: Sequence[UbercalFit]) -> Section:
    sid, title = NIGHT_SECTIONS[4]
    if not fits:
        return Section(sid, title, ("No ubercal fit covers this night: run the ubercal stage.",))
    blocks: list[Block] = [
        Table(
            (
                "band",
                "nights",
                "observations used",
                "clipped",
                "rejected stars",
                "chi2/dof",
                "converged",
                "bright-star repeatability [mmag]",
                "residual map rms [mmag]",
                "starflat rms [mmag]",
                "median zp error [mmag]",
            ),
            tuple(_fit_row(f) for f in fits),
            caption="Bright stars: brighter than the stage's limit (17 mag)",
            name="ubercal",
        )
    ]
    captions = {
        "starflat_png": "starflat: zero-point variation over the focal plane [mmag]",
        "residual_png": "median residual (data - model) over the focal plane [mmag]",
    }
    for fit in fits:
        for name, png in fit.plots.items():
            blocks.append(
                Figure(
                    png,
                    f"ubercal {fit.band} {captions.get(name, name)}",
                    f"ubercal-{fit.band}-{name.removesuffix('_png')}",
                )
            )
        if not fit.plots:
            blocks.append(f"{groups.ubercal(fit.band)} was written without its maps (plots off).")
    return Section(sid, title, tuple(blocks))


def repeatability_section(fits: Sequence[UbercalFit]) -> Section:
    sid, title = NIGHT_SECTIONS[5]
    if not fits:
        return Section(sid, title, ("Needs an ubercal fit covering this night.",))
    blocks: list[Block] = []
    for fit in fits:
        blocks.append(
            Figure(
                figures.repeatability(fit),
                f"ubercal {fit.band}: rms of each star's residuals against its magnitude",
                f"repeatability-{fit.band}",
            )
        )
        ok = fit.bin_n_stars > 0
        blocks.append(
            Table(
                ("magnitude bin centre [mag]", "stars", "median rms [mmag]"),
                tuple(
                    (num(m, 2), count(n), mmag(r))
                    for m, n, r in zip(
                        fit.bin_mag[ok], fit.bin_n_stars[ok], fit.bin_median_rms[ok], strict=True
                    )
                ),
                name=f"repeatability-{fit.band}",
            )
        )
    return Section(sid, title, tuple(blocks))


def _against(values: np.ndarray, reference: np.ndarray, err: np.ndarray) -> dict[str, float]:
    d = values - reference
    ok = np.isfinite(d)
    pull = d[ok] / err[ok] if np.isfinite(err[ok]).all() and (err[ok] > 0).all() else np.array([])
    return {
        "n": int(ok.sum()),
        "median": float(np.median(d[ok])) if ok.any() else float("nan"),
        "rms": float(np.sqrt(np.mean(d[ok] ** 2))) if ok.any() else float("nan"),
        "pull_rms": float(np.sqrt(np.mean(pull**2))) if pull.size else float("nan"),
    }


def network_stats(zp: ExposureZeroPoints) -> dict[tuple[str, str], dict[str, float]]:
    """Per (band, 'network'|'classical'): median and rms of the difference to
    ubercal (mag), its pull rms (over the estimate's own error) and the count."""
    out = {}
    for band in sorted(set(zp.band)):
        b = zp.band == band
        out[(band, "network")] = _against(zp.network[b], zp.ubercal[b], zp.network_err[b])
        out[(band, "classical")] = _against(zp.classic[b], zp.ubercal[b], zp.classic_err[b])
    return out


def network_section(qa: NightQA) -> Section:
    sid, title = NIGHT_SECTIONS[6]
    zp = qa.zeropoints
    if zp is None or not zp.has_network:
        return Section(
            sid, title, ("The zero-point network has not scored this night (score stage).",)
        )
    if not zp.has_ubercal:
        return Section(sid, title, ("No ubercal zero points to compare with (ubercal stage).",))
    stats = network_stats(zp)
    blocks: list[Block] = [
        Figure(
            figures.network_vs_ubercal(zp),
            "Network and classical zero points minus ubercal's, per exposure",
            "network",
        ),
        Table(
            ("band", "estimate", "exposures", "median - ubercal [mmag]", "rms [mmag]", "pull rms"),
            tuple(
                (band, who, count(s["n"]), mmag(s["median"]), mmag(s["rms"]), num(s["pull_rms"], 2))
                for (band, who), s in stats.items()
            ),
            caption="pull = (estimate - ubercal) / the estimate's own error",
            name="network",
        ),
    ]
    if qa.network is not None and qa.network.metrics:
        m = qa.network.metrics
        blocks.append(
            Table(
                ("model", "held-out rmse [mmag]"),
                tuple((k, mmag(v.get("rmse"))) for k, v in m.items() if isinstance(v, dict)),
                caption=f"Checkpoint {qa.network.checkpoint}: its held-out nights",
                name="network-card",
            )
        )
    return Section(sid, title, tuple(blocks))


def transients_section(qa: NightQA) -> Section | None:
    t = qa.transients
    if t is None:
        return None
    rows = tuple(
        (
            m,
            count(t.injected),
            count(t.found[m]),
            count(t.false[m]),
            pct(_ratio(t.found[m], t.injected)),
        )
        for m in t.methods
    )
    return Section(
        "transients",
        "Transients",
        (
            Table(
                ("method", "injected", "found", "false", "completeness"),
                rows,
                name="transients",
                caption="On the night's simulated reference/new pairs (docs/transients.md)",
            ),
            Figure(figures.transients(t), "Detections per method", "transients"),
        ),
    )


def _flux(x: Any) -> str:
    return f"{x:.1f}" if _finite(x) else MISSING


def _peak(values: np.ndarray) -> float:
    return float(np.nanmax(values)) if np.isfinite(values).any() else float("nan")


def lightcurves_section(curves: Sequence[LightCurve]) -> Section | None:
    if not curves:
        return None
    blocks: list[Block] = [
        Table(
            (
                "object",
                "epochs",
                "epochs this night",
                "measured",
                "bands",
                "peak flux [nJy]",
                "difference-image peak [nJy]",
                "brightest [mag]",
            ),
            tuple(
                (
                    lc.name,
                    count(len(lc.mjd)),
                    count(int(lc.in_night.sum())),
                    count(lc.measured),
                    ", ".join(sorted(set(lc.band))),
                    _flux(_peak(lc.flux_njy)),
                    _flux(_peak(lc.forced_flux_njy)),
                    mag(float(np.nanmin(lc.mag))) if np.isfinite(lc.mag).any() else MISSING,
                )
                for lc in curves
            ),
            caption="Scene-modelling photometry on the ubercal system (lightcurves/<name>); "
            "measured: epochs with a flux; difference images: lightcurves_forced/<name>",
            name="lightcurves",
        )
    ]
    blocks += [
        Figure(figures.light_curve(lc), f"light curve {lc.name}", f"lightcurve-{lc.name}")
        for lc in curves
    ]
    return Section("lightcurves", "Light curves", tuple(blocks))


def night_sections(qa: NightQA, trends: MasterTrends | None = None) -> list[Section]:
    """Every section of a night page, in order; for the files of no night, the
    one section that lists them (the index page's)."""
    if qa.night == groups.UNKNOWN_NIGHT:
        return [unknown_night_section(qa.files)]
    out = [
        files_section(qa.files),
        photometry_section(qa.photometry),
        masters_section(qa.night, qa.masters, trends),
        zeropoints_section(qa.zeropoints),
        ubercal_section(qa.ubercal),
        repeatability_section(qa.ubercal),
        network_section(qa),
    ]
    out += [s for s in (transients_section(qa), lightcurves_section(qa.lightcurves)) if s]
    return out


# -- the index page ---------------------------------------------------------------

INDEX_SECTIONS = (
    ("nights", "Nights"),
    ("unknown-night", "Files without a night"),
    ("masters", "Masters across periods"),
)
"""Sections of the index page; ``lightcurves`` follows where there are any."""


def nights_section(rows: Sequence[NightSummary], pages: dict[str, str]) -> Section:
    """One row per night; the night links to its page where the report has one."""
    bands = sorted({b for r in rows for b in r.ubercal_median})
    table_rows = []
    for r in rows:
        f, p = r.files, r.photometry
        table_rows.append(
            (
                Link(r.night, pages[r.night]) if r.night in pages else r.night,
                count(f.n_ok) if f else MISSING,
                count(f.n_rejected) if f else MISSING,
                count(p.exposures) if p else MISSING,
                count(p.observations) if p else MISSING,
                count(p.clean) if p else MISSING,
                *(mag(r.ubercal_median.get(b)) for b in bands),
                mmag(r.network_rms),
            )
        )
    blocks: list[Block] = [
        Table(
            (
                "night",
                "files ok",
                "rejected",
                "exposures",
                "observations",
                "clean",
                *(f"median ubercal zp {b} [mag]" for b in bands),
                "network - ubercal rms [mmag]",
            ),
            tuple(table_rows),
            caption="Nights by evening date",
            name="nights",
        )
    ]
    if len(rows) > 1:
        blocks.append(
            Figure(
                figures.nights_overview(
                    [r.night for r in rows],
                    {b: [r.ubercal_median.get(b, float("nan")) for r in rows] for b in bands},
                    [1e3 * r.network_rms for r in rows],
                ),
                "Zero points and the network's error, night by night",
                "nights",
            )
        )
    return Section(*INDEX_SECTIONS[0], tuple(blocks))


def unknown_night_section(files: Files | None) -> Section:
    sid, title = INDEX_SECTIONS[1]
    if files is None or not files.rejected:
        return Section(sid, title, ("Every raw file could be placed in a night.",))
    return Section(
        sid,
        title,
        (
            "Files whose observing night could not be read (no usable MJD-OBS): "
            f"rejected, recorded in {groups.index(groups.UNKNOWN_NIGHT)}.",
            Table(("file", "reason"), tuple(files.rejected), name="rejected"),
        ),
    )


def trends_section(trends: MasterTrends) -> Section:
    sid, title = INDEX_SECTIONS[2]
    if not trends.bias:
        return Section(sid, title, ("No masters in the store.",))
    rows = [
        (
            "bias",
            t.period,
            num(t.values["mean_delta_adu"]),
            pct(t.values["max_outlier_fraction"]),
            count(t.values["flagged_quadrants"]),
        )
        for t in trends.bias
    ]
    rows += [
        (
            f"flat {band}",
            t.period,
            f"ratio rms <= {pct(t.values['ratio_rms_max'])}",
            pct(t.values["ratio_outlier_fraction_max"]),
            MISSING,
        )
        for band, periods in sorted(trends.flats.items())
        for t in periods
    ]
    return Section(
        sid,
        title,
        (
            Figure(figures.master_trends(trends), "Stability of every period", "master-trends"),
            Table(
                (
                    "master",
                    "period",
                    "mean delta [ADU] / ratio rms",
                    "worst outlier fraction",
                    "flagged quadrants",
                ),
                tuple(rows),
                name="master-trends",
            ),
        ),
    )


def index_sections(
    rows: Sequence[NightSummary],
    pages: dict[str, str],
    unknown: Files | None,
    trends: MasterTrends,
    curves: Sequence[LightCurve],
) -> list[Section]:
    """Every section of the index page, in order."""
    out = [nights_section(rows, pages), unknown_night_section(unknown), trends_section(trends)]
    lc = lightcurves_section(curves)
    return [*out, lc] if lc else out
