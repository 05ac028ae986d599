"""Masters stage: master bias per period and quadrant, master flat per band and
period, defect masks and stability metrics (docs/masters.md).

Work is split over quadrant chunks (one Prefect task per chunk, on Dask); each
task writes its quadrants into a staging group and returns small numbers; one
commit task per group normalises (flats), plots, and publishes atomically.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import dask.array as da
import numpy as np
import xarray as xr
from prefect import task
from pydantic import Field

from calib.bits import MASK_HOT
from calib.flats import (
    RATIO_EDGES,
    LedStack,
    build_flat_quadrant,
    focal_plane_normalisation,
    frame_level,
)
from calib.masters import (
    MasterFrame,
    combine_bands,
    compare_bias,
    find_hot_pixels,
    rows_per_band,
)
from calib.overscan import overscan_level
from tasks.config import StageConfig
from tasks.io import groups
from tasks.io.provenance import provenance
from tasks.io.raw import QuadrantHeader, read_overscan, read_rows, validate_file
from tasks.io.store import (
    begin_group,
    commit_group,
    group_exists,
    list_groups,
    open_staging,
    read_group,
    staging_committed,
    write_region,
)
from tasks.logs import run_logger
from tasks.qa import plot_binned_histograms, plot_histograms, plot_quadrant_maps, qa_path


class MastersConfig(StageConfig, table="masters"):
    """Configuration of the masters stage."""

    period_days: int = Field(
        20, ge=1, le=366, description="Length of a calibration period in nights."
    )
    period_epoch: str = Field(
        "2019-01-01",
        pattern=r"^\d{4}-\d{2}-\d{2}$",
        description="First night of period 0; periods are aligned to it, so a night "
        "always falls in the same period whatever else is processed.",
    )
    mode: Literal["ccdproc", "iterative", "median"] = Field(
        "ccdproc", description="Combination of the frame stack (calib.masters.combine_frames)."
    )
    low_sigma: float = Field(3.0, gt=0, description="Lower clipping threshold, in sigma.")
    high_sigma: float = Field(3.0, gt=0, description="Upper clipping threshold, in sigma.")
    iterations: int = Field(3, ge=1, le=20, description="Clipping passes of the 'iterative' mode.")
    overscan: Literal["mean", "median", "median_per_row"] = Field(
        "median",
        description="How the overscan level is taken (calib.overscan); per-row levels "
        "only pay when row noise exceeds 1.25 rn / sqrt(overscan columns) (docs/masters.md).",
    )
    max_frames: int = Field(
        100,
        ge=1,
        description="Most frames combined per master (per LED for flats); "
        "evenly spaced in time when there are more, to bound memory per quadrant.",
    )
    hot_nsigma: float = Field(
        8.0, gt=0, description="Hot pixel: bias above the median by this many robust sigma..."
    )
    hot_min_adu: float = Field(15.0, ge=0, description="...and by at least this many ADU.")
    dead_min_response: float = Field(
        0.7, gt=0, lt=1, description="Dead/low pixel: flat below this fraction of its local level."
    )
    reference_period: str | None = Field(
        None,
        description="Bias period the others are compared with; default: the earliest "
        "period with a master bias in the store.",
    )
    max_mean_shift_adu: float = Field(
        0.5, gt=0, description="Bias stability: mean delta flagged beyond this."
    )
    max_outlier_fraction: float = Field(
        0.006,
        gt=0,
        description="Bias stability: outlier fraction flagged beyond this (seed 004: 0.6 %).",
    )
    quadrants_per_task: int = Field(
        4, ge=1, le=64, description="Quadrants handled by one Prefect task."
    )
    memory_budget_gb: float = Field(
        2.0,
        gt=0,
        description="Peak memory one masters task aims at, GB: stacks are read from the "
        "FITS files in row bands sized so that a band, one quadrant's full-size outputs "
        "and the interpreter fit, whatever the number of frames (docs/masters.md).",
    )


def period_label(night: str, config: MastersConfig) -> str:
    """First night (YYYY-MM-DD) of the period that contains ``night``."""
    epoch = dt.date.fromisoformat(config.period_epoch)
    day = dt.date.fromisoformat(night)
    index = (day - epoch).days // config.period_days
    return (epoch + dt.timedelta(days=index * config.period_days)).isoformat()


@dataclass(frozen=True)
class PeriodPlan:
    """The calibration frames of one period, as found in the night indexes."""

    period: str
    bias: tuple[str, ...]
    """Absolute paths of the bias frames."""
    flats: dict[str, dict[int, tuple[tuple[str, str], ...]]] = field(default_factory=dict)
    """band -> LED id -> ((absolute path, night), ...)."""
    quadrants: tuple[int, ...] = ()
    extnames: tuple[str, ...] = ()
    shape: tuple[int, int] = (0, 0)

    @property
    def nights(self) -> tuple[str, ...]:
        return tuple(
            sorted({n for leds in self.flats.values() for fs in leds.values() for _, n in fs})
        )


def _subsample(items: list, limit: int) -> list:
    if len(items) <= limit:
        return items
    keep = np.unique(np.linspace(0, len(items) - 1, limit).round().astype(int))
    return [items[i] for i in keep]


def plan_periods(store: str, nights: list[str] | None, config: MastersConfig) -> list[PeriodPlan]:
    """Periods touched by ``nights`` (default: every indexed night), with all their
    indexed calibration frames, in time order."""
    indexed = [n for n in list_groups(store, groups.INDEX) if n != groups.UNKNOWN_NIGHT]
    wanted = {period_label(n, config) for n in (nights if nights is not None else indexed)}
    bias: dict[str, list[tuple[float, str]]] = defaultdict(list)
    flats: dict[str, dict[str, dict[int, list[tuple[float, str, str]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for night in indexed:
        period = period_label(night, config)
        if period not in wanted:
            continue
        idx = read_group(store, groups.index(night))
        root = idx.attrs["raw_root"]
        t = idx.to_dataframe()
        t = t[t.status == "ok"]
        for row in t.itertuples():
            path = os.path.join(root, row.path)
            if row.imagetyp == "BIAS":
                bias[period].append((row.mjd, path))
            elif row.imagetyp == "FLAT":
                flats[period][row.filter][int(row.led_id)].append((row.mjd, path, night))
    plans = []
    for period in sorted(wanted):
        b = [p for _, p in sorted(bias.get(period, []))]
        if not b:
            continue
        f = {
            band: {
                led: tuple((p, n) for _, p, n in _subsample(sorted(rows), config.max_frames))
                for led, rows in sorted(leds.items())
            }
            for band, leds in sorted(flats.get(period, {}).items())
        }
        first = validate_file(b[0])
        q = first.quadrants
        ys, xs = q[0].datasec
        plans.append(
            PeriodPlan(
                period=period,
                bias=tuple(_subsample(b, config.max_frames)),
                flats=f,
                quadrants=tuple(h.quadrant for h in q),
                extnames=tuple(h.extname for h in q),
                shape=(ys.stop - ys.start, xs.stop - xs.start),
            )
        )
    return plans


def _chunks(plan: PeriodPlan, config: MastersConfig) -> list[tuple[int, ...]]:
    q, k = plan.quadrants, config.quadrants_per_task
    return [q[i : i + k] for i in range(0, len(q), k)]


# What a task holds besides the stack's row bands: the interpreter with its
# libraries, and per pixel of the quadrant the full-size outputs and their
# temporaries (bias: master 14 B, reference 15 B, delta and stability ~40 B;
# flats: per LED master 14 B + scatter 4 B, per night a ratio map 4 B, ~48 B more
# for the combination across LEDs). Measured: benchmarks/masters.py --focal-plane.
_BASELINE_BYTES = 400 * 2**20
_BIAS_BYTES_PER_PIXEL = 72


def _flat_bytes_per_pixel(n_leds: int, n_nights: int) -> int:
    return 18 * n_leds + 4 * n_nights + 48


class _FrameStack:
    """One quadrant of some frames, read in row bands straight from the files and
    overscan-subtracted (:func:`calib.overscan.subtract_overscan`'s values)."""

    def __init__(
        self, paths: list[str], quadrant: int, config: MastersConfig, headers: _Headers
    ) -> None:
        self.paths = paths
        self.quads = [headers.quadrant(p, quadrant) for p in paths]
        # A frame's level may need every overscan row (method "median"): read the
        # overscan columns of every frame first (a few % of the pixels).
        self.levels = [
            overscan_level(read_overscan(p, q), method=config.overscan)
            for p, q in zip(paths, self.quads, strict=True)
        ]
        ys, xs = self.quads[0].datasec
        self.shape = (ys.stop - ys.start, xs.stop - xs.start)
        self.gain = self.quads[0].gain

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, r0: int, r1: int) -> np.ndarray:
        out = np.empty((len(self), r1 - r0, self.shape[1]), np.float32)
        for k, (path, quad, level) in enumerate(
            zip(self.paths, self.quads, self.levels, strict=True)
        ):
            data, _ = read_rows(path, quad, slice(r0, r1))
            out[k] = data - level[r0:r1]
        return out

    def rows_per_band(self, config: MastersConfig, *, bytes_per_pixel: int) -> int:
        npix = self.shape[0] * self.shape[1]
        return rows_per_band(
            len(self), self.shape[1], memory_bytes=config.memory_budget_gb * 1e9,
            reserved_bytes=_BASELINE_BYTES + bytes_per_pixel * npix,
        )  # fmt: skip


class _Headers:
    """Each raw file validated once per task (reading a quadrant needs its header)."""

    def __init__(self) -> None:
        self._by_path: dict[str, dict[int, QuadrantHeader]] = {}

    def quadrant(self, path: str, quadrant: int) -> QuadrantHeader:
        if path not in self._by_path:
            self._by_path[path] = {q.quadrant: q for q in validate_file(path).quadrants}
        try:
            return self._by_path[path][quadrant]
        except KeyError:
            raise ValueError(f"{path}: no quadrant {quadrant}") from None


def _combine(stack: _FrameStack, config: MastersConfig) -> MasterFrame:
    return combine_bands(
        stack.read,
        len(stack),
        stack.shape,
        rows_per_band=stack.rows_per_band(config, bytes_per_pixel=_BIAS_BYTES_PER_PIXEL),
        mode=config.mode,
        low_sigma=config.low_sigma,
        high_sigma=config.high_sigma,
        iterations=config.iterations,
    )


def _lazy(shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], fill: float = 0) -> da.Array:
    return da.full(shape, fill, dtype=dtype, chunks=chunks)


# -- master bias ----------------------------------------------------------------


def bias_template(plan: PeriodPlan) -> xr.Dataset:
    nq, (ny, nx) = len(plan.quadrants), plan.shape
    img, per_q = (1, ny, nx), (1,)
    dims = ("quadrant", "y", "x")
    return xr.Dataset(
        {
            "bias": (dims, _lazy((nq, ny, nx), "f4", img, np.nan)),
            "sigma": (dims, _lazy((nq, ny, nx), "f4", img, np.nan)),
            "uncertainty": (dims, _lazy((nq, ny, nx), "f4", img, np.nan)),
            "nframes": (dims, _lazy((nq, ny, nx), "i2", img)),
            "defects": (dims, _lazy((nq, ny, nx), "u1", img)),
            "delta_ref": (dims, _lazy((nq, ny, nx), "f4", img, np.nan)),
            "mean_delta_adu": (("quadrant",), _lazy((nq,), "f8", per_q, np.nan)),
            "rms_delta_adu": (("quadrant",), _lazy((nq,), "f8", per_q, np.nan)),
            "outlier_fraction": (("quadrant",), _lazy((nq,), "f8", per_q, np.nan)),
            "flagged": (("quadrant",), _lazy((nq,), "bool", per_q)),
            "n_hot": (("quadrant",), _lazy((nq,), "i8", per_q)),
        },
        coords={"quadrant": np.array(plan.quadrants, dtype=np.int64)},
    )


def build_bias_quadrants(
    store: str,
    plan: PeriodPlan,
    quadrants: tuple[int, ...],
    staging: str,
    reference: str | None,
    config: MastersConfig,
) -> dict[int, dict[str, Any]]:
    """Combine the period's biases for some quadrants into the staging group."""
    if staging_committed(store, groups.bias(plan.period), staging):
        return _committed_bias_stats(store, plan, quadrants)
    out = {}
    ref = read_group(store, groups.bias(reference), load=False) if reference else None
    headers = _Headers()
    for q in quadrants:
        stack = _FrameStack(list(plan.bias), q, config, headers)
        m = _combine(stack, config)
        hot = find_hot_pixels(m.center, nsigma=config.hot_nsigma, min_excess_adu=config.hot_min_adu)
        stats: dict[str, Any] = {"n_hot": int(hot.sum()), "nframes": len(stack)}
        delta = np.full(m.center.shape, np.nan, np.float32)
        if ref is not None:
            r = ref.sel(quadrant=q).load()
            ref_frame = MasterFrame(
                center=r.bias.values,
                sigma=r.sigma.values,
                uncertainty=r.uncertainty.values,
                nframes=r.nframes.values,
                mode=config.mode,
            )
            delta, stab = compare_bias(
                m,
                ref_frame,
                good=~hot & (r.defects.values == 0),
                max_mean_shift_adu=config.max_mean_shift_adu,
                max_outlier_fraction=config.max_outlier_fraction,
            )
            stats.update(
                mean_delta_adu=stab.mean_delta_adu,
                rms_delta_adu=stab.rms_delta_adu,
                outlier_fraction=stab.outlier_fraction,
                flagged=stab.flagged,
            )
        i = plan.quadrants.index(q)
        dims = ("quadrant", "y", "x")
        one = lambda a: a[None]  # noqa: E731
        piece = xr.Dataset(
            {
                "bias": (dims, one(m.center)),
                "sigma": (dims, one(m.sigma)),
                "uncertainty": (dims, one(m.uncertainty)),
                "nframes": (dims, one(m.nframes)),
                "defects": (dims, one(hot.astype(np.uint8) * MASK_HOT)),
                "delta_ref": (dims, one(delta)),
                "mean_delta_adu": (("quadrant",), [stats.get("mean_delta_adu", np.nan)]),
                "rms_delta_adu": (("quadrant",), [stats.get("rms_delta_adu", np.nan)]),
                "outlier_fraction": (("quadrant",), [stats.get("outlier_fraction", np.nan)]),
                "flagged": (("quadrant",), [bool(stats.get("flagged", False))]),
                "n_hot": (("quadrant",), [stats["n_hot"]]),
            }
        )
        write_region(staging, piece, {"quadrant": slice(i, i + 1)})
        out[q] = stats
    return out


def commit_bias(
    store: str,
    plan: PeriodPlan,
    staging: str,
    stats: dict[int, dict[str, Any]],
    reference: str | None,
    config: MastersConfig,
) -> dict[str, Any]:
    group = groups.bias(plan.period)
    summary = _bias_summary(stats, reference)
    plots = {}
    if reference:
        ds = open_staging(staging)
        maps = {
            name: ds.delta_ref.isel(quadrant=i).values[::4, ::4]
            for i, name in enumerate(plan.extnames)
        }
        plots["delta_map"] = str(
            plot_quadrant_maps(
                maps,
                qa_path(store, group, "delta_ref.png"),
                title=f"master bias {plan.period} - reference {reference}",
                unit="ADU",
            )
        )
    commit_group(
        store,
        group,
        staging,
        attrs=provenance(
            "masters",
            config=config,
            inputs=list(plan.bias),
            period=plan.period,
            period_days=config.period_days,
            reference_period=reference,
            extnames=list(plan.extnames),
            summary=summary,
            plots=plots,
            units="ADU, overscan-subtracted",
        ),
    )
    return summary


def _bias_summary(stats: dict[int, dict[str, Any]], reference: str | None) -> dict[str, Any]:
    s = list(stats.values())
    summary: dict[str, Any] = {
        "n_hot": int(sum(x["n_hot"] for x in s)),
        "nframes": int(max(x["nframes"] for x in s)),
        "is_reference": reference is None,
    }
    if reference:
        summary.update(
            mean_delta_adu=float(np.mean([x["mean_delta_adu"] for x in s])),
            max_abs_mean_delta_adu=float(np.max([abs(x["mean_delta_adu"]) for x in s])),
            mean_rms_delta_adu=float(np.mean([x["rms_delta_adu"] for x in s])),
            max_outlier_fraction=float(np.max([x["outlier_fraction"] for x in s])),
            flagged_quadrants=sorted(int(q) for q, x in stats.items() if x.get("flagged")),
        )
    return summary


def _committed_bias_stats(
    store: str, plan: PeriodPlan, quadrants: tuple[int, ...]
) -> dict[int, dict[str, Any]]:
    """What build_bias_quadrants returned, read back from the committed group."""
    ds = read_group(store, groups.bias(plan.period), load=False)
    out = {}
    for q in quadrants:
        r = ds.sel(quadrant=q)[
            ["n_hot", "mean_delta_adu", "rms_delta_adu", "outlier_fraction", "flagged", "nframes"]
        ].load()
        stats: dict[str, Any] = {"n_hot": int(r.n_hot), "nframes": int(r.nframes.max())}
        if np.isfinite(float(r.mean_delta_adu)):
            stats.update(
                mean_delta_adu=float(r.mean_delta_adu),
                rms_delta_adu=float(r.rms_delta_adu),
                outlier_fraction=float(r.outlier_fraction),
                flagged=bool(r.flagged),
            )
        out[q] = stats
    return out


def _committed_flat_sums(
    store: str, plan: PeriodPlan, band: str, quadrants: tuple[int, ...]
) -> dict[int, tuple[float, int]]:
    """Good-pixel sums of the un-normalised flat, recovered from the committed one."""
    ds = read_group(store, groups.flat(band, plan.period), load=False)
    norm = float(ds.attrs["summary"]["normalisation"])
    out = {}
    for q in quadrants:
        r = ds.sel(quadrant=q)[["flat", "defects"]].load()
        good = (r.defects.values == 0) & np.isfinite(r.flat.values)
        out[q] = (float(r.flat.values[good].sum(dtype=np.float64)) * norm, int(good.sum()))
    return out


def reference_period(store: str, plans: list[PeriodPlan], config: MastersConfig) -> str | None:
    """The bias period others are compared with (None: the first plan is the reference)."""
    if config.reference_period is not None:
        return config.reference_period
    existing = list_groups(store, groups.BIAS)
    candidates = sorted(existing + [p.period for p in plans])
    return candidates[0] if candidates else None


# -- master flat ----------------------------------------------------------------


def flat_levels(
    store: str, plan: PeriodPlan, band: str, quadrants: tuple[int, ...], config: MastersConfig
) -> dict[str, dict[int, float]]:
    """Median electrons of every flat frame of ``band`` on some quadrants (pass 1 of
    the focal-plane normalisation)."""
    bias = read_group(store, groups.bias(plan.period), load=False)
    out: dict[str, dict[int, float]] = defaultdict(dict)
    headers = _Headers()
    for q in quadrants:
        b = bias.bias.sel(quadrant=q).values
        for frames in plan.flats[band].values():
            for path, _ in frames:
                # One frame's quadrant at a time: memory is one image whatever the count.
                quad = headers.quadrant(path, q)
                data, overscan = read_rows(path, quad)
                level = overscan_level(overscan, method=config.overscan)
                e = ((data - level).astype(np.float32) - b) * quad.gain
                out[path][q] = frame_level(e)
    return dict(out)


def frame_levels(parts: list[dict[str, dict[int, float]]]) -> dict[str, float]:
    """Each flat frame's focal-plane level: the mean of its quadrant medians, so one
    constant per exposure (the LED's brightness) and quadrant differences stay in
    the flat."""
    merged: dict[str, dict[int, float]] = defaultdict(dict)
    for part in parts:
        for path, per_q in part.items():
            merged[path].update(per_q)
    return {path: float(np.mean(list(per_q.values()))) for path, per_q in merged.items()}


def flat_template(plan: PeriodPlan, band: str) -> xr.Dataset:
    nq, (ny, nx) = len(plan.quadrants), plan.shape
    leds = sorted(plan.flats[band])
    nights = list(plan.nights)
    img, dims = (1, ny, nx), ("quadrant", "y", "x")
    per = lambda *extra: _lazy((nq, *extra), "f8", (1, *extra), np.nan)  # noqa: E731
    return xr.Dataset(
        {
            "flat": (dims, _lazy((nq, ny, nx), "f4", img, np.nan)),
            "uncertainty": (dims, _lazy((nq, ny, nx), "f4", img, np.nan)),
            "nframes": (dims, _lazy((nq, ny, nx), "i2", img)),
            "defects": (dims, _lazy((nq, ny, nx), "u1", img)),
            "residual_sigma": (dims, _lazy((nq, ny, nx), "f4", img, np.nan)),
            "ratio_median": (("quadrant", "led", "night"), per(len(leds), len(nights))),
            "ratio_rms": (("quadrant", "led", "night"), per(len(leds), len(nights))),
            "ratio_outlier_fraction": (("quadrant", "led", "night"), per(len(leds), len(nights))),
            "ratio_hist": (
                ("quadrant", "led", "night", "ratio_bin"),
                _lazy(
                    (nq, len(leds), len(nights), len(RATIO_EDGES) - 1),
                    "i8",
                    (1, len(leds), len(nights), len(RATIO_EDGES) - 1),
                ),
            ),
            "residual_sigma_median": (("quadrant", "led"), per(len(leds))),
            "n_dead": (("quadrant",), _lazy((nq,), "i8", (1,))),
        },
        coords={
            "quadrant": np.array(plan.quadrants, dtype=np.int64),
            "led": np.array(leds, dtype=np.int64),
            "night": np.array(nights, dtype=object),
            "ratio_bin": 0.5 * (RATIO_EDGES[1:] + RATIO_EDGES[:-1]),
        },
    )


def build_flat_quadrants(
    store: str,
    plan: PeriodPlan,
    band: str,
    quadrants: tuple[int, ...],
    staging: str,
    levels: dict[str, float],
    config: MastersConfig,
) -> dict[int, tuple[float, int]]:
    """Combine per LED, then across LEDs, for some quadrants; returns per quadrant
    the sum and count of good-pixel flat values (for the global normalisation)."""
    if staging_committed(store, groups.flat(band, plan.period), staging):
        return _committed_flat_sums(store, plan, band, quadrants)
    bias = read_group(store, groups.bias(plan.period), load=False)
    leds = sorted(plan.flats[band])
    nights = list(plan.nights)
    headers = _Headers()
    out = {}
    for q in quadrants:
        b = bias.sel(quadrant=q)
        b_img, hot = b.bias.values, (b.defects.values & MASK_HOT) != 0
        stacks, led_stacks = [], []
        for led in leds:
            frames = plan.flats[band][led]
            stack = _FrameStack([p for p, _ in frames], q, config, headers)
            stacks.append(stack)
            led_stacks.append(
                LedStack(
                    read=stack.read,
                    levels_e=np.array([levels[p] for p, _ in frames]),
                    nights=np.array([nights.index(n) for _, n in frames]),
                )
            )
        per_pixel = _flat_bytes_per_pixel(len(leds), len(nights))
        fq = build_flat_quadrant(
            led_stacks,
            bias_adu=b_img,
            hot=hot,
            gain=stacks[0].gain,
            n_nights=len(nights),
            rows_per_band=min(s.rows_per_band(config, bytes_per_pixel=per_pixel) for s in stacks),
            mode=config.mode,
            low_sigma=config.low_sigma,
            high_sigma=config.high_sigma,
            iterations=config.iterations,
            dead_min_response=config.dead_min_response,
        )
        i = plan.quadrants.index(q)
        dims = ("quadrant", "y", "x")
        piece = xr.Dataset(
            {
                "flat": (dims, fq.flat[None]),
                "uncertainty": (dims, fq.uncertainty[None]),
                "nframes": (dims, fq.nframes[None]),
                "defects": (dims, fq.defects[None]),
                "residual_sigma": (dims, fq.residual_sigma[None]),
                "ratio_median": (("quadrant", "led", "night"), fq.ratio_median[None]),
                "ratio_rms": (("quadrant", "led", "night"), fq.ratio_rms[None]),
                "ratio_outlier_fraction": (
                    ("quadrant", "led", "night"),
                    fq.ratio_outlier_fraction[None],
                ),
                "ratio_hist": (("quadrant", "led", "night", "ratio_bin"), fq.ratio_hist[None]),
                "residual_sigma_median": (("quadrant", "led"), fq.residual_sigma_median[None]),
                "n_dead": (("quadrant",), [fq.n_dead]),
            }
        )
        write_region(staging, piece, {"quadrant": slice(i, i + 1)})
        out[q] = (fq.good_sum, fq.good_count)
    return out


def commit_flat(
    store: str,
    plan: PeriodPlan,
    band: str,
    staging: str,
    sums: list[dict[int, tuple[float, int]]],
    config: MastersConfig,
) -> dict[str, Any]:
    """Normalise to mean 1 over the good pixels of the focal plane, plot, publish."""
    group = groups.flat(band, plan.period)
    norm = focal_plane_normalisation(pair for part in sums for pair in part.values())
    ds = open_staging(staging)
    flat_maps, sigma_samples = {}, {}
    n_defects = 0
    # One quadrant at a time: a whole focal plane is ~9 GB at ZTF size.
    for i, name in enumerate(plan.extnames):
        piece = ds.isel(quadrant=slice(i, i + 1))[
            ["flat", "uncertainty", "defects", "residual_sigma"]
        ]
        piece = piece.load()
        scaled = (piece[["flat", "uncertainty"]] / norm).astype(np.float32)
        write_region(staging, scaled.drop_vars("quadrant"), {"quadrant": slice(i, i + 1)})
        bad = piece.defects.values[0] != 0
        n_defects += int(bad.sum())
        flat_maps[name] = scaled.flat.values[0, ::4, ::4] - 1.0
        if i < 8:
            sigma_samples[name] = piece.residual_sigma.values[0][~bad][::16]
    small = ds[
        ["ratio_median", "ratio_rms", "ratio_outlier_fraction", "ratio_hist", "n_dead"]
    ].load()
    ratios = {
        f"LED {led}": small.ratio_median.sel(led=led).values.ravel() for led in small.led.values
    }
    plots = {
        "flat_map": str(
            plot_quadrant_maps(
                flat_maps,
                qa_path(store, group, "flat.png"),
                title=f"master flat {band} {plan.period} (minus 1)",
                unit="relative",
            )
        ),
        "residual_sigma_hist": str(
            plot_histograms(
                sigma_samples,
                qa_path(store, group, "residual_sigma.png"),
                title="per-pixel residual sigma of the flat stack",
                xlabel="sigma_i",
                empty_note="no data (a single frame per LED has no scatter)",
            )
        ),
        "ratio_hist": str(
            plot_binned_histograms(
                {
                    f"LED {led}": small.ratio_hist.sel(led=led).sum(("quadrant", "night")).values
                    for led in small.led.values
                },
                RATIO_EDGES,
                qa_path(store, group, "ratio_hist.png"),
                title=f"daily / master flat {band} {plan.period}, all quadrants and nights",
                xlabel="ratio (end bins hold everything beyond)",
            )
        ),
    }
    finite = lambda a: bool(np.isfinite(a).any())  # noqa: E731
    summary = {
        "normalisation": norm,
        "n_dead": int(small.n_dead.sum()),
        "n_defects": n_defects,
        "ratio_rms_max": float(np.nanmax(small.ratio_rms.values))
        if finite(small.ratio_rms.values)
        else None,
        "ratio_outlier_fraction_max": float(np.nanmax(small.ratio_outlier_fraction.values))
        if finite(small.ratio_outlier_fraction.values)
        else None,
        "led_ratio_medians": {k: float(np.nanmedian(v)) for k, v in ratios.items() if finite(v)},
    }
    commit_group(
        store,
        group,
        staging,
        attrs=provenance(
            "masters",
            config=config,
            inputs=sorted(p for fs in plan.flats[band].values() for p, _ in fs),
            band=band,
            period=plan.period,
            bias=groups.bias(plan.period),
            extnames=list(plan.extnames),
            summary=summary,
            plots=plots,
            normalisation="mean 1 over the good pixels of the whole focal plane, built in "
            "electrons: quadrant gain and QE differences live in the flat (docs/masters.md)",
        ),
    )
    return summary


# -- Prefect tasks ----------------------------------------------------------------


@task(name="plan-masters", retries=1, retry_delay_seconds=2)
def plan_masters_task(
    store: str, nights: list[str] | None, config: MastersConfig
) -> list[PeriodPlan]:
    plans = plan_periods(store, nights, config)
    run_logger(__name__).info("masters: %d period(s): %s", len(plans), [p.period for p in plans])
    return plans


@task(name="begin-master")
def begin_master_task(store: str, group: str, plan: PeriodPlan, band: str | None) -> str:
    template = bias_template(plan) if band is None else flat_template(plan, band)
    return begin_group(store, group, template)


@task(name="master-bias-quadrants", retries=2, retry_delay_seconds=2)
def build_bias_task(
    store, plan, quadrants, staging, reference, config
) -> dict[int, dict[str, Any]]:
    return build_bias_quadrants(store, plan, quadrants, staging, reference, config)


@task(name="commit-master-bias")
def commit_bias_task(store, plan, staging, stats, reference, config) -> dict[str, Any]:
    merged = {q: s for part in stats for q, s in part.items()}
    summary = commit_bias(store, plan, staging, merged, reference, config)
    logger = run_logger(__name__)
    logger.info("master bias %s: %s", plan.period, summary)
    if summary.get("flagged_quadrants"):
        logger.warning(
            "master bias %s unstable vs %s in quadrants %s",
            plan.period,
            reference,
            summary["flagged_quadrants"],
        )
    return summary


@task(name="flat-levels", retries=2, retry_delay_seconds=2)
def flat_levels_task(store, plan, band, quadrants, config) -> dict[str, dict[int, float]]:
    return flat_levels(store, plan, band, quadrants, config)


@task(name="master-flat-quadrants", retries=2, retry_delay_seconds=2)
def build_flat_task(store, plan, band, quadrants, staging, level_parts, config):
    return build_flat_quadrants(
        store, plan, band, quadrants, staging, frame_levels(level_parts), config
    )


@task(name="commit-master-flat")
def commit_flat_task(store, plan, band, staging, sums, config) -> dict[str, Any]:
    summary = commit_flat(store, plan, band, staging, sums, config)
    run_logger(__name__).info("master flat %s %s: %s", band, plan.period, summary)
    return summary


def quadrant_chunks(plan: PeriodPlan, config: MastersConfig) -> list[tuple[int, ...]]:
    return _chunks(plan, config)


def has_master(store: str, group: str) -> bool:
    return group_exists(store, group)


def build_masters_sequentially(
    store: str, nights: list[str] | None = None, config: MastersConfig | None = None
) -> dict[str, Any]:
    """The masters stage without Prefect or Dask, in one process (benchmarks,
    debugging): the flow's wiring (:func:`tasks.stages.masters_stage`) run
    sequentially; returns the summaries by group."""
    # Imported here: tasks.stages wires this module's tasks.
    from tasks.stages import SequentialRun, masters_stage

    return masters_stage(SequentialRun(), store, nights, config or MastersConfig())
