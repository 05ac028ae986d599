"""Reduced products kept by the reduce stage (``--keep-reduced``) and read back
by the lightcurves stage (docs/store.md, docs/lightcurves.md).

``nights/<night>/reduced/<expid>``, dims (quadrant, y, x):

=============  =========  ============================================================
variable       dtype      content
=============  =========  ============================================================
fluence        float32    surface brightness x pixel area, e- (sky included)
variance       float32    its variance, e-^2 (photon + read noise, from the data)
mask           uint8      the reduction's mask bits (calib.reduce.MASK_BITS)
wcs            str        the data section's celestial WCS (TAN-SIP header cards)
read_noise_e   float64    per quadrant
gain           float64    per quadrant, e-/ADU
=============  =========  ============================================================

Chunks of 256 x 256 pixels per quadrant, so a stamp reads a few chunks, not the
exposure.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from calib.reduce import ReducedQuadrant
from tasks.io import groups
from tasks.io.store import StoreError, group_exists, list_children, list_groups, write_group

__all__ = [
    "KeptQuadrant",
    "ReducedExposure",
    "keep_quadrant",
    "open_reduced",
    "reduced_dataset",
    "reduced_exposures",
    "write_reduced",
]

CHUNK_PX = 256


@dataclass(frozen=True, eq=False)
class KeptQuadrant:
    """What the reduce stage keeps of one quadrant."""

    fluence: np.ndarray  # (ny, nx) float32, e-
    variance: np.ndarray  # (ny, nx) float32, e-^2
    mask: np.ndarray  # (ny, nx) uint8
    wcs_header: str  # data-section WCS, FITS header cards
    read_noise_e: float
    gain: float


def keep_quadrant(reduced: ReducedQuadrant, wcs: WCS) -> KeptQuadrant:
    """The fluence, its variance and mask, and the WCS of a reduced quadrant."""
    area = reduced.pixel_area
    return KeptQuadrant(
        fluence=(reduced.surface_brightness * area).astype(np.float32),
        variance=(reduced.variance * area * area).astype(np.float32),
        mask=reduced.mask.astype(np.uint8),
        wcs_header=wcs.to_header(relax=True).tostring(),
        read_noise_e=float(reduced.read_noise_e),
        gain=float(reduced.gain),
    )


def reduced_dataset(kept: dict[int, KeptQuadrant]) -> xr.Dataset:
    """The group content for one exposure's kept quadrants."""
    qs = sorted(kept)
    stack = lambda name: np.stack([getattr(kept[q], name) for q in qs])  # noqa: E731
    ds = xr.Dataset(
        {
            "fluence": (("quadrant", "y", "x"), stack("fluence")),
            "variance": (("quadrant", "y", "x"), stack("variance")),
            "mask": (("quadrant", "y", "x"), stack("mask")),
            "wcs": ("quadrant", np.array([kept[q].wcs_header for q in qs], dtype=object)),
            "read_noise_e": ("quadrant", np.array([kept[q].read_noise_e for q in qs])),
            "gain": ("quadrant", np.array([kept[q].gain for q in qs])),
        },
        coords={"quadrant": np.array(qs, dtype=np.int64)},
        attrs={
            "units": "fluence e- (not background-subtracted), variance e-^2",
            "mask_bits": "calib.reduce.MASK_BITS",
        },
    )
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    for name in ("fluence", "variance", "mask"):
        ds[name].encoding["chunks"] = (1, min(CHUNK_PX, ny), min(CHUNK_PX, nx))
    return ds


def write_reduced(
    store: str | os.PathLike,
    night: str,
    expid: int,
    kept: dict[int, KeptQuadrant],
    *,
    attrs: dict[str, Any] | None = None,
) -> str:
    """Write ``nights/<night>/reduced/<expid>``; returns the group name."""
    group = groups.reduced(night, expid)
    write_group(store, group, reduced_dataset(kept), attrs=attrs)
    return group


@dataclass(frozen=True, eq=False)
class ReducedExposure:
    """A kept exposure opened lazily: stamps read only the chunks they need."""

    night: str
    expid: int
    data: xr.Dataset

    @property
    def quadrants(self) -> np.ndarray:
        return self.data.quadrant.values

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.data.sizes["y"]), int(self.data.sizes["x"])

    def wcs(self, quadrant: int) -> WCS:
        text = str(self.data.wcs.sel(quadrant=quadrant).values)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            return WCS(fits.Header.fromstring(text), relax=True)

    def read_noise_e(self, quadrant: int) -> float:
        return float(self.data.read_noise_e.sel(quadrant=quadrant).values)

    def region(
        self, quadrant: int, x0: int, x1: int, y0: int, y1: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fluence, variance and mask of pixels ``[y0:y1, x0:x1]``, which must lie
        in the quadrant."""
        part = self.data[["fluence", "variance", "mask"]].sel(quadrant=quadrant)
        part = part.isel(y=slice(y0, y1), x=slice(x0, x1))
        return part.fluence.values, part.variance.values, part.mask.values


def open_reduced(store: str | os.PathLike, night: str, expid: int) -> ReducedExposure:
    """Open ``nights/<night>/reduced/<expid>`` lazily."""
    group = groups.reduced(night, expid)
    if not group_exists(store, group):
        raise StoreError(f"{store}: group {group!r} is missing or incomplete")
    # Lazily indexed without dask: a stamp read inside a task on a Dask worker
    # must not submit work to that worker's own cluster.
    ds = xr.open_zarr(str(store), group=group, consolidated=False, chunks=None)
    missing = {"fluence", "variance", "mask", "wcs", "read_noise_e"} - set(ds.variables)
    if missing:
        raise StoreError(
            f"{store}: {group} lacks {sorted(missing)}: it was kept by an older photocal "
            "that stored the fluence only; re-run reduce with --keep-reduced"
        )
    return ReducedExposure(night=night, expid=int(expid), data=ds)


def reduced_exposures(store: str | os.PathLike, nights: list[str] | None = None):
    """(night, expid) of every complete kept exposure, by night then expid."""
    out = []
    for night in list_children(store, groups.NIGHTS):
        if nights is not None and night not in nights:
            continue
        out += [(night, int(e)) for e in list_groups(store, groups.kept_reduced(night))]
    return sorted(out)
