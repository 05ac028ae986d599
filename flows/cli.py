"""The ``photocal`` command line: simulate, run, report, demo, serve, store, config, ingest."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Quiet, patient defaults for the embedded mode; an operator's environment wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
os.environ.setdefault("DASK_DISTRIBUTED__WORKER__DAEMON", "False")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")  # and the client's: no first-run notice

from typing import TYPE_CHECKING

from flows.console import ProgressBars, quiet_console
from sim.config import INSTRUMENTS, PRESETS
from tasks.io import groups

if TYPE_CHECKING:
    from tasks.config import PhotocalConfig


def _night(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"night {text!r} is not a YYYY-MM-DD date") from None


def _stages(text: str) -> list[str]:
    from flows.pipeline import STAGES

    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise argparse.ArgumentTypeError(
            f"unknown stage(s) {unknown or text!r}; available: {','.join(STAGES)}"
        )
    return stages


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {value}")
    return value


def _add_nights(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--night",
        dest="nights",
        action="append",
        type=_night,
        metavar="YYYY-MM-DD",
        help=help_text,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="photocal", description="Nightly photometric calibration of a wide-field survey."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print Prefect's per-task log lines and library warnings (they always "
        "reach the Prefect API)",
    )

    p = sub.add_parser(
        "simulate",
        parents=[common],
        help="simulate a survey: raw FITS, reference catalog, truth store",
    )
    p.add_argument("out", type=Path, help="output directory (raw/, refcat.fits, truth.zarr)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument(
        "--nights", type=_positive, default=None, help="number of nights (preset default)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--domain",
        choices=sorted(INSTRUMENTS),
        default="A",
        help="instrument domain (B: different gain, PSF, throughput)",
    )
    p.add_argument(
        "--jobs",
        type=_positive,
        default=min(2, os.cpu_count() or 1),
        help="processes rendering exposures",
    )
    p.add_argument(
        "--bad-files",
        action="store_true",
        help="also write one damaged raw file of each kind under raw/damaged/",
    )
    p.add_argument(
        "--transients",
        type=_positive,
        default=None,
        help="add N transients with light curves in host galaxies (truth in truth.zarr, "
        "targets in OUT/targets.ecsv); without it the preset is unchanged",
    )

    p = sub.add_parser("run", parents=[common], help="run pipeline stages through the Prefect flow")
    p.add_argument("--store", required=True, help="Zarr store path or fsspec URL")
    p.add_argument("--raw", help="raw FITS root (searched recursively); needed by 'index'")
    p.add_argument(
        "--refcat",
        type=Path,
        help="reference catalog (FITS or ECSV); needed by reduce, photometry, ubercal, "
        "train and score",
    )
    _add_nights(p, "observing night by its evening date (repeatable; default: all found)")
    p.add_argument(
        "--stages",
        type=_stages,
        default=None,
        metavar="STAGE,...",
        help="comma-separated stages of index,masters,reduce,photometry,ubercal,lightcurves,train,"
        "score,transients, in any order: they always run in that order (default: "
        "index,masters,reduce,photometry)",
    )
    p.add_argument(
        "--targets",
        type=Path,
        help="targets table (ECSV, CSV or FITS: name, ra, dec [deg], optional "
        "no_flux_before/no_flux_after [MJD]); needed by 'lightcurves'",
    )
    p.add_argument(
        "--checkpoint",
        help="zero-point network checkpoint directory for train/score "
        "(default: models/azprc beside the store)",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="TOML configuration, one table per stage ([masters], [photometry], [ubercal], "
        "[zp], ...): `photocal config template` writes one, `photocal config show` resolves it",
    )
    p.add_argument(
        "--zp-config",
        type=Path,
        help="deprecated: JSON of the [zp] table; put it in --config instead",
    )
    p.add_argument(
        "--site-longitude",
        type=float,
        default=None,
        metavar="DEG",
        help="east-positive site longitude in degrees (default: -116.865, Palomar)",
    )
    p.add_argument(
        "--keep-reduced",
        action="store_true",
        help="also store the reduced (fluence) images: large, off by default",
    )
    p.add_argument(
        "--no-overwrite",
        dest="overwrite",
        action="store_false",
        help="keep groups that are already complete (resume an interrupted run)",
    )
    p.add_argument(
        "--cluster",
        default="local",
        help="cluster spec: local, slurm, kubernetes (infra/clusters/) or a YAML path",
    )
    p.add_argument(
        "--cluster-option",
        dest="cluster_options",
        action="append",
        metavar="KEY=VALUE",
        help="site value over the spec's (repeatable): queue=debug, cores=8, memory=32GB, "
        "walltime=04:00:00, adapt.maximum_jobs=20",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--dask-address", help="tcp://HOST:PORT of a running dask scheduler")
    where.add_argument(
        "--workers", type=_positive, help="workers of the local Dask cluster (default 2)"
    )

    _add_config_parser(sub)
    _add_ingest_parser(sub)

    p = sub.add_parser(
        "report",
        parents=[common],
        help="static HTML QA report of a store: index.html and a page per night",
    )
    p.add_argument("store", help="Zarr store path or fsspec URL")
    p.add_argument(
        "--out",
        required=True,
        help="output directory (created), or an object-store prefix such as s3://bucket/report",
    )
    _add_nights(p, "night to report, by its evening date (repeatable; default: every night)")

    p = sub.add_parser(
        "serve",
        parents=[common],
        help="local production stack: prefect server, work pool, worker, deployments",
    )
    p.add_argument("--port", type=_port, default=4200, help="server (API and UI) port on 127.0.0.1")
    p.add_argument(
        "--no-worker",
        dest="worker",
        action="store_false",
        help="register deployments but start no worker",
    )

    from flows.store_cli import add_store_parser

    add_store_parser(sub)

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="simulate a small survey, run the pipeline on it and write its QA report",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--workdir", type=Path, default=Path("work/demo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=_positive, default=2)
    return parser


def cmd_simulate(args: argparse.Namespace) -> int:
    from sim.config import make_config
    from sim.survey import Survey
    from tasks.simulate import simulate_survey

    cfg = make_config(
        args.preset,
        seed=args.seed,
        nights=args.nights,
        domain=args.domain,
        transients=args.transients,
    )
    with ProgressBars() as bars:
        advance = bars.counter("simulate", len(Survey(cfg).exposures), "exposures")
        res = simulate_survey(
            args.out, cfg, jobs=args.jobs, bad_files=args.bad_files, progress=advance
        )
    print(
        f"simulated {res.n_files} exposures over nights {', '.join(res.nights)} "
        f"in {res.wall_s:.1f} s"
    )
    print(f"  raw:    {res.raw}")
    print(f"  refcat: {res.refcat} ({res.n_refcat} stars)")
    print(f"  truth:  {res.truth}")
    if res.targets is not None:
        print(f"  targets: {res.targets}")
    for kind, path in res.bad_files.items():
        print(f"  damaged ({kind}): {path}")
    return 0


def run_pipeline(
    *,
    store: str,
    raw: str | None,
    nights: list[str] | None,
    stages: list[str] | None,
    site_longitude: float | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
    cluster: str = "local",
    cluster_options: dict | None = None,
    overwrite: bool = True,
    refcat: str | None = None,
    keep_reduced: bool = False,
    checkpoint: str | None = None,
    config: PhotocalConfig | None = None,
    targets: str | None = None,
) -> dict:
    from flows.api import prefect_api
    from flows.pipeline import photocal_run
    from flows.runners import make_task_runner
    from tasks.config import load_config
    from tasks.io.objstore import use_store_config
    from tasks.progress import listening

    flags: dict[str, dict] = {"reduce": {"keep_reduced": True}} if keep_reduced else {}
    if site_longitude is not None:
        flags["index"] = {"site_longitude_deg": site_longitude}
    resolved = load_config(config, overrides=flags)
    # [store] stays out of the flow's parameters (it may name credentials): it
    # reaches this process and the workers it starts through the environment.
    use_store_config(resolved["store"])
    runner = make_task_runner(
        dask_address=dask_address,
        workers=workers,
        cluster=cluster,
        cluster_options=cluster_options,
    )
    with prefect_api(), ProgressBars() as bars, listening(bars, remote=True):
        return photocal_run.with_options(task_runner=runner)(
            store=store,
            raw=raw,
            nights=nights,
            stages=stages,
            overwrite=overwrite,
            refcat=refcat,
            checkpoint=checkpoint,
            config=resolved.as_dict(),
            targets=targets,
        )


def print_summary(summary: dict) -> None:
    print(f"store: {summary['store']}")
    for night, counts in summary["nights"].items():
        parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        print(f"  {groups.index(night)}: {parts}")
    if summary["rejected"]:
        print(f"rejected files ({len(summary['rejected'])}):")
        for path, reason in summary["rejected"]:
            print(f"  {path}: {reason}")
    for group, s in summary.get("masters", {}).items():
        print(f"  {group}: {_describe_master(s)}")
    if summary.get("skipped"):
        print(f"kept (already complete): {', '.join(summary['skipped'])}")
    print_missing(summary.get("missing", []))
    for band, result in summary.get("ubercal", {}).items():
        stats = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        print(f"  {groups.ubercal(band)}: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
        if "model" in result:
            print(f"  {groups.ubercal(band)} model: {result['model']}")
    for night, counts in summary.get("photometry", {}).items():
        parts = ", ".join(f"{k} {v}" for k, v in counts.items())
        print(f"  {groups.catalog(night)}: {parts}")
    for name, lc in (summary.get("lightcurves") or {}).items():
        fit = ", ".join(
            f"{b} chi2/dof {r['chi2_dof']:.2f}"
            if r.get("chi2_dof") is not None
            else f"{b} {r['error']}"
            for b, r in lc["bands"].items()
        )
        print(
            f"  {groups.lightcurve(name)}: {lc['measured']} of {lc['epochs']} epochs measured "
            f"({fit})"
        )
    zp = summary.get("zp") or {}
    if "train" in zp:
        m = zp["train"]["metrics"]
        ours, classical = m["azprc_where_classical_answers"], m["classical"]
        verdict = "better than" if ours["rmse"] < classical["rmse"] else "NOT better than"
        print(
            f"  zero-point network -> {zp['train']['checkpoint']}: on held-out nights it is "
            f"{verdict} the classical zero point of the same stars: rmse {ours['rmse']:.4f} "
            f"against {classical['rmse']:.4f} mag where the classical answers "
            f"({classical['valid']:.1%} of {classical['n']} exposures; "
            f"{m['azprc']['rmse']:.4f} over all), 68/95 % intervals cover "
            f"{ours['coverage68']:.0%}/{ours['coverage95']:.0%}"
        )
    for night, s in (zp.get("score") or {}).items():
        print(f"  {groups.scores(night)}: {s['exposures']} exposures")


def print_missing(missing: list[dict], file=None) -> None:
    """The stage-nights skipped because their input is missing, with the reason."""
    if missing:
        print(f"skipped, input missing ({len(missing)}):", file=file)
    for m in missing:
        print(f"  {m['stage']} on {m['night']}: {m['group']} {m['reason']}", file=file)


def _describe_master(s: dict) -> str:
    if "normalisation" in s:
        return (
            f"{s['n_defects']} defect pixels ({s['n_dead']} dead); daily/master flat ratio "
            f"rms <= {s['ratio_rms_max']:.4f}, outliers <= {s['ratio_outlier_fraction_max']:.2%}"
        )
    text = f"{s['nframes']} frames, {s['n_hot']} hot pixels"
    if s.get("is_reference"):
        return text + ", stability reference"
    flagged = s.get("flagged_quadrants") or []
    state = f"UNSTABLE in quadrants {flagged}" if flagged else "stable"
    return (
        text + f"; vs reference: mean delta {s['mean_delta_adu']:+.3f} ADU, "
        f"outliers <= {s['max_outlier_fraction']:.2%}, {state}"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from flows.pipeline import NIGHTLY_STAGES
    from tasks.config import ConfigError
    from tasks.inputs import MissingInputError
    from tasks.io.store import StoreError

    stages = args.stages or list(NIGHTLY_STAGES)
    if "index" in stages and args.raw is None:
        print("photocal run: --raw is required for the index stage", file=sys.stderr)
        return 2
    if {"reduce", "photometry", "ubercal", "train", "score"} & set(stages) and args.refcat is None:
        print(
            "photocal run: --refcat is required for the photometry, ubercal, train and "
            "score stages",
            file=sys.stderr,
        )
        return 2
    if "lightcurves" in stages and args.targets is None:
        print("photocal run: --targets is required for the lightcurves stage", file=sys.stderr)
        return 2
    from flows.runners import parse_cluster_options

    try:
        config = _run_config(args)
        cluster_options = parse_cluster_options(args.cluster_options)
    except (ConfigError, ValueError) as err:
        print(f"photocal run: {err}", file=sys.stderr)
        return 2
    try:
        summary = run_pipeline(
            store=args.store,
            raw=args.raw,
            nights=args.nights,
            stages=stages,
            site_longitude=args.site_longitude,
            dask_address=args.dask_address,
            workers=args.workers,
            cluster=args.cluster,
            cluster_options=cluster_options,
            overwrite=args.overwrite,
            refcat=None if args.refcat is None else str(args.refcat),
            keep_reduced=args.keep_reduced,
            checkpoint=args.checkpoint,
            config=config,
            targets=None if args.targets is None else str(args.targets),
        )
    except MissingInputError as err:
        if err.summary is not None:
            print_summary({**err.summary, "missing": []})
        print("photocal run: requested work could not be done:", file=sys.stderr)
        print_missing(err.missing, file=sys.stderr)
        return 1
    except ConfigError as err:
        print(f"photocal run: {err}", file=sys.stderr)
        return 2
    except StoreError as err:
        print(f"photocal run: {err}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


def _run_config(args: argparse.Namespace) -> PhotocalConfig:
    """--config, with the deprecated --zp-config folded into its [zp] table."""
    import json

    from tasks.config import ConfigError, load_config

    overrides = {}
    if args.zp_config is not None:
        print(
            "photocal run: --zp-config is deprecated: put these settings in the [zp] table "
            "of --config (`photocal config template --stage zp`)",
            file=sys.stderr,
        )
        try:
            overrides["zp"] = json.loads(args.zp_config.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(str(args.zp_config), [f"cannot be read as JSON: {err}"]) from None
    return load_config(args.config, overrides=overrides)


def cmd_report(args: argparse.Namespace) -> int:
    from tasks.report.html import write_report

    try:
        files = write_report(args.store, args.out, args.nights)
    except ValueError as err:
        print(f"photocal report: {err}", file=sys.stderr)
        return 2
    print(f"QA report of {len(files.pages)} night(s): {files.index}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.pipeline import NIGHTLY_STAGES
    from sim.config import make_config
    from sim.survey import Survey
    from tasks.config import load_config
    from tasks.io.truth import score_ubercal
    from tasks.report.html import write_report
    from tasks.simulate import simulate_survey

    work = args.workdir
    t0 = time.perf_counter()
    print(f"[1/3] simulating the '{args.preset}' survey into {work} ...", flush=True)
    cfg = make_config(args.preset, seed=args.seed)
    with ProgressBars() as bars:
        res = simulate_survey(
            work / "sim",
            cfg,
            jobs=min(args.workers, os.cpu_count() or 1),
            bad_files=True,
            progress=bars.counter("simulate", len(Survey(cfg).exposures), "exposures"),
        )
    print(
        f"      {res.n_files} exposures + {len(res.bad_files)} damaged files, nights "
        f"{', '.join(res.nights)}, {res.n_refcat} reference stars ({res.wall_s:.1f} s)"
    )
    print("[2/3] running the pipeline (Prefect flow on a local Dask cluster) ...", flush=True)
    t1 = time.perf_counter()
    store = work / "photocal.zarr"
    summary = run_pipeline(
        store=str(store),
        raw=str(res.raw),
        nights=None,
        stages=[*NIGHTLY_STAGES, "ubercal", "train", "score"],
        workers=args.workers,
        refcat=str(res.refcat),
        # A demo-sized training set: the survey's nights plus 30 simulated
        # nights of each domain (the deployment's default is 40).
        config=load_config({"zp": {"sim_nights": 30, "epochs": 30}}),
    )
    print(f"      done in {time.perf_counter() - t1:.1f} s")
    print_summary(summary)
    print(f"truth store for scoring: {res.truth}")
    for band in summary.get("ubercal", {}):
        sc = score_ubercal(store, res.truth, band)
        print(
            f"  {groups.ubercal(band)} zero points vs the simulator's truth ({sc['n']}): "
            f"offset {sc['offset_mmag']:+.1f} mmag, rms about it {sc['rms_centred_mmag']:.1f} "
            f"mmag, own errors {sc['err_median_mmag']:.1f} mmag (median), "
            f"pull rms {sc['pull_rms']:.2f}"
        )
    print("[3/3] writing the QA report ...", flush=True)
    report = write_report(store, work / "report")
    print(f"      open {report.index} (a page per night, no server needed)")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import check_port_free, deployments, local_stack

    try:
        check_port_free(args.port)
    except RuntimeError as err:
        print(f"photocal serve: {err}", file=sys.stderr)
        return 2
    with local_stack(port=args.port, start_worker=args.worker) as stack:
        ui = stack.api_url.removesuffix("/api")
        worker = "a worker" if args.worker else "no worker (--no-worker)"
        print(f"Prefect server and UI: {ui} (loopback only); work pool 'photocal' with {worker}")
        print("deployments:")
        for name, schedule in deployments():
            print(f"  {name}" + (f" ({schedule})" if schedule else ""))
        print("Data and cluster come from PHOTOCAL_* variables (see README). Ctrl-C stops.")
        try:
            stack.server.wait()
        except KeyboardInterrupt:
            print("stopping")
    return 0


def _add_config_parser(sub) -> None:
    p = sub.add_parser(
        "config", help="the configuration: resolved values with descriptions, or a template"
    )
    p.add_argument(
        "action", choices=["show", "template"], help="show: resolved; template: defaults"
    )
    p.add_argument("--config", type=Path, help="TOML configuration to resolve (show)")
    p.add_argument("--stage", action="append", dest="tables", help="only this table (repeatable)")


def cmd_config(args: argparse.Namespace) -> int:
    from tasks.config import ConfigError, load_config, render_toml

    try:
        config = load_config(args.config if args.action == "show" else None)
        text = render_toml(config, tables=args.tables, show_defaults=args.action == "show")
    except ConfigError as err:
        print(f"photocal config: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


def _add_ingest_parser(sub) -> None:
    p = sub.add_parser(
        "ingest",
        help="external per-observation photometry (FITS, ECSV, CSV, Parquet) into "
        "nights/<night>/catalog and exposures",
    )
    p.add_argument("table", type=Path, help="the photometry table")
    p.add_argument("--store", required=True, help="Zarr store path or fsspec URL")
    p.add_argument("--band", required=True, choices=["g", "r", "i"], help="band of every row")
    p.add_argument(
        "--refcat",
        type=Path,
        required=True,
        help="reference catalog: stars are checked (or matched by ra/dec) against it",
    )
    p.add_argument("--night", type=_night, help="night of every row (default: from mjd/date_obs)")
    p.add_argument(
        "--column",
        action="append",
        metavar="NAME=COL",
        help="the table's column for a contract name (repeatable): expid, source_id, ra, dec, "
        "x, y, quadrant, flux, flux_err, mag, mag_err, exptime, mjd, date_obs, airmass, flags",
    )
    p.add_argument(
        "--set",
        action="append",
        dest="constants",
        metavar="NAME=VALUE",
        help="a constant for the whole table (repeatable), e.g. quad_nx=2048 exptime=30",
    )
    p.add_argument("--config", type=Path, help="TOML configuration ([ingest], [photometry])")
    p.add_argument(
        "--site-longitude", type=float, default=None, help="east-positive degrees (night)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace nights that already have a catalog"
    )


def cmd_ingest(args: argparse.Namespace) -> int:
    from tasks.config import ConfigError, load_config
    from tasks.ingest import IngestError, ingest_summary_lines, ingest_table, parse_assignments
    from tasks.io.objstore import use_store_config
    from tasks.io.raw import RawFileError

    try:
        overrides = (
            {}
            if args.site_longitude is None
            else {"index": {"site_longitude_deg": args.site_longitude}}
        )
        config = load_config(args.config, overrides=overrides)
        use_store_config(config["store"])
        result = ingest_table(
            args.table,
            args.store,
            band=args.band,
            refcat_path=args.refcat,
            night=args.night,
            columns=parse_assignments(args.column, "--column"),
            constants=parse_assignments(args.constants, "--set"),
            site_longitude_deg=config["index"].site_longitude_deg,
            config=config["ingest"],
            photometry=config["photometry"],
            overwrite=args.overwrite,
        )
    except (ConfigError, IngestError, RawFileError) as err:
        print(f"photocal ingest: {err}", file=sys.stderr)
        return 2
    print("\n".join(ingest_summary_lines(result, args.store)))
    return 0 if result.nights else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flows.store_cli import cmd_store

    handlers = {
        "simulate": cmd_simulate,
        "run": cmd_run,
        "report": cmd_report,
        "demo": cmd_demo,
        "serve": cmd_serve,
        "config": cmd_config,
        "ingest": cmd_ingest,
        "store": cmd_store,
    }
    with quiet_console(getattr(args, "verbose", False)):
        return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
