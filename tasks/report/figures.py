"""The QA report's figures: matplotlib (Agg), PNG bytes, labelled axes with units.

Each function takes what :mod:`tasks.report.data` read and returns one PNG; the
masters' maps and histograms are drawn by the masters stage's own plotting
(:mod:`tasks.qa`), so the report and ``<store>.qa/`` look alike.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from tasks.qa import plot_binned_histograms, plot_quadrant_maps
from tasks.report.data import (
    ExposureZeroPoints,
    LightCurve,
    Master,
    MasterTrends,
    Transients,
    UbercalFit,
)

DPI = 90
MAX_ERR_MAG = 0.1
"""Zero points with a larger error are left out of the plots (the tables keep
them): one exposure with a 6-mag classical error would set the scale."""
BAND_COLOURS = {"g": "tab:green", "r": "tab:red", "i": "tab:purple"}
MMAG = 1e3


def _colour(band: str) -> str:
    return BAND_COLOURS.get(band, "tab:gray")


@contextmanager
def _figure(*, ncols: int = 1, width: float = 6.0, height: float = 3.8) -> Iterator[tuple]:
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    try:
        yield fig, list(axes.flat)
    finally:
        plt.close(fig)


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _hours(mjd: np.ndarray) -> tuple[np.ndarray, float]:
    """Hours since 0h UTC of the first exposure's date, and that date as an MJD."""
    zero = float(np.floor(np.nanmin(mjd))) if np.isfinite(mjd).any() else 0.0
    return (mjd - zero) * 24.0, zero


def bias_delta_map(master: Master) -> bytes:
    """The master bias minus the reference period's, per quadrant."""
    buf = io.BytesIO()
    plot_quadrant_maps(
        master.delta_maps,
        buf,  # type: ignore[arg-type]
        title=f"master bias {master.period} - reference {master.reference_period}",
        unit="delta [ADU]",
    )
    return buf.getvalue()


def flat_ratio_histogram(master: Master, night: str) -> bytes:
    """This night's daily / master flat ratio over all quadrants, per LED."""
    buf = io.BytesIO()
    plot_binned_histograms(
        master.ratio_hist,
        master.ratio_edges,  # type: ignore[arg-type]
        buf,  # type: ignore[arg-type]
        title=f"daily flat {night} / master flat {master.band} {master.period}",
        xlabel="ratio (dimensionless; end bins hold everything beyond)",
    )
    return buf.getvalue()


def master_trends(trends: MasterTrends, *, highlight: Sequence[str] = ()) -> bytes:
    """Stability of every period: bias mean delta and outlier fraction against
    the reference; flats' worst daily/master ratio rms, per band."""
    with _figure(ncols=3, width=4.2) as (fig, (ax_delta, ax_out, ax_flat)):
        periods = [t.period for t in trends.bias]
        x = np.arange(len(periods))
        delta = [t.values["mean_delta_adu"] for t in trends.bias]
        outliers = [100 * t.values["max_outlier_fraction"] for t in trends.bias]
        ax_delta.plot(x, delta, "o-", color="k")
        ax_delta.axhline(0, color="0.7", lw=0.8)
        ax_delta.set_ylabel("mean bias delta vs reference [ADU]")
        ax_out.plot(x, outliers, "s-", color="tab:orange")
        ax_out.set_ylabel("worst quadrant outlier fraction [%]")
        for ax in (ax_delta, ax_out):
            ax.set_xticks(x, periods, rotation=30, ha="right", fontsize=7)
            ax.set_xlabel("bias period (first night)")
            for i, p in enumerate(periods):
                if p in highlight:
                    ax.axvspan(i - 0.4, i + 0.4, color="gold", alpha=0.3)
        flat_periods = sorted({t.period for rows in trends.flats.values() for t in rows})
        fx = {p: i for i, p in enumerate(flat_periods)}
        for band, rows in sorted(trends.flats.items()):
            ax_flat.plot(
                [fx[t.period] for t in rows],
                [100 * t.values["ratio_rms_max"] for t in rows],
                "o-",
                color=_colour(band),
                label=band,
            )
        ax_flat.set_xticks(
            range(len(flat_periods)), flat_periods, rotation=30, ha="right", fontsize=7
        )
        ax_flat.set_xlabel("flat period (first night)")
        ax_flat.set_ylabel("worst daily/master ratio rms [%]")
        if trends.flats:
            _legend(ax_flat, title="band", fontsize=7)
        fig.suptitle("master stability across periods")
        return _png(fig)


def _errorbars(
    ax, x, y, err, *, band: str, marker: str, label: str, filled: bool = True, max_err=np.inf
) -> int:
    """Draw the finite points with ``err <= max_err``; returns how many were left out
    for their error."""
    finite = np.isfinite(x) & np.isfinite(y)
    ok = finite & ~(err > max_err)
    if not ok.any():
        return int(np.count_nonzero(finite & ~ok))
    e = np.where(np.isfinite(err), err, 0.0)
    ax.errorbar(
        x[ok],
        y[ok],
        yerr=e[ok],
        fmt=marker,
        color=_colour(band),
        mfc=_colour(band) if filled else "none",
        ms=5,
        lw=0.8,
        capsize=0,
        label=label,
    )
    return int(np.count_nonzero(finite & ~ok))


def _legend(ax, handles=None, labels=None, **kwargs) -> None:
    """A legend when there is something to label (matplotlib warns otherwise)."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, **kwargs)


def _note_left_out(ax, n: int) -> None:
    if n:
        ax.text(
            0.01,
            0.01,
            f"{n} point(s) with error > {MAX_ERR_MAG * MMAG:.0f} mmag not drawn",
            transform=ax.transAxes,
            fontsize=7,
            color="0.3",
        )


def _series(zp: ExposureZeroPoints) -> list[tuple[str, np.ndarray, np.ndarray, str, bool]]:
    """(name, zero points, errors, marker, filled) of each estimate."""
    return [
        ("ubercal", zp.ubercal, zp.ubercal_err, "o", True),
        ("classical", zp.classic, zp.classic_err, "s", False),
        ("network", zp.network, zp.network_err, "x", True),
    ]


def zero_points(zp: ExposureZeroPoints) -> bytes:
    """Zero point per exposure against time and airmass: ubercal, classical and
    network side by side, one colour per band."""
    hours, zero = _hours(zp.mjd)
    with _figure(ncols=2, width=5.4, height=4.0) as (fig, (ax_t, ax_a)):
        for ax, x in ((ax_t, hours), (ax_a, zp.airmass)):
            left_out = 0
            for band in sorted(set(zp.band)):
                b = zp.band == band
                for name, y, err, marker, filled in _series(zp):
                    left_out += _errorbars(
                        ax,
                        x[b],
                        y[b],
                        err[b],
                        band=band,
                        marker=marker,
                        label=f"{band} {name}",
                        filled=filled,
                        max_err=MAX_ERR_MAG,
                    )
            _note_left_out(ax, left_out)
            ax.set_ylabel("zero point [mag]  (m = m_inst + zp)")
        ax_t.set_xlabel(f"time [h UTC since MJD {zero:.0f}.0]")
        ax_a.set_xlabel("airmass")
        _legend(ax_a, *ax_t.get_legend_handles_labels(), fontsize=7, ncol=2)
        fig.suptitle("zero point of each exposure (mean over its quadrants)")
        return _png(fig)


def network_vs_ubercal(zp: ExposureZeroPoints) -> bytes:
    """The network's (and the classical) zero point minus ubercal's per exposure,
    against time, and their histogram."""
    hours, zero = _hours(zp.mjd)
    with _figure(ncols=2, width=5.4, height=3.8) as (fig, (ax_t, ax_h)):
        left_out, kept = 0, {}
        for name, y, err, marker, filled in _series(zp)[1:]:
            diff = (y - zp.ubercal) * MMAG
            for band in sorted(set(zp.band)):
                b = zp.band == band
                left_out += _errorbars(
                    ax_t,
                    hours[b],
                    diff[b],
                    err[b] * MMAG,
                    band=band,
                    marker=marker,
                    label=f"{band} {name} - ubercal",
                    filled=filled,
                    max_err=MAX_ERR_MAG * MMAG,
                )
            kept[name] = diff[np.isfinite(diff) & ~(err > MAX_ERR_MAG)]
        _note_left_out(ax_t, left_out)
        ax_t.axhline(0, color="0.6", lw=0.8)
        ax_t.set_xlabel(f"time [h UTC since MJD {zero:.0f}.0]")
        ax_t.set_ylabel("zero point - ubercal [mmag]")
        _legend(ax_t, fontsize=7)
        values = np.concatenate(list(kept.values()))
        if values.size:
            edges = np.histogram_bin_edges(values, bins=min(30, max(5, values.size // 2)))
            for (name, v), style in zip(kept.items(), ("--", "-"), strict=True):
                if v.size:
                    ax_h.hist(v, bins=edges, histtype="step", ls=style, label=name)
            _legend(ax_h, fontsize=7)
        ax_h.set_xlabel("zero point - ubercal [mmag]")
        ax_h.set_ylabel("exposures")
        fig.suptitle("network and classical zero points against ubercal")
        return _png(fig)


def repeatability(fit: UbercalFit) -> bytes:
    """Per-star rms of the ubercal residuals against magnitude, with the binned median."""
    with _figure(width=6.4, height=4.0) as (fig, (ax,)):
        ax.scatter(
            fit.star_mag,
            fit.star_rms * MMAG,
            s=3,
            color="0.6",
            alpha=0.5,
            label="stars",
            rasterized=True,
        )
        ok = np.isfinite(fit.bin_median_rms) & (fit.bin_n_stars > 0)
        ax.plot(
            fit.bin_mag[ok],
            fit.bin_median_rms[ok] * MMAG,
            "o-",
            color=_colour(fit.band),
            label="median per magnitude bin",
        )
        if np.any(fit.star_rms > 0):
            ax.set_yscale("log")
        ax.set_xlabel(f"star magnitude, {fit.band} [mag]")
        ax.set_ylabel("rms of the star's residuals [mmag]")
        ax.set_title(
            f"ubercal {fit.band} repeatability ({len(fit.nights)} nights: "
            f"{fit.nights[0]} .. {fit.nights[-1]})"
            if fit.nights
            else f"ubercal {fit.band}"
        )
        _legend(ax, fontsize=7)
        return _png(fig)


def transients(t: Transients) -> bytes:
    """Found and false detections per method; detection score against the
    measured magnitude change."""
    with _figure(ncols=2, width=4.8, height=3.6) as (fig, (ax_c, ax_s)):
        x = np.arange(len(t.methods))
        ax_c.bar(x - 0.2, [t.found[m] for m in t.methods], 0.4, label="found (true)")
        ax_c.bar(x + 0.2, [t.false[m] for m in t.methods], 0.4, label="false", color="tab:red")
        ax_c.axhline(t.injected, color="k", ls="--", lw=0.8, label=f"injected ({t.injected})")
        ax_c.set_xticks(x, t.methods)
        ax_c.set_xlabel("method")
        ax_c.set_ylabel("detections")
        _legend(ax_c, fontsize=7)
        for m in t.methods:
            sel = t.method == m
            ax_s.scatter(t.delta_mag[sel], t.score[sel], s=8, label=m)
        ax_s.set_xlabel("magnitude of the difference [mag]")
        ax_s.set_ylabel("score (network: probability, classical: S/N)")
        if np.any(t.score > 0):
            ax_s.set_yscale("log")
        _legend(ax_s, fontsize=7)
        fig.suptitle("transients on the night's reference/new pairs")
        return _png(fig)


def light_curve(lc: LightCurve) -> bytes:
    """Flux against MJD per band (a transient's flux goes through zero, where a
    magnitude has none): the scene model, this night's epochs filled, and forced
    photometry on difference images where the stage wrote it."""
    with _figure(width=6.4, height=3.6) as (fig, (ax,)):
        for band in sorted(set(lc.band)):
            b = lc.band == band
            for sel, filled, label in (
                (b & lc.in_night, True, f"{band} scene model, this night"),
                (b & ~lc.in_night, False, f"{band} scene model"),
            ):
                _errorbars(
                    ax,
                    lc.mjd[sel],
                    lc.flux_njy[sel],
                    lc.flux_njy_err[sel],
                    band=band,
                    marker="o",
                    label=label,
                    filled=filled,
                )
            if lc.has_forced:
                _errorbars(
                    ax,
                    lc.mjd[b],
                    lc.forced_flux_njy[b],
                    lc.forced_flux_njy_err[b],
                    band=band,
                    marker="x",
                    label=f"{band} difference image",
                )
        ax.axhline(0.0, color="0.6", lw=0.6)
        ax.set_xlabel("MJD [d]")
        ax.set_ylabel("calibrated flux [nJy]")
        ax.set_title(f"light curve {lc.name}")
        _legend(ax, fontsize=7)
        return _png(fig)


def nights_overview(
    nights: Sequence[str], zp_median: dict[str, list[float]], network_rms_mmag: list[float]
) -> bytes:
    """Across nights: the median ubercal zero point per band, and the network's
    rms against ubercal."""
    with _figure(ncols=2, width=5.0, height=3.6) as (fig, (ax_z, ax_n)):
        x = np.arange(len(nights))
        for band, values in sorted(zp_median.items()):
            ax_z.plot(x, values, "o-", color=_colour(band), label=band)
        ax_z.set_ylabel("median ubercal zero point [mag]")
        ax_n.plot(x, network_rms_mmag, "x-", color="k")
        ax_n.set_ylabel("network - ubercal rms [mmag]")
        for ax in (ax_z, ax_n):
            ax.set_xticks(x, nights, rotation=30, ha="right", fontsize=7)
            ax.set_xlabel("night (evening date)")
        if zp_median:
            _legend(ax_z, title="band", fontsize=7)
        fig.suptitle("nights at a glance")
        return _png(fig)
