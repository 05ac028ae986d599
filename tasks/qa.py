"""QA plots (PNG) written beside the store: ``<store>.qa/<group>/<name>.png``,
a folder beside a local store, a prefix beside one on object storage
(``s3://bucket/photocal.zarr.qa/...``, with the store's credentials)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

QaPath = str | Path
"""Where a plot goes: a local path or an object-store URL."""


def qa_path(store: str | os.PathLike, group: str, name: str) -> QaPath:
    """Where the plot ``name`` of ``group`` goes: ``<store>.qa/<group>/<name>``
    (the local folder made)."""
    text = os.fspath(store).rstrip("/")
    if "://" in text:
        return f"{text}.qa/{group}/{name}"
    root = Path(text)
    folder = root.parent / f"{root.name}.qa" / group
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def _save(fig: Any, path: QaPath | IO[bytes]) -> None:
    """PNG to a local path, an object-store URL or an open binary file."""
    if isinstance(path, str) and "://" in path:
        import fsspec

        from tasks.io.objstore import storage_options

        with fsspec.open(path, "wb", **storage_options(path)) as fh:
            fig.savefig(fh, format="png", dpi=80)
    else:
        fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def plot_quadrant_maps(
    maps: Mapping[str, np.ndarray], path: QaPath, *, title: str, unit: str
) -> QaPath:
    """One panel per quadrant, a shared symmetric colour scale (robust 1-99 %)."""
    n = len(maps)
    cols = min(8, max(1, n))
    rows = math.ceil(n / cols)
    values = (
        np.concatenate([m[np.isfinite(m)].ravel() for m in maps.values()]) if n else np.zeros(1)
    )
    lim = float(np.nanpercentile(np.abs(values), 99)) if values.size else 1.0
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows + 0.6), squeeze=False)
    image = None
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (label, m) in zip(axes.flat, maps.items(), strict=False):
        image = ax.imshow(m, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(label, fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=unit)
    fig.suptitle(title)
    _save(fig, path)
    return path


def plot_histograms(
    samples: Mapping[str, np.ndarray],
    path: QaPath,
    *,
    title: str,
    xlabel: str,
    bins: int = 80,
    empty_note: str = "no data",
) -> QaPath:
    """Overlaid histograms (log counts), one per label."""
    finite = [s[np.isfinite(s)] for s in samples.values()]
    lo = min((np.percentile(s, 0.1) for s in finite if s.size), default=0.0)
    hi = max((np.percentile(s, 99.9) for s in finite if s.size), default=1.0)
    edges = np.linspace(lo, hi, bins + 1)
    counts = {
        label: np.histogram(s, bins=edges)[0] if s.size else np.zeros(bins, dtype=np.int64)
        for label, s in zip(samples, finite, strict=True)
    }
    return plot_binned_histograms(
        counts, edges, path, title=title, xlabel=xlabel, empty_note=empty_note
    )


def plot_binned_histograms(
    counts: Mapping[str, np.ndarray],
    edges: np.ndarray,
    path: QaPath,
    *,
    title: str,
    xlabel: str,
    empty_note: str = "no data",
) -> QaPath:
    """Overlaid histograms already binned on ``edges`` (log counts), one per label;
    labels without counts are left out."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for label, c in counts.items():
        if np.sum(c) > 0:
            ax.stairs(c, edges, label=label)
            drawn += 1
    if drawn:
        ax.set_yscale("log")
    else:
        ax.text(
            0.5,
            0.5,
            empty_note,
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pixels")
    ax.set_title(title)
    if 0 < drawn <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return path
