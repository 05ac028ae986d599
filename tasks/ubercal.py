"""Ubercal stage: one band over a range of nights. Reads ``nights/<night>/catalog``
and ``nights/<night>/exposures``, anchors to the reference catalog, solves with
:func:`calib.ubercal.solve_ubercal` and writes ``ubercal/<band>`` (BRIEF §4,
docs/ubercal.md).

The observations never sit in one table: each night's catalog is one chunk, read
by a Dask task that returns that night's normal equations; the stage sums them
(a tree reduction) once per outlier pass.

Plots (starflat map, median residual map over the focal plane) are PNG files
rendered with matplotlib's Agg backend and stored inside the group as uint8
variables ``starflat_png`` and ``residual_png`` (dims ``starflat_png_bytes``,
``residual_png_bytes``), so they travel with the solution: write them out with
``ds.starflat_png.values.tobytes()``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import operator
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import dask
import numpy as np
import xarray as xr
from prefect import task
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from calib.starflat import Starflat
from calib.ubercal import (
    ObservationChunk,
    ReferenceStars,
    UbercalError,
    UbercalOptions,
    UbercalSolution,
    solve_ubercal,
)
from calib.ubercal.iterative import Partitions, concat_chunks, partition_in_memory, split_chunk
from sim.camera import Camera
from sim.config import CameraConfig
from tasks.config import StageConfig, _numpydoc_attributes
from tasks.io import groups
from tasks.io.provenance import provenance
from tasks.io.raw import read_refcat
from tasks.io.store import StoreError, group_exists, list_children, read_group, write_group

T = TypeVar("T")

_CATALOG_COLUMNS = ("expid", "quadrant", "source_id", "x", "y", "mag_inst", "mag_inst_err", "flags")
_BRIGHT_MAG = 17.0


def _options_model() -> type[BaseModel]:
    """A pydantic model of :class:`calib.ubercal.UbercalOptions`: the same fields,
    types and defaults, each described by its entry of the dataclass's docstring
    (the one home of those texts), validated by the dataclass itself."""
    docs = {
        k: v.replace("``", "")
        for k, v in _numpydoc_attributes(UbercalOptions.__doc__ or "").items()
    }
    hints = typing.get_type_hints(UbercalOptions)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(UbercalOptions):
        if not docs.get(f.name):
            raise TypeError(f"UbercalOptions.{f.name} has no description in its docstring")
        fields[f.name] = (hints[f.name], Field(f.default, description=docs[f.name]))

    def check(self: BaseModel) -> BaseModel:
        UbercalOptions(**self.model_dump())  # the dataclass's own checks
        return self

    return create_model(
        "UbercalOptionsConfig",
        __config__=ConfigDict(extra="forbid"),
        __doc__="The fit options of calib.ubercal.UbercalOptions, described field by field.",
        __validators__={"_check": model_validator(mode="after")(check)},
        **fields,
    )


UbercalOptionsConfig = _options_model()


class UbercalStageConfig(StageConfig, table="ubercal"):
    """Configuration of the ubercal stage."""

    per_run: ClassVar[tuple[str, ...]] = ("band", "first_night", "last_night")

    band: Literal["g", "r", "i"] = Field(description="Band to calibrate.")
    first_night: str | None = Field(
        None, description="First night (YYYY-MM-DD, inclusive); None: the earliest in the store."
    )
    last_night: str | None = Field(
        None, description="Last night (YYYY-MM-DD, inclusive); None: the latest in the store."
    )
    options: UbercalOptionsConfig = Field(  # type: ignore[valid-type]
        default_factory=UbercalOptionsConfig,
        description="Fit options (calib.ubercal.UbercalOptions, each field described): "
        "zero-point mode, starflat cells and priors, colour term, error floor, clipping, "
        "solver, anchor.",
    )
    scheduler: Literal["auto", "threads", "synchronous", "distributed"] = Field(
        "auto",
        description="Dask scheduler for the per-night passes inside this task: local threads, "
        "one thread, or the Dask cluster the task runs on ('distributed': nights read and "
        "star-complete partitions kept on the workers, for the iterative solver); 'auto': "
        "the cluster when the task runs on a Dask worker (the flow's task runner), threads "
        "otherwise.",
    )
    plots: bool = Field(True, description="Render the PNG QA plots into the group.")

    @field_validator("options", mode="before")
    @classmethod
    def _from_dataclass(cls, v: Any) -> Any:
        return v.as_dict() if isinstance(v, UbercalOptions) else v

    @property
    def fit_options(self) -> UbercalOptions:
        """The options as :func:`calib.ubercal.solve_ubercal` takes them."""
        return UbercalOptions(**self.options.model_dump())


@dataclasses.dataclass(frozen=True)
class NightCatalogs:
    """The night catalogs of one band as an ObservationSource: ``map_reduce``
    reads each night in a Dask task and sums the results pairwise.

    With a distributed ``client`` (the stage's ``scheduler='distributed'``
    gives the one of the Dask worker it runs on), the tasks run on the cluster's
    workers, and ``partition`` (the iterative solver's regrouping into star-complete
    partitions) reads and
    splits each night on a worker, assembles each partition from the pieces on
    a worker and keeps it there (persisted futures): every solver iteration is
    then a map over those partitions, and only parameter-sized vectors travel.
    Without one, the nights are read by local threads and the partitions kept
    in this process."""

    store: str
    nights: tuple[str, ...]
    band: str
    scheduler: str = "threads"
    client: Any = None

    def _client(self) -> Any:
        return self.client

    def map_reduce(self, fn: Callable[[ObservationChunk], T]) -> T:
        client = self._client()
        if client is not None:
            futures = client.map(
                _apply,
                [fn] * len(self.nights),
                [self.store] * len(self.nights),
                self.nights,
                [self.band] * len(self.nights),
                pure=False,
            )
            return DaskPartitions(client, futures).sum()
        parts = [dask.delayed(_apply)(fn, self.store, n, self.band) for n in self.nights]
        while len(parts) > 1:
            pairs = [parts[i : i + 2] for i in range(0, len(parts), 2)]
            parts = [dask.delayed(_sum)(p) if len(p) == 2 else p[0] for p in pairs]
        (total,) = dask.compute(parts[0], scheduler=self.scheduler)
        return total

    def partition(
        self,
        key: Callable[[ObservationChunk], np.ndarray],
        n_parts: int,
        build: Callable[..., Any],
    ) -> Partitions:
        client = self._client()
        if client is None:
            return partition_in_memory(self, key, n_parts, build)
        split = functools.partial(
            _read_split, store=self.store, band=self.band, key=key, n_parts=n_parts
        )
        per_night = client.map(split, self.nights, pure=False)
        parts = [
            client.submit(
                _build_from_pieces,
                build,
                k,
                *[client.submit(operator.itemgetter(k), f, pure=False) for f in per_night],
                pure=False,
            )
            for k in range(n_parts)
        ]
        return DaskPartitions(client, parts)


@dataclasses.dataclass(frozen=True)
class DaskPartitions:
    """Partitions held on Dask workers as futures (calib.ubercal.iterative.Partitions)."""

    client: Any
    futures: list[Any]

    def map(self, fn: Callable[[Any], Any]) -> DaskPartitions:
        return DaskPartitions(self.client, self.client.map(fn, self.futures, pure=False))

    def map_reduce(self, fn: Callable[[Any], T]) -> T:
        return self.map(fn).sum()

    def map_sum(self, fn: Callable[[Any], tuple[Any, T]]) -> tuple[DaskPartitions, T]:
        step = self.map(fn)
        return step.map(operator.itemgetter(0)), step.map(operator.itemgetter(1)).sum()

    def sum(self) -> Any:
        """The pairwise (tree) sum of the partitions' values, computed on the workers."""
        parts = list(self.futures)
        while len(parts) > 1:
            pairs = [parts[i : i + 2] for i in range(0, len(parts), 2)]
            parts = [
                self.client.submit(_sum, p, pure=False) if len(p) == 2 else p[0] for p in pairs
            ]
        return parts[0].result()


def _sum(parts: list[Any]) -> Any:
    return parts[0] + parts[1]


def _read_split(
    night: str,
    *,
    store: str,
    band: str,
    key: Callable[[ObservationChunk], np.ndarray],
    n_parts: int,
) -> list[ObservationChunk]:
    return split_chunk(read_night_chunk(store, night, band), key, n_parts)


def _build_from_pieces(build: Callable[..., Any], index: int, *pieces: ObservationChunk) -> Any:
    return build(concat_chunks(pieces), index=index)


def _apply(fn: Callable[[ObservationChunk], T], store: str, night: str, band: str) -> T:
    return fn(read_night_chunk(store, night, band))


def read_night_chunk(store: str | os.PathLike, night: str, band: str) -> ObservationChunk:
    """The observations of ``band`` in one night's catalog."""
    cat = read_group(store, groups.catalog(night))
    exps = read_group(store, groups.exposures(night))
    in_band = exps.expid.values[np.array([str(b) for b in exps.band.values]) == band]
    rows = np.isin(cat.expid.values, in_band)
    return ObservationChunk.from_mapping({c: cat[c].values for c in _CATALOG_COLUMNS}, rows)


def _select_nights(store: str, first: str | None, last: str | None) -> list[str]:
    """Nights in range whose catalog and exposures groups are complete (the night
    group itself is only a parent, without a completion marker)."""
    nights = [
        n
        for n in list_children(store, groups.NIGHTS)
        if (first is None or n >= first)
        and (last is None or n <= last)
        and group_exists(store, groups.catalog(n))
        and group_exists(store, groups.exposures(n))
    ]
    if not nights:
        raise StoreError(
            f"{store}: no night catalogs between {first or 'the first'} and "
            f"{last or 'the last'} night under {groups.NIGHTS}/"
        )
    return nights


def _quadrant_shape(store: str, nights: list[str]) -> tuple[int, int]:
    shapes = set()
    for n in nights:
        attrs = read_group(store, groups.catalog(n), load=False).attrs
        if "quad_nx" not in attrs or "quad_ny" not in attrs:
            raise StoreError(f"{store}: {groups.catalog(n)} lacks the quad_nx/quad_ny attrs")
        shapes.add((int(attrs["quad_nx"]), int(attrs["quad_ny"])))
    if len(shapes) != 1:
        raise StoreError(f"{store}: night catalogs disagree on the quadrant size: {sorted(shapes)}")
    return shapes.pop()


def _reference(refcat_path: str | os.PathLike, band: str) -> ReferenceStars:
    ref = read_refcat(refcat_path)
    return ReferenceStars(
        source_id=np.asarray(ref.source_id),
        mag=np.asarray(getattr(ref, f"{band}_mag"), dtype=np.float64),
        mag_err=np.asarray(getattr(ref, f"{band}_magerr"), dtype=np.float64),
        bp_rp=np.asarray(ref.bp_rp, dtype=np.float64),
    )


def resolved_scheduler(choice: str) -> str:
    """``choice``, with ``'auto'`` made ``'distributed'`` on a Dask worker and
    ``'threads'`` elsewhere. On a worker, threads would hold every partition of
    the fit in that one worker: a 27.6 M-observation store filled it to its
    memory limit four times while the other worker sat idle (docs/ubercal.md)."""
    if choice != "auto":
        return choice
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return "threads"
    return "distributed"


def run_ubercal_stage(
    store: str | os.PathLike, refcat_path: str | os.PathLike, config: UbercalStageConfig
) -> dict[str, Any]:
    """Calibrate one band over a range of nights and write ``ubercal/<band>``.

    Parameters
    ----------
    store : str or path
        The photocal store holding ``nights/<night>/catalog`` and ``exposures``.
    refcat_path : str or path
        Reference catalog (FITS or ECSV, BRIEF §3).
    config : UbercalStageConfig

    Returns
    -------
    dict
        ``group`` written, ``nights``, and the fit statistics.
    """
    store = os.fspath(store)
    nights = _select_nights(store, config.first_night, config.last_night)
    quad_nx, quad_ny = _quadrant_shape(store, nights)
    reference = _reference(refcat_path, config.band)

    scheduler = resolved_scheduler(config.scheduler)

    def solve(client: Any = None) -> UbercalSolution:
        source = NightCatalogs(store, tuple(nights), config.band, scheduler, client)
        return solve_ubercal(
            source,
            quad_nx=quad_nx,
            quad_ny=quad_ny,
            reference=reference,
            options=config.fit_options,
        )

    try:
        if scheduler == "distributed":
            from distributed import worker_client

            # Secedes from the worker's thread pool while the fit's tasks run.
            with worker_client() as client:
                solution = solve(client)
        else:
            solution = solve()
    except UbercalError as err:
        where = (
            f"ubercal/{config.band} (band {config.band!r} of nights/<night>/catalog, "
            f"{nights[0]} to {nights[-1]}, in {store})"
        )
        if type(err) is UbercalError:
            raise UbercalError(f"{where}: {err}") from err
        err.add_note(where)  # DisconnectedGraphError keeps its type and components
        raise
    ds = solution_dataset(solution, plots=config.plots)
    group = groups.ubercal(config.band)
    write_group(
        store,
        group,
        ds,
        attrs=provenance(
            "ubercal",
            config=config,
            inputs={"nights": nights, "refcat": os.fspath(refcat_path)},
        ),
    )
    out = {"group": group, "nights": nights, **solution.stats.as_dict()}
    if solution.sizing is not None:
        out["model"] = solution.sizing.describe()
    if solution.starflat is not None and solution.starflat.prior_dominated is not None:
        out["starflat_cells_at_prior"] = int(solution.starflat.prior_dominated.sum())
    return out


@task(name="ubercal", retries=0)
def ubercal_task(store: str, refcat_path: str, config: UbercalStageConfig) -> dict[str, Any]:
    """Prefect task: :func:`run_ubercal_stage`."""
    return run_ubercal_stage(store, refcat_path, config)


def qa_numbers(solution: UbercalSolution) -> dict[str, float]:
    """Scalar QA of a solution: repeatability of bright stars, residual-map and
    starflat spread, zero-point errors."""
    bright = np.isfinite(solution.star_rms_mag) & (solution.star_mag < _BRIGHT_MAG)
    res = solution.qa.residual_median_mag
    out = {
        "repeatability_bright_median_mag": float(np.median(solution.star_rms_mag[bright]))
        if bright.any()
        else float("nan"),
        "repeatability_bright_limit_mag": _BRIGHT_MAG,
        "residual_map_rms_mag": float(np.nanstd(res)),
        "residual_map_max_abs_mag": float(np.nanmax(np.abs(res))),
        "zp_err_median_mag": float(np.nanmedian(solution.zp_err_mag)),
    }
    if solution.starflat is not None:
        out["starflat_rms_mag"] = float(np.nanstd(solution.starflat.dzp_mag))
        out["starflat_err_median_mag"] = float(np.nanmedian(solution.starflat.dzp_err_mag))
    return out


def solution_dataset(solution: UbercalSolution, *, plots: bool = True) -> xr.Dataset:
    """The ``ubercal/<band>`` group content (BRIEF §4) of a solution."""
    sol = solution
    opt = sol.options
    qa = sol.qa
    edges = qa.repeatability_mag_bins
    data: dict[str, Any] = {
        "zp": (("expid", "quadrant"), sol.zp_mag),
        "zp_err": (("expid", "quadrant"), sol.zp_err_mag),
        "star_mag": (("source_id",), sol.star_mag),
        "star_mag_err": (("source_id",), sol.star_mag_err),
        "star_n_obs": (("source_id",), sol.star_n_obs),
        "star_rms": (("source_id",), sol.star_rms_mag),
        "star_rejected": (("source_id",), sol.star_rejected),
        "residual_median": (("quadrant", "qa_y", "qa_x"), qa.residual_median_mag),
        "repeatability_median": (("mag_bin",), qa.repeatability_median_mag),
        "repeatability_n_stars": (("mag_bin",), qa.repeatability_n_stars),
    }
    if sol.starflat is not None:
        cells = ("quadrant", "cell_y", "cell_x")
        data["starflat"] = (cells, sol.starflat.dzp_mag)
        data["starflat_err"] = (cells, sol.starflat.dzp_err_mag)
        if sol.starflat.prior_dominated is not None:
            data["starflat_prior_dominated"] = (cells, sol.starflat.prior_dominated)
    if sol.gradient_mag is not None:
        data["gradient"] = (("expid", "axis"), sol.gradient_mag)
        data["gradient_err"] = (("expid", "axis"), sol.gradient_err_mag)
        data["gradient_prior_dominated"] = (("expid",), sol.gradient_prior_dominated)
    if sol.colour_term is not None:
        data["colour_term"] = (("quadrant",), sol.colour_term)
        data["colour_term_err"] = (("quadrant",), sol.colour_term_err)
    quad_nx = sol.starflat.quad_nx if sol.starflat is not None else None
    if plots and sol.starflat is not None:
        for name, png in _plots(sol, sol.starflat).items():
            data[name] = ((f"{name}_bytes",), np.frombuffer(png, dtype=np.uint8))
    ds = xr.Dataset(
        data,
        coords={
            "expid": sol.expids,
            "quadrant": sol.quadrants,
            "source_id": sol.source_ids,
            "mag_bin": 0.5 * (edges[1:] + edges[:-1]),
            **({"axis": ["x", "y"]} if sol.gradient_mag is not None else {}),
        },
    )
    ds["zp"].attrs["units"] = "mag"
    ds["zp"].attrs["convention"] = "m = m_inst + zp + starflat"
    ds.attrs.update(
        {
            "fit_statistics": sol.stats.as_dict(),
            "qa": qa_numbers(sol),
            "options": opt.as_dict(),
            "sizing": sol.sizing.as_dict() if sol.sizing is not None else None,
            "quad_nx": quad_nx,
            "quad_ny": sol.starflat.quad_ny if sol.starflat is not None else None,
            "starflat_gauge": sol.starflat.gauge if sol.starflat is not None else None,
            "plots": "PNG bytes in the *_png variables" if plots else "none",
        }
    )
    return ds


def _plots(sol: UbercalSolution, sf: Starflat) -> dict[str, bytes]:
    """Focal-plane maps of the starflat and of the median residuals, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    camera = Camera(
        CameraConfig(quad_nx=sf.quad_nx, quad_ny=sf.quad_ny, ccd_gap_px=sf.quad_nx // 40)
    )
    out = {}
    for name, maps, title in (
        ("starflat_png", sf.dzp_mag, "starflat dzp [mmag]"),
        ("residual_png", sol.qa.residual_median_mag, "median residual [mmag]"),
    ):
        fig, ax = plt.subplots(figsize=(6, 5.5), dpi=100)
        lim = float(np.nanpercentile(np.abs(maps), 99)) * 1e3 if np.isfinite(maps).any() else 1.0
        im = None
        for q, img in zip(sol.quadrants, maps, strict=True):
            if int(q) not in camera.by_id:
                continue
            g = camera.by_id[int(q)]
            im = ax.imshow(
                img * 1e3,
                origin="lower",
                extent=(g.x0, g.x0 + g.nx, g.y0, g.y0 + g.ny),
                cmap="RdBu_r",
                vmin=-lim,
                vmax=lim,
            )
        ax.set_xlim(0, camera.mosaic_nx)
        ax.set_ylim(0, camera.mosaic_ny)
        ax.set_title(title)
        ax.set_xlabel("mosaic x [px]")
        ax.set_ylabel("mosaic y [px]")
        if im is not None:
            fig.colorbar(im, ax=ax, shrink=0.8)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        out[name] = buf.getvalue()
    return out


def write_png(ds: xr.Dataset, name: str, path: str | os.PathLike) -> Path:
    """Write a stored plot (``'starflat_png'`` or ``'residual_png'``) to a file."""
    if name not in ds:
        raise KeyError(
            f"name: {name!r} is not a plot of this group ({[v for v in ds if v.endswith('_png')]})"
        )
    path = Path(path)
    path.write_bytes(ds[name].values.astype(np.uint8).tobytes())
    return path


@task(name="bands-observed")
def bands_observed_task(store: str, nights: list[str] | None) -> list[str]:
    """Bands with catalogs among ``nights`` (every night with a catalog by default)."""
    have = [
        n for n in list_children(store, groups.NIGHTS) if group_exists(store, groups.catalog(n))
    ]
    wanted = have if nights is None else [n for n in have if n in nights]
    bands: set[str] = set()
    for night in wanted:
        bands.update(str(b) for b in read_group(store, groups.exposures(night)).band.values)
    return sorted(bands)
