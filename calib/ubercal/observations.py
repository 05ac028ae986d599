"""Observations and where they live: chunks of a night catalog, sources that map a
function over chunks, the reference catalog, identifier look-ups."""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

if TYPE_CHECKING:
    from calib.ubercal.normal import _Prepared


T = TypeVar("T")


@dataclass(frozen=True)
class ObservationChunk:
    """Observations of reference stars, as in a night catalog (docs/store.md).

    Attributes
    ----------
    expid, quadrant, source_id : ndarray, shape (n,), int64
    x, y : ndarray, shape (n,), pixels
        0-based data-section position of the star on its quadrant.
    mag_inst, mag_inst_err : ndarray, shape (n,), mag
        ``-2.5 log10(flux_e / EXPTIME)`` and its error.
    flags : ndarray, shape (n,), int, optional
        0 = good; anything else is ignored by the fit.
    """

    expid: np.ndarray
    quadrant: np.ndarray
    source_id: np.ndarray
    x: np.ndarray
    y: np.ndarray
    mag_inst: np.ndarray
    mag_inst_err: np.ndarray
    flags: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.expid)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if np.ndim(v) != 1 or len(v) != n:
                raise ValueError(
                    f"{f.name} must be one-dimensional with the length of expid ({n}), "
                    f"got shape {np.shape(v)}"
                )

    def __len__(self) -> int:
        return len(self.expid)

    @classmethod
    def from_mapping(
        cls, columns: dict, rows: np.ndarray | slice = slice(None)
    ) -> ObservationChunk:
        """Take the named columns (e.g. a night catalog's variables) at ``rows``."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n != "flags" and n not in columns]
        if missing:
            raise ValueError(f"columns: missing {missing}")
        return cls(**{n: np.asarray(columns[n])[rows] for n in names if n in columns})

    def split(self, size: int) -> list[ObservationChunk]:
        """Consecutive pieces of at most ``size`` observations."""
        return [self.take(slice(i, i + size)) for i in range(0, max(len(self), 1), size)]

    def take(self, rows: np.ndarray | slice) -> ObservationChunk:
        """The observations at ``rows``."""
        return ObservationChunk(
            expid=self.expid[rows],
            quadrant=self.quadrant[rows],
            source_id=self.source_id[rows],
            x=self.x[rows],
            y=self.y[rows],
            mag_inst=self.mag_inst[rows],
            mag_inst_err=self.mag_inst_err[rows],
            flags=None if self.flags is None else self.flags[rows],
        )


class ObservationSource(Protocol):
    """Where the observations live. ``map_reduce(fn)`` applies ``fn`` to every
    chunk of observations (in any process) and returns the sum (``+``) of the
    results; it may be called several times (one pass per outlier iteration)."""

    def map_reduce(self, fn: Callable[[ObservationChunk], T]) -> T: ...


@dataclass(frozen=True)
class InMemoryObservations:
    """An :class:`ObservationSource` over chunks held in this process."""

    chunks: Sequence[ObservationChunk | _Prepared]

    def map_reduce(self, fn: Callable[[ObservationChunk], T]) -> T:
        # Chunks indexed once by solve_ubercal (_Prepared) are taken by the pass
        # functions as they are.
        return functools.reduce(operator.add, (fn(c) for c in self.chunks))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ReferenceStars:
    """Reference-catalog magnitudes in the fitted band.

    Attributes
    ----------
    source_id : ndarray, shape (n_ref,), int64
    mag, mag_err : ndarray, shape (n_ref,), mag
        NaN where the catalog has none.
    bp_rp : ndarray, shape (n_ref,), mag
        Colour; NaN where missing.
    """

    source_id: np.ndarray
    mag: np.ndarray
    mag_err: np.ndarray
    bp_rp: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.source_id)
        for name in ("mag", "mag_err", "bp_rp"):
            if np.shape(getattr(self, name)) != (n,):
                raise ValueError(f"{name} must have shape ({n},) like source_id")


@dataclass(frozen=True)
class _Ids:
    expid: np.ndarray
    quadrant: np.ndarray
    source_id: np.ndarray

    def __add__(self, other: _Ids) -> _Ids:
        return _Ids(
            *(_unique(np.concatenate((a, b))) for a, b in zip(self.ids, other.ids, strict=True))
        )

    @property
    def ids(self) -> tuple[np.ndarray, ...]:
        return self.expid, self.quadrant, self.source_id


def _unique(values: np.ndarray) -> np.ndarray:
    """Sorted unique values; a plain sort is several times faster than
    ``np.unique``'s hashing on millions of int64 identifiers."""
    v = np.sort(np.asarray(values, dtype=np.int64))
    return v[np.concatenate(([True], v[1:] != v[:-1]))] if len(v) else v


def _chunk_ids(chunk: ObservationChunk) -> _Ids:
    return _Ids(_unique(chunk.expid), _unique(chunk.quadrant), _unique(chunk.source_id))


def _lookup(sorted_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_ids, values)
    pos = np.clip(pos, 0, max(len(sorted_ids) - 1, 0))
    if not len(sorted_ids):
        return np.full(len(values), -1, dtype=np.int64)
    return np.where(sorted_ids[pos] == values, pos, -1).astype(np.int64)
