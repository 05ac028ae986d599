"""Seed 000's table for our zero-point network and its baselines.

Simulates three survey domains with the simulator's feature mode (sim/zpsim.py),
builds features through the pipeline's feature code, splits by night, trains
AZP-RC, the image-only CNN and the no-telemetry ablation, fits the LUT and the
random forests, and prints for each on held-out nights: RMSE, MAE, Pearson r,
failure rate (|error| > 0.05 mag or no answer), 68/95 % interval coverage,
discordant-pair rate, latency per exposure at batch 1 (p50/p95) and throughput
at batch 256. Then the same by condition (few stars, clouds) and the
cross-domain rows: trained on domain A plus a small share of B, tested on C,
with and without domain adaptation.

    .venv/bin/python benchmarks/zp_network.py            # CPU, 32-px patches
    .venv/bin/python benchmarks/zp_network.py --device cuda --patch 256
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ml.zp_baselines import ForestBaseline, LUTBaseline, regression_metrics
from ml.zp_checkpoint import OnnxScorer, export_onnx
from ml.zp_features import FeatureSet, split_by_night
from ml.zp_model import AZPRC, AZPRCConfig
from ml.zp_train import TrainConfig, predict, train_zp_network
from sim.zpsim import DOMAINS, ZPExposure, simulate_zp_exposures
from tasks.zp import features_from_simulation

Predictor = Callable[[FeatureSet], tuple[np.ndarray, np.ndarray]]


def _simulate(args: argparse.Namespace) -> tuple[dict[str, FeatureSet], dict[str, np.ndarray]]:
    features, clouds = {}, {}
    for name, nights in (("A", args.nights_a), ("B", args.nights_b), ("C", args.nights_c)):
        exps: list[ZPExposure] = simulate_zp_exposures(
            DOMAINS[name],
            n_nights=nights,
            exposures_per_night=args.per_night,
            patch_px=args.patch,
            seed=args.seed,
        )
        t0 = time.perf_counter()
        features[name] = features_from_simulation(exps, patch_px=args.patch)
        per_exposure_ms = 1e3 * (time.perf_counter() - t0) / len(exps)
        print(
            f"domain {name}: features {per_exposure_ms:.1f} ms per exposure (common to all methods)"
        )
        clouds[name] = np.array([e.cloud_mag for e in exps])
    return features, clouds


def _latency(predict_fn: Predictor, features: FeatureSet, n_single: int) -> dict[str, float]:
    """Per-exposure latency at batch 1 (p50, p95) and throughput at batch 256."""
    single = []
    for k in range(min(n_single, len(features))):
        one = features.select(np.array([k]))
        t0 = time.perf_counter()
        predict_fn(one)
        single.append(time.perf_counter() - t0)
    big = features.select(np.resize(np.arange(len(features)), 256))
    predict_fn(big)
    t0 = time.perf_counter()
    predict_fn(big)
    dt = time.perf_counter() - t0
    return {
        "p50_ms": 1e3 * float(np.percentile(single, 50)),
        "p95_ms": 1e3 * float(np.percentile(single, 95)),
        "per_s_at_256": 256.0 / dt,
    }


def _torch_predictor(model: torch.nn.Module, device: str) -> Predictor:
    return lambda fs: predict(model, fs, device=device)  # type: ignore[arg-type]


def _row(name: str, m: dict[str, float], lat: dict[str, float] | None = None) -> str:
    lat = lat or {}
    fmt = lambda k, f: format(lat[k], f) if k in lat else "-"  # noqa: E731
    return (
        f"{name:<28} {m['rmse']:7.4f} {m['mae']:7.4f} {m['r']:6.3f} {100 * m['failure']:6.1f} "
        f"{100 * m['coverage68']:6.1f} {100 * m['coverage95']:6.1f} {100 * m['discordant']:6.1f} "
        f"{fmt('p50_ms', '8.2f')} {fmt('p95_ms', '8.2f')} {fmt('per_s_at_256', '9.0f')}"
    )


HEADER = (
    f"{'method':<28} {'RMSE':>7} {'MAE':>7} {'r':>6} {'fail%':>6} {'cov68':>6} {'cov95':>6} "
    f"{'disc%':>6} {'p50 ms':>8} {'p95 ms':>8} {'exp/s@256':>9}"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nights-a", type=int, default=60)
    ap.add_argument("--nights-b", type=int, default=40)
    ap.add_argument("--nights-c", type=int, default=20)
    ap.add_argument("--per-night", type=int, default=40)
    ap.add_argument("--patch", type=int, default=32, help="patch side (256 on GPU)")
    ap.add_argument("--cnn", type=int, nargs=2, default=(16, 32), help="CFE filters (64 128)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--share-b", type=float, default=0.1, help="share of B nights (cross-domain)")
    ap.add_argument("--out", type=Path, help="write the numbers as JSON here")
    ap.add_argument(
        "--latency-only",
        action="store_true",
        help="time AZP-RC (eager and ONNX) on a few nights, untrained: latency does not "
        "depend on the weights",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.latency_only:
        _latency_only(args)
        return

    t0 = time.perf_counter()
    features, clouds = _simulate(args)
    both = FeatureSet.concat([features["A"], features["B"]])
    cloud = np.concatenate([clouds["A"], clouds["B"]])
    train_m, val_m, test_m = split_by_night(both.night, seed=args.seed)
    train, val, test = both.select(train_m), both.select(val_m), both.select(test_m)
    print(
        f"simulated and featurised {sum(len(f) for f in features.values())} exposures in "
        f"{time.perf_counter() - t0:.1f} s; train {len(train)} / val {len(val)} / test "
        f"{len(test)} exposures ({len(set(train.night))}/{len(set(val.night))}/"
        f"{len(set(test.night))} nights), domains A+B; patch {args.patch} px; {args.device}"
    )
    tc = TrainConfig(epochs=args.epochs, device=args.device, seed=args.seed)
    base = AZPRCConfig(patch_px=args.patch, cnn_channels=tuple(args.cnn), n_domains=3)
    results: dict[str, dict] = {}
    predictors: dict[str, Predictor] = {}

    predictors["classical (same stars)"] = lambda fs: (fs.catalog_zp_mag, fs.catalog_zp_err_mag)
    lut = LUTBaseline().fit(train)
    predictors["LUT (telemetry, linear)"] = lut.predict
    rf = ForestBaseline(seed=args.seed).fit(train)
    predictors["RF (telemetry+image)"] = rf.predict
    rf_cat = ForestBaseline(with_catalog=True, seed=args.seed).fit(train)
    predictors["RF (+catalog zp)"] = rf_cat.predict
    variants = {
        "CNN (image only)": replace(base, use_catalog=False, use_telemetry=False),
        "AZP-RC, no telemetry": replace(base, use_telemetry=False),
        "AZP-RC": base,
    }
    models = {}
    for name, cfg in variants.items():
        trained = train_zp_network(cfg, train, val, tc)
        models[name] = trained.model
        predictors[name] = _torch_predictor(trained.model, args.device)
        print(
            f"  trained {name}: {trained.seconds:.0f} s, best epoch {trained.best_epoch}, "
            f"sigma scale {float(trained.model.sigma_scale):.2f}"
        )
    onnx_path = export_onnx(models["AZP-RC"], test, Path("/tmp/azprc_benchmark.onnx"))
    predictors["AZP-RC, ONNX (CPU)"] = OnnxScorer(onnx_path, threads=args.threads).predict

    print("\nHeld-out nights of domains A+B (mag):")
    print(HEADER)
    for name, fn in predictors.items():
        m = regression_metrics(*fn(test), test.target_mag)
        lat = _latency(fn, test, 200)
        results[name] = {"metrics": m, "latency": lat}
        print(_row(name, m, lat))
    # The classical zero point has no answer below 3 stars, and RMSE leaves
    # missing answers out: compare on the exposures it answers too.
    answered = np.isfinite(test.catalog_zp_mag)
    sub = test.select(answered)
    print(f"\non the {answered.sum()} exposures the classical zero point answers:")
    print(HEADER)
    results["classical_answers"] = {}
    for name in ("classical (same stars)", "RF (+catalog zp)", "AZP-RC"):
        m = regression_metrics(*predictors[name](sub), sub.target_mag)
        results["classical_answers"][name] = m
        print(_row(name, m))
    pred_onnx = predictors["AZP-RC, ONNX (CPU)"](test)[0]
    pred_eager = predictors["AZP-RC"](test)[0]
    print(f"ONNX vs eager: max |diff| {np.max(np.abs(pred_onnx - pred_eager)):.2e} mag")

    conditions = {
        "few stars (n < 10)": test.n_stars < 10,
        "cloudy (cloud > 0.1 mag)": cloud[test_m] > 0.1,
        "clear, >= 10 stars": (cloud[test_m] == 0) & (test.n_stars >= 10),
    }
    results["conditions"] = {}
    for label, mask in conditions.items():
        if mask.sum() < 5:
            continue
        sub = test.select(mask)
        print(f"\n{label}: {len(sub)} exposures")
        print(HEADER)
        results["conditions"][label] = {}
        for name in (
            "classical (same stars)",
            "LUT (telemetry, linear)",
            "RF (+catalog zp)",
            "AZP-RC",
        ):
            m = regression_metrics(*predictors[name](sub), sub.target_mag)
            results["conditions"][label][name] = m
            print(_row(name, m))

    # Cross-domain: A plus a small share of B's nights, tested on C.
    a, b = features["A"], features["B"]
    b_nights = np.unique(b.night)
    rng = np.random.default_rng(args.seed)
    share = rng.choice(b_nights, size=max(1, round(args.share_b * len(b_nights))), replace=False)
    mixed = FeatureSet.concat([a, b.select(np.isin(b.night, share))])
    tr, va, _ = split_by_night(mixed.night, fractions=(0.85, 0.15, 0.0), seed=args.seed)
    c = features["C"]
    print(f"\nCross-domain: train A + {len(share)} B nights, test C ({len(c)} exposures)")
    print(HEADER)
    results["cross_domain"] = {}
    rows = {"classical (same stars)": predictors["classical (same stars)"]}
    for label, alpha in (("AZP-RC, no adaptation", 0.0), ("AZP-RC + DANN (alpha 0.01)", 0.01)):
        trained = train_zp_network(
            base, mixed.select(tr), mixed.select(va), replace(tc, dann_alpha=alpha)
        )
        rows[label] = _torch_predictor(trained.model, args.device)
    lut_x = LUTBaseline().fit(mixed.select(tr))
    rows["LUT (telemetry, linear)"] = lut_x.predict
    for name, fn in rows.items():
        m = regression_metrics(*fn(c), c.target_mag)
        results["cross_domain"][name] = m
        print(_row(name, m))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def _latency_only(args: argparse.Namespace) -> None:
    exps = simulate_zp_exposures(
        DOMAINS["A"], n_nights=8, exposures_per_night=args.per_night, patch_px=args.patch
    )
    fs = features_from_simulation(exps, patch_px=args.patch)
    torch.manual_seed(args.seed)
    model = AZPRC(AZPRCConfig(patch_px=args.patch, cnn_channels=tuple(args.cnn))).eval()
    model = model.to(args.device)
    onnx_path = export_onnx(model.cpu(), fs, Path("/tmp/azprc_latency.onnx"))
    model = model.to(args.device)
    print(HEADER)
    metrics = {k: float("nan") for k in ("rmse", "mae", "r", "failure", "coverage68")}
    metrics |= {"coverage95": float("nan"), "discordant": float("nan")}
    for name, fn in (
        (f"AZP-RC, eager ({args.device})", _torch_predictor(model, args.device)),
        ("AZP-RC, ONNX (CPU)", OnnxScorer(onnx_path, threads=args.threads).predict),
    ):
        print(_row(name, metrics, _latency(fn, fs, 200)))


if __name__ == "__main__":
    main()
