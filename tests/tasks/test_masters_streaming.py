"""Masters that stream: stacks are read from the FITS files in row bands, with the
same values as the in-memory combination, and a task's peak memory stays within
``MastersConfig.memory_budget_gb`` whatever the number of frames."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import xarray as xr

from calib.flats import LedStack, build_flat_quadrant
from calib.masters import combine_bands, combine_frames
from calib.overscan import subtract_overscan
from tasks.index import index_sequentially
from tasks.io.raw import read_quadrants, validate_file
from tasks.io.store import list_groups, read_group
from tasks.masters import MastersConfig, _FrameStack, _Headers, build_masters_sequentially


def test_streamed_bias_stack_equals_the_in_memory_combination(tiny_survey, tmp_path):
    store = str(tmp_path / "s.zarr")
    index_sequentially(str(tiny_survey.raw), store)
    night = next(n for n in list_groups(store, "index") if n[0].isdigit())
    idx = read_group(store, f"index/{night}")
    root, kinds = idx.attrs["raw_root"], zip(idx.path.values, idx.imagetyp.values, strict=True)
    paths = [f"{root}/{p}" for p, t in kinds if t == "BIAS"]
    config = MastersConfig(memory_budget_gb=1e-3)  # below the reserve: one row per band
    q = validate_file(paths[0]).quadrants[-1].quadrant
    stack = _FrameStack(paths, q, config, _Headers())
    assert stack.rows_per_band(config, bytes_per_pixel=0) == 1
    frames = [read_quadrants(p, quadrants=[q])[0] for p in paths]
    in_memory = np.stack([subtract_overscan(f.data, f.overscan, method="median") for f in frames])
    np.testing.assert_array_equal(stack.read(0, stack.shape[0]), in_memory)
    rows = stack.shape[0]
    streamed = combine_bands(stack.read, len(stack), stack.shape, rows_per_band=1)
    whole = combine_frames(in_memory)
    for name in ("center", "sigma", "uncertainty", "nframes"):
        np.testing.assert_array_equal(getattr(streamed, name), getattr(whole, name))
    assert rows > 1


def test_streamed_flat_equals_one_band(tmp_path):
    """The flat chain (normalisation, LED combination, residual scatter, daily
    ratios, dead pixels) band by band and in one band: identical."""
    rng = np.random.default_rng(2)
    ny, nx, n = 37, 29, 6
    bias = rng.normal(0, 2, (ny, nx)).astype(np.float32)
    hot = rng.uniform(size=(ny, nx)) < 0.01
    response = (1 + 0.02 * rng.standard_normal((ny, nx))).astype(np.float32)
    response[3, 4] = 0.2  # a dead pixel
    leds = []
    for led in range(2):
        level = 20000.0 * (1 + 0.3 * led)
        frames = bias + rng.poisson(level * response, (n, ny, nx)).astype(np.float32) / 1.5
        frames[2, 5, 5] += 5000  # a cosmic ray
        leds.append((frames, np.full(n, level * (1 + 0.01 * rng.standard_normal())),
                     np.array([0, 0, 1, 1, 1, 2])))  # fmt: skip

    def build(rows):
        stacks = [LedStack(read=lambda r0, r1, f=f: f[:, r0:r1], levels_e=lv, nights=nt)
                  for f, lv, nt in leds]  # fmt: skip
        return build_flat_quadrant(stacks, bias_adu=bias, hot=hot, gain=1.5, n_nights=3,
                                   rows_per_band=rows)  # fmt: skip

    one, banded = build(ny), build(4)
    for name in ("flat", "uncertainty", "nframes", "defects", "residual_sigma",
                 "ratio_median", "ratio_rms", "ratio_outlier_fraction", "ratio_hist"):  # fmt: skip
        np.testing.assert_array_equal(getattr(banded, name), getattr(one, name), err_msg=name)
    assert (one.good_sum, one.good_count, one.n_dead) == (banded.good_sum, banded.good_count,
                                                          banded.n_dead)  # fmt: skip
    assert one.defects[3, 4] & 2  # the dead pixel is found
    assert np.isfinite(one.ratio_median).all()


def test_masters_stage_streamed_in_one_row_bands_equals_default(tiny_survey, tmp_path):
    """The whole masters stage with a budget that forces one-row bands writes the
    groups the default (one band per quadrant on tiny) writes."""
    groups = {}
    for name, budget in (("default", 2.0), ("rows", 1e-3)):
        store = str(tmp_path / f"{name}.zarr")
        index_sequentially(str(tiny_survey.raw), store)
        build_masters_sequentially(store, config=MastersConfig(memory_budget_gb=budget))
        groups[name] = {
            g: read_group(store, g)
            for prefix in ("masters/bias", "masters/flat/r")
            for g in (f"{prefix}/{p}" for p in list_groups(store, prefix))
        }
    assert groups["default"].keys() == groups["rows"].keys()
    assert groups["default"]
    for g, ds in groups["default"].items():
        xr.testing.assert_equal(ds, groups["rows"][g])


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np

    def peak_rss():  # this process's high-water mark since the reset below
        with open("/proc/self/status") as status:
            line = next(x for x in status if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    from astropy.io import fits

    folder, n, size, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    rng = np.random.default_rng(0)
    paths = []
    for k in range(n):
        primary = fits.PrimaryHDU()
        for key, value in (("IMAGETYP", "BIAS"), ("EXPID", 1000 + k), ("MJD-OBS", 60000.0 + k),
                           ("DATE-OBS", "2023-02-25T00:00:00"), ("EXPTIME", 0.0)):
            primary.header[key] = value
        pixels = rng.normal(1000, 5, (size, size + 16)).astype(np.uint16)
        pixels[:, size:] -= 10  # the overscan sits 10 ADU below the data
        ext = fits.ImageHDU(pixels, name="CCD01_Q1")
        for key, value in (("CCD_ID", 1), ("QID", 1), ("GAIN", 1.5), ("RDNOISE", 8.0),
                           ("SATURATE", 60000.0), ("DATASEC", f"[1:{size},1:{size}]"),
                           ("BIASSEC", f"[{size + 1}:{size + 16},1:{size}]"),
                           ("DETSEC", f"[1:{size},1:{size}]")):
            ext.header[key] = value
        path = f"{folder}/bias{k:03d}.fits"
        fits.HDUList([primary, ext]).writeto(path)
        paths.append(path)
        del pixels, ext
    from tasks.masters import MastersConfig, _FrameStack, _Headers, _combine
    import gc; gc.collect()
    # Not getrusage: its ru_maxrss survives exec, so a child of a large pytest
    # process starts with the parent's peak. The kernel resets VmHWM on request.
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = peak_rss()
    config = MastersConfig(memory_budget_gb=budget)
    stack = _FrameStack(paths, 0, config, _Headers())
    master = _combine(stack, config)
    peak = peak_rss()
    print(json.dumps({"before": before, "peak": peak, "stack": n * size * size * 4,
                      "mean": float(np.nanmean(master.center))}))
    """
)


def test_memory_budget_is_honoured_for_a_stack_larger_than_it(tmp_path):
    """120 frames of 1024 x 1024 (a 480 MB float32 stack) under a 0.6 GB budget:
    the process's peak RSS (VmHWM, interpreter and libraries included) stays
    within the budget, where holding the stack alone would exceed it."""
    n, size, budget_gb = 120, 1024, 0.6
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path), str(n), str(size), str(budget_gb)],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["stack"] + r["before"] > budget_gb * 1e9  # the stack would not fit
    assert r["peak"] <= budget_gb * 1e9, r
    # The master is the data's level above the overscan, 10 ADU (to the noise of
    # 1024^2 pixels' means of 120 frames, ~1e-3 ADU, plus integer rounding).
    assert abs(r["mean"] - 10.0) < 0.1
    print(f"peak RSS {r['peak'] / 1e9:.3f} GB (after imports {r['before'] / 1e9:.3f} GB) for a "
          f"{r['stack'] / 1e9:.2f} GB stack")  # fmt: skip
