"""Golden outputs of the per-night stages: run index, masters and reduce+photometry
on a simulated survey and keep every data variable of the groups they write, so a
refactor can be shown to change no output.

    .venv/bin/python tests/golden/pipeline_golden.py capture --preset tiny OUT.npz
    .venv/bin/python tests/golden/pipeline_golden.py compare --preset tiny OUT.npz [--rtol 1e-9]

``capture`` simulates the preset (seed 3, as the ``tiny_survey`` test fixture,
with its damaged files), runs the stages in one process and saves the arrays with
the versions of the numerical libraries that made them; ``compare`` runs again and
reports every variable that differs by more than ``rtol`` relative (NaN must meet
NaN, strings must be equal). ``tests/golden/test_golden.py`` compares the tiny
preset with the committed ``tiny_seed3.npz``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

SEED = 3
LIBRARIES = ("numpy", "scipy", "astropy", "photutils")
GROUP_PREFIXES = ("masters/bias", "masters/flat", "nights")


def library_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


def run_stages(raw: str, store: str, refcat: str) -> str:
    """index, masters, reduce+photometry in this process, default configurations."""
    from tasks.index import index_sequentially
    from tasks.masters import build_masters_sequentially
    from tasks.reduce import reduce_night

    nights = index_sequentially(raw, store)
    build_masters_sequentially(store)
    for night in sorted(n for n in nights if n[0].isdigit()):
        reduce_night(store, night, refcat, raw_root=raw)
    return store


def _groups(store: str) -> list[str]:
    """Every group under the compared prefixes that holds arrays."""
    import zarr

    root = zarr.open_group(store, mode="r")
    out: list[str] = []

    def walk(group, path: str) -> None:
        if any(True for _ in group.array_keys()) and path.startswith(GROUP_PREFIXES):
            out.append(path)
        for name, child in group.groups():
            walk(child, f"{path}/{name}" if path else name)

    walk(root, "")
    return sorted(out)


def collect(store: str) -> dict[str, np.ndarray]:
    """``'group:variable'`` -> values, for every data variable and coordinate."""
    from tasks.io.store import read_group

    arrays: dict[str, np.ndarray] = {}
    for group in _groups(store):
        ds = read_group(store, group)
        for name in [*ds.data_vars, *ds.coords]:
            values = np.asarray(ds[name].values)
            if values.dtype.kind in "OT":  # object or numpy's StringDType
                values = np.array(values.tolist(), dtype=str)
            arrays[f"{group}:{name}"] = values
    return arrays


def save(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    versions = np.array([f"{k}={v}" for k, v in library_versions().items()])
    np.savez_compressed(path, __versions__=versions, **arrays)


def load(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "__versions__"}
        versions = dict(str(v).split("=", 1) for v in data["__versions__"])
    return arrays, versions


ATOL = {"centroid_dx_px": 1e-9, "centroid_dy_px": 1e-9}
"""Absolute tolerances, by variable name, where a relative one means nothing:
the centroid offsets are differences of ~60 px positions and lie near 0
(0.0008 px), so the positions' last bits (7e-11 px on an AMD EPYC against the
copy's machine, 1e-12 relative) are 4e-9 of them."""


def differences(
    golden: dict[str, np.ndarray],
    fresh: dict[str, np.ndarray],
    *,
    rtol: float,
    atol: dict[str, float] | None = None,
) -> list[str]:
    """One line per variable that is missing, extra, reshaped or beyond ``rtol``
    (and beyond ``atol[name]`` where the variable's name, after the colon, has
    one)."""
    atol = atol or {}
    out = [f"{k}: missing from the new run" for k in sorted(set(golden) - set(fresh))]
    out += [f"{k}: new variable, not in the golden copy" for k in sorted(set(fresh) - set(golden))]
    for key in sorted(set(golden) & set(fresh)):
        a, b = golden[key], fresh[key]
        if a.shape != b.shape:
            out.append(f"{key}: shape {a.shape} -> {b.shape}")
            continue
        if a.dtype.kind in "USb" or b.dtype.kind in "USb":
            if not np.array_equal(a, b):
                out.append(f"{key}: {int(np.sum(a != b))} values differ")
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        nan_a, nan_b = np.isnan(a64), np.isnan(b64)
        if not np.array_equal(nan_a, nan_b):
            out.append(f"{key}: NaN at {int(np.sum(nan_a != nan_b))} other positions")
            continue
        ok = ~nan_a
        with np.errstate(invalid="ignore"):
            diff = np.abs(a64[ok] - b64[ok])
            scale = np.maximum(np.abs(a64[ok]), np.abs(b64[ok]))
            floor = atol.get(key.split(":")[-1], 0.0)
            bad = ~(diff <= np.maximum(rtol * scale, floor))  # inf - inf is NaN: bad unless equal
            bad &= a64[ok] != b64[ok]
        if bad.any():
            rel = np.max(np.where(scale[bad] > 0, diff[bad] / scale[bad], np.inf))
            n_bad, n = int(bad.sum()), int(ok.sum())
            out.append(f"{key}: {n_bad} of {n} values differ, max relative {rel:.2e}")
    return out


def run_preset(preset: str, workdir: str) -> dict[str, np.ndarray]:
    from tasks.simulate import simulate_survey

    sim_dir = Path(workdir) / "sim"
    if (sim_dir / "raw").is_dir():  # a kept --workdir: the same survey, not simulated again
        raw, refcat = sim_dir / "raw", sim_dir / "refcat.fits"
    else:
        sim = simulate_survey(sim_dir, preset=preset, seed=SEED, bad_files=True)
        raw, refcat = sim.raw, sim.refcat
    store = str(Path(workdir) / f"store-{os.getpid()}.zarr")
    run_stages(str(raw), store, str(refcat))
    return collect(store)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("capture", "compare"))
    p.add_argument("golden", help="the .npz golden copy")
    p.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    p.add_argument("--rtol", type=float, default=1e-9)
    p.add_argument("--workdir", default=None, help="keep the run here (default: a temp dir)")
    p.add_argument("--save", default=None, help="compare: also save the new run's arrays here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="photocal-golden-") as tmp:
        arrays = run_preset(args.preset, args.workdir or tmp)
    if args.action == "capture":
        save(args.golden, arrays)
        print(f"{args.golden}: {len(arrays)} arrays from the {args.preset} preset")
        return 0
    if args.save:
        save(args.save, arrays)
    golden, versions = load(args.golden)
    if versions != library_versions():
        print(f"note: golden made with {versions}, this run has {library_versions()}")
    diffs = differences(golden, arrays, rtol=args.rtol, atol=ATOL)
    for line in diffs:
        print(line)
    print(f"{len(golden)} golden arrays, {len(diffs)} differ beyond rtol {args.rtol:g}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
