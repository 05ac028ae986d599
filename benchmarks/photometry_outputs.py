"""The chain's outputs on the photometry benchmark's ZTF quadrant, saved from one
checkout and compared with another's: the check that a speed change changed no
output at ZTF size (the golden test covers the tiny preset).

    # outputs of a checkout (its calib, tasks and benchmarks/photometry.py):
    git archive <commit> | tar -x -C /tmp/old
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/photometry_outputs.py save /tmp/old /tmp/old.npz
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/photometry_outputs.py save . /tmp/new.npz
    .venv/bin/python benchmarks/photometry_outputs.py compare /tmp/old.npz /tmp/new.npz

Saved: every array and number of the reduced quadrant (``ReducedQuadrant``), of
its photometry (``QuadrantPhotometry``, the aperture correction's fields) and
the stage's quadrant QA. The comparison prints, per output, whether it is equal
bit for bit (NaN where NaN) and otherwise the largest relative difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _arrays(prefix: str, obj: Any) -> dict[str, np.ndarray]:
    """The ndarray and number fields of a dataclass (one level of nesting)."""
    out: dict[str, np.ndarray] = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            out |= _arrays(f"{prefix}.{field.name}", value)
        elif isinstance(value, np.ndarray | int | float | tuple):
            out[f"{prefix}.{field.name}"] = np.asarray(value)
    return out


def save(root: Path, out: Path) -> None:
    """Run the chain of the checkout at ``root`` on the benchmark quadrant."""
    sys.path[:0] = [str(root), str(root / "benchmarks")]
    import photometry as bench  # the checkout's benchmarks/photometry.py

    import calib
    from calib.photometry import catalog_positions
    from calib.photometry.qa import quadrant_qa
    from tasks.io.raw import read_quadrants

    if not Path(calib.__file__).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"calib imported from {calib.__file__}, not from {root}")
    with tempfile.TemporaryDirectory(prefix="photocal-outputs-") as tmp:
        q = bench.render_quadrant(20, 0, os.path.join(tmp, "quadrant.fits"))
        reduced, phot = bench.ours(q)
        (frame,) = read_quadrants(q["path"])
        _, x, y = catalog_positions(frame.wcs, q["ra"], q["dec"], frame.data.shape)
    qa = quadrant_qa(reduced, phot, x[phot.index], y[phot.index])
    arrays = _arrays("reduced", reduced) | _arrays("photometry", phot) | _arrays("qa", qa)
    np.savez(out, **arrays)
    print(f"{len(arrays)} outputs of {root} saved to {out}")


def compare(a_path: Path, b_path: Path) -> int:
    """Print each output's difference; returns the number of outputs that differ."""
    a, b = np.load(a_path), np.load(b_path)
    differ = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name:<44} only in {a_path if name in a else b_path}")
            differ += 1
            continue
        x, y = a[name], b[name]
        if x.shape != y.shape:
            print(f"{name:<44} shapes {x.shape} and {y.shape}")
            differ += 1
        elif np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            print(f"{name:<44} identical")
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                rel = np.abs(x - y) / np.maximum(np.abs(x), np.finfo(np.float64).tiny)
            print(f"{name:<44} differs: {np.sum(x != y)} of {x.size}, max relative "
                  f"{np.nanmax(rel):.2e}")  # fmt: skip
            differ += 1
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save")
    s.add_argument("root", type=Path, help="a checkout of photocal")
    s.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.command == "save":
        save(args.root, args.out)
    else:
        n = compare(args.a, args.b)
        print(f"outputs that differ: {n}")


if __name__ == "__main__":
    main()
