"""Light-curve benchmark (seed 004): scene-modelling photometry against forced
photometry on difference images, on the same simulated transients.

Each target is a field observed ``--epochs`` times (sim.hosts.simulate_scene_epochs):
dithered, rotated images, seeing 1.8-3.2 px FWHM, transparency varying by 0.3 mag,
a transient with a light curve in a Sersic host, isolated stars around. Hosts
span faint to bright (total r 24 to 14.5 mag: surface brightness under the
transient from 28.5 to 19 mag/arcsec^2, against a sky of 20.9), peak magnitudes
(17-20.5) span S/N 5-100. Both methods get the same PSF models, measured on each image's
stars, and the same photometric scales (known, as ubercal's would be), and both
correct their flux scale with the stars measured by their own estimator:

- scene model (calib.scene): the stage's estimator on 13x13 stamps;
- classical (calib.forced): a reference from the baseline epochs resampled onto
  each epoch, PSF-matched (delta-basis kernel), subtracted, forced PSF photometry.

Printed: bias (inverse-variance mean of the fractional error at S/N >= 20), scatter
(robust rms of the fractional error), pull width and > 5 sigma outliers, by host
surface brightness and by S/N; epochs before the explosion (chi^2/N about zero);
CPU time per target and epoch (process time, one thread: PSF fits, star fits,
scene fit; and the classical method's). ``--pipeline`` also runs the stage
end to end (simulate the ``field`` preset with transients, reduce, ubercal,
``run_lightcurves``) and prints its pulls and time per target-epoch.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lightcurves.py`` (``--quick``
for a smoke run). The last line is
``lightcurves: <n> targets, bias <b> %, pull width <w>, <t> s per target-epoch``
(scene model, S/N >= 20; time from the scene model's path).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import numpy as np

from calib.fluxscale import measure_flux_scale
from calib.forced import ReferencePart, build_reference, difference_flux, resample
from calib.psf import fit_psf
from calib.scene import AffineMap, SceneFitOptions, SceneImage, fit_scene
from sim.hosts import SceneEpochsConfig, sersic_sb, simulate_scene_epochs

HALF = 6
N_BASELINE = 8
HOSTS = (24.0, 21.0, 19.0, 17.5, 16.0, 14.5)


def _stamp(ep, psf, amap, u, v, e, rn):
    x, y = amap(u, v)
    ix, iy = round(float(x)), round(float(y))
    ny, nx = ep.image.shape
    if ix - HALF < 0 or iy - HALF < 0 or ix + HALF >= nx or iy + HALF >= ny:
        return None
    sl = (slice(iy - HALF, iy + HALF + 1), slice(ix - HALF, ix + HALF + 1))
    return SceneImage(
        ep.image[sl],
        ep.variance[sl],
        np.ones((2 * HALF + 1,) * 2, bool),
        1.0,
        rn,
        ix - HALF,
        iy - HALF,
        psf,
        ep.alpha,
        amap,
        e,
    )


def _host_sb(cfg: SceneEpochsConfig) -> float:
    """Host surface brightness under the transient, mag/arcsec^2 (1"/px)."""
    dx, dy = -np.asarray(cfg.host_offset_px)
    c, s = math.cos(math.radians(cfg.host_pa_deg)), math.sin(math.radians(cfg.host_pa_deg))
    major, minor = dx * c + dy * s, -dx * s + dy * c
    r = math.hypot(major, minor / cfg.host_axis_ratio)
    return float(
        sersic_sb(cfg.host_mag, cfg.host_r_eff_px, cfg.host_sersic_n, cfg.host_axis_ratio, r)
    )


def scene_model(epochs, rn):
    """PSFs, calibration stars (their ratio per epoch), then the scene fit with
    the corrected scales: the stage's sequence."""
    psfs = [
        fit_psf(ep.image, ep.variance, ep.star_x, ep.star_y, fwhm_guess_px=2.5) for ep in epochs
    ]
    maps = [AffineMap(ep.matrix, ep.offset) for ep in epochs]
    n = len(epochs)
    su, sv = maps[0].inverse(epochs[0].star_x, epochs[0].star_y)
    flux, err = np.full((len(su), n), np.nan), np.full((len(su), n), np.nan)
    for k in range(len(su)):
        imgs = []
        for e, ep in enumerate(epochs):
            x, y = maps[e](su[k], sv[k])
            star_map = AffineMap(ep.matrix, np.array([float(x), float(y)]))
            img = _stamp(ep, psfs[e], star_map, 0.0, 0.0, e, rn)
            if img is not None:
                imgs.append(img)
        if len(imgs) >= 3:
            f = fit_scene(imgs, (0.0, 0.0), n_epochs=n, options=SceneFitOptions(galaxy=False))
            flux[k], err[k] = f.flux_njy, f.flux_err_stat_njy
    cat = epochs[0].star_flux_njy
    ratio, ratio_err, _ = measure_flux_scale(flux, err, cat, 1e-3 * cat).correction("auto")
    images = []
    for e, ep in enumerate(epochs):
        img = _stamp(ep, psfs[e], maps[e], 0.0, 0.0, e, rn)
        images.append(
            dataclasses.replace(
                img,
                alpha=img.alpha * ratio[e],
                alpha_err_mag=2.5 / math.log(10) * ratio_err[e] / ratio[e],
            )
        )
    fit = fit_scene(images, (0.3, -0.2), n_epochs=n, baseline=np.arange(n) < N_BASELINE)
    return fit.flux_njy, fit.flux_err_njy, psfs


def forced(epochs, rn):
    """Reference from the baseline epochs, then each epoch's difference."""
    maps = [AffineMap(ep.matrix, ep.offset) for ep in epochs]

    def pixel_map(src, dst):
        return lambda x, y: dst(*src.inverse(x, y))

    parts = [
        ReferencePart(
            epochs[e].image,
            epochs[e].variance,
            np.ones(epochs[e].image.shape, bool),
            pixel_map(maps[0], maps[e]),
            epochs[0].alpha / epochs[e].alpha,
        )
        for e in range(N_BASELINE)
    ]
    reference, ref_var, _ = build_reference(parts, epochs[0].image.shape)
    n = len(epochs)
    flux, err = np.full(n, np.nan), np.full(n, np.nan)
    star = np.full((len(epochs[0].star_x), n), np.nan)
    star_err = np.full_like(star, np.nan)
    su, sv = maps[0].inverse(epochs[0].star_x, epochs[0].star_y)
    for e, ep in enumerate(epochs):
        scale = ep.alpha / epochs[0].alpha
        r, _ = resample(reference, pixel_map(maps[e], maps[0]), ep.image.shape)
        rv, _ = resample(ref_var, pixel_map(maps[e], maps[0]), ep.image.shape, order=1)
        sx, sy = maps[e](su, sv)
        try:
            df = difference_flux(
                r * scale,
                rv * scale**2,
                ep.image,
                ep.variance,
                *map(float, ep.offset),
                read_noise_e=rn,
                kernel_min_peak_snr=10.0,
                star_x=sx,
                star_y=sy,
            )
        except ValueError:
            continue
        flux[e], err[e] = df.flux_e / ep.alpha, df.flux_err_e / ep.alpha
        star[:, e], star_err[:, e] = df.star_flux_e / ep.alpha, df.star_flux_err_e / ep.alpha
    cat = epochs[0].star_flux_njy
    ratio, _, _ = measure_flux_scale(star, star_err, cat, 1e-3 * cat).correction("auto")
    return flux / ratio, err / ratio


def _summary(rows, label):
    t = np.array([r[0] for r in rows])
    f = np.array([r[1] for r in rows])
    e = np.array([r[2] for r in rows])
    snr = np.array([r[3] for r in rows])
    ok = np.isfinite(f) & np.isfinite(e) & (e > 0)
    pull = (f - t) / e
    post = ok & (t > 0)
    hi = post & (snr >= 20)
    frac = np.where(t > 0, (f - t) / np.where(t > 0, t, 1.0), np.nan)
    w = 1.0 / np.square(e / np.where(t > 0, t, 1.0))
    bias = float(np.sum(w[hi] * frac[hi]) / np.sum(w[hi])) if hi.any() else float("nan")
    bias_err = float(1.0 / np.sqrt(np.sum(w[hi]))) if hi.any() else float("nan")
    scatter = (
        float(1.4826 * np.median(np.abs(frac[hi] - np.median(frac[hi]))))
        if hi.any()
        else float("nan")
    )
    pre = ok & (t == 0)
    return {
        "label": label,
        "n": int(post.sum()),
        "measured": float(ok.mean()) if len(ok) else float("nan"),
        "bias": bias,
        "bias_err": bias_err,
        "scatter": scatter,
        "pull_width": float(np.std(pull[post])) if post.any() else float("nan"),
        "outliers": float(np.mean(np.abs(pull[ok]) > 5)) if ok.any() else float("nan"),
        "pre_chi2_n": float(np.mean(pull[pre] ** 2)) if pre.any() else float("nan"),
    }


def _row(s):
    return (
        f"{s['label']:>22}  {s['n']:5d}  {100 * s['measured']:6.1f}  {100 * s['bias']:+6.2f} "
        f"+- {100 * s['bias_err']:4.2f}  {100 * s['scatter']:6.2f}  {s['pull_width']:6.2f}  "
        f"{100 * s['outliers']:6.1f}  {s['pre_chi2_n']:6.2f}"
    )


HEADER = (
    f"{'':>22}  {'n':>5}  {'meas%':>6}  {'bias % (S/N>=20)':>16}  {'scat%':>6}  "
    f"{'pullw':>6}  {'>5sig%':>6}  {'pre X2/N':>8}"
)


def run_synthetic(fields_per_host: int, n_epochs: int, seed0: int):
    rng = np.random.default_rng(seed0)
    out = {"smp": [], "forced": []}
    t_smp = t_forced = 0.0
    n_target_epochs = 0
    examples = []
    for h, host in enumerate(HOSTS):
        for k in range(fields_per_host):
            cfg = SceneEpochsConfig(
                n_epochs=n_epochs,
                host_mag=host,
                peak_mag=float(rng.uniform(17.0, 20.5)),
                explosion_epoch=N_BASELINE + 2.0,
            )
            epochs = simulate_scene_epochs(cfg, seed=seed0 + 100 * h + k)
            truth = np.array([ep.flux_njy for ep in epochs])
            sb = _host_sb(cfg)
            t0 = time.process_time()
            f, e, _ = scene_model(epochs, cfg.read_noise_e)
            t_smp += time.process_time() - t0
            t0 = time.process_time()
            ff, fe = forced(epochs, cfg.read_noise_e)
            t_forced += time.process_time() - t0
            n_target_epochs += n_epochs
            if k == 0:
                examples.append((host, sb, np.arange(n_epochs), truth, f, e, ff, fe))
            snr = truth / e
            for i in range(n_epochs):
                out["smp"].append((truth[i], f[i], e[i], snr[i], sb))
                out["forced"].append((truth[i], ff[i], fe[i], snr[i], sb))
            print(f"  host {host:4.1f} (SB {sb:4.1f}) field {k}: done", flush=True)
    out["examples"] = examples
    return out, t_smp / n_target_epochs, t_forced / n_target_epochs, len(HOSTS) * fields_per_host


def run_pipeline(n_targets: int, nights: int, seed: int):
    """The stage end to end on the field preset."""
    import tempfile
    from pathlib import Path

    from calib.ubercal import UbercalOptions
    from tasks.index import index_sequentially
    from tasks.io import groups
    from tasks.io.store import read_group
    from tasks.lightcurves import run_lightcurves
    from tasks.masters import build_masters_sequentially
    from tasks.reduce import ReduceConfig, reduce_night
    from tasks.simulate import simulate_survey
    from tasks.ubercal import UbercalStageConfig, run_ubercal_stage

    work = Path(tempfile.mkdtemp(prefix="lc-bench-"))
    res = simulate_survey(
        work / "sim", preset="field", seed=seed, nights=nights, transients=n_targets, jobs=1
    )
    store = str(work / "store.zarr")
    index_sequentially(str(res.raw), store)
    build_masters_sequentially(store)
    for night in res.nights:
        reduce_night(store, night, str(res.refcat), reduce_config=ReduceConfig(keep_reduced=True))
    opts = UbercalOptions(zp_mode="exposure", starflat=False, exposure_gradient=False)
    run_ubercal_stage(store, str(res.refcat), UbercalStageConfig(band="r", options=opts))
    t0 = time.process_time()
    summary = run_lightcurves(store, res.targets)
    cpu = time.process_time() - t0
    truth = read_group(res.truth, "transient_epochs")
    rows = {"smp": [], "forced": []}
    n_epochs = 0
    for name in summary:
        sel = truth.name.values == name
        tmap = dict(zip(truth.expid.values[sel].tolist(), truth.flux_njy.values[sel], strict=True))
        for group, key in ((groups.lightcurve, "smp"), (groups.lightcurve_forced, "forced")):
            lc = read_group(store, group(name))
            t = np.array([tmap[x] for x in lc.expid.values])
            if key == "smp":
                n_epochs += len(t)
                snr = t / lc.flux_njy_err.values
            for i in range(len(t)):
                rows[key].append(
                    (t[i], lc.flux_njy.values[i], lc.flux_njy_err.values[i], snr[i], 0)
                )
    return rows, cpu / max(n_epochs, 1), len(summary)


def _tables(out, title):
    print(f"\n{title}")
    print(HEADER)
    for key, label in (("smp", "scene model"), ("forced", "difference images")):
        print(_row(_summary(out[key], label)))
    print("\n  by host surface brightness under the transient (mag/arcsec^2)")
    print(HEADER)
    sbs = sorted({r[4] for r in out["smp"]})
    for sb in sbs:
        for key, label in (("smp", "SMP"), ("forced", "diff")):
            print(_row(_summary([r for r in out[key] if r[4] == sb], f"{label} SB {sb:4.1f}")))
    print("\n  by S/N of the scene model's flux")
    print(HEADER)
    for lo, hi in ((5, 10), (10, 20), (20, 50), (50, 1e9)):
        for key, label in (("smp", "SMP"), ("forced", "diff")):
            sel = [r for r in out[key] if r[0] > 0 and lo <= r[3] < hi]
            print(_row(_summary(sel, f"{label} S/N {lo}-{hi if hi < 1e9 else 'up'}")))


def plot(out, path: str) -> None:
    """Example light curves (faint, middle and bright host) and bias against the
    host's surface brightness, both methods: one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = out["examples"]
    picks = [ex[0], ex[len(ex) // 2], ex[-1]]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (host, sb, t, truth, f, e, ff, fe) in zip(axes[:3], picks, strict=True):
        t = np.asarray(t)
        ax.plot(t, truth / 1e3, "k-", lw=1, label="truth")
        ax.errorbar(t - 0.1, f / 1e3, e / 1e3, fmt="o", ms=3, label="scene model")
        ax.errorbar(
            t + 0.1, ff / 1e3, fe / 1e3, fmt="s", ms=3, alpha=0.7, label="difference images"
        )
        ax.axvspan(-0.5, N_BASELINE - 0.5, color="0.9", zorder=0)
        ax.set_title(
            f"host {host:.1f} mag, {sb:.1f} mag/arcsec$^2$ under the transient", fontsize=9
        )
        ax.set_xlabel("epoch (grey: baseline)")
        ax.set_ylabel("flux [$\\mu$Jy]")
    axes[0].legend(fontsize=8)
    ax = axes[3]
    sbs = sorted({r[4] for r in out["smp"]})
    for key, label, dx in (("smp", "scene model", -0.1), ("forced", "difference images", 0.1)):
        st = [_summary([r for r in out[key] if r[4] == sb], label) for sb in sbs]
        ax.errorbar(
            np.array(sbs) + dx,
            [100 * s["bias"] for s in st],
            [100 * s["bias_err"] for s in st],
            fmt="o-",
            label=label,
        )
    ax.axhspan(-1, 1, color="0.9", zorder=0)
    ax.axvline(20.9, color="0.5", ls=":", lw=1)
    ax.set_xlabel("host SB under the transient [mag/arcsec$^2$]; dotted: sky")
    ax.set_ylabel("bias at S/N >= 20 [%]")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fields", type=int, default=4, help="fields per host brightness")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--pipeline", action="store_true", help="also run the stage end to end")
    p.add_argument("--quick", action="store_true", help="1 field per host, 16 epochs")
    p.add_argument("--plot", help="write the example light curves and bias figure (PNG)")
    args = p.parse_args(argv)
    fields, epochs = (1, 16) if args.quick else (args.fields, args.epochs)
    print(f"synthetic fields: {len(HOSTS)} host brightnesses x {fields}, {epochs} epochs each")
    out, t_smp, t_forced, n_targets = run_synthetic(fields, epochs, args.seed)
    _tables(out, "1. Synthetic fields (PSFs measured, scales known)")
    if args.plot:
        plot(out, args.plot)
    print(
        f"\nCPU per target-epoch: scene model {t_smp:.3f} s, difference images {t_forced:.3f} s "
        f"(ratio {t_smp / t_forced:.2f})"
    )
    if args.pipeline:
        rows, t_stage, n_stage = run_pipeline(
            4 if not args.quick else 2, 8 if not args.quick else 5, 11
        )
        _tables(
            rows,
            f"2. The stage end to end: field preset, {n_stage} transients, ubercal zero points",
        )
        print(f"\nstage CPU per target-epoch (both methods, reads included): {t_stage:.3f} s")
    s = _summary(out["smp"], "smp")
    print(
        f"lightcurves: {n_targets} targets, bias {100 * s['bias']:+.2f} %, "
        f"pull width {s['pull_width']:.2f}, {t_smp:.3f} s per target-epoch"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
