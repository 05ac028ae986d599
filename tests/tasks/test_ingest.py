"""`photocal ingest`: another pipeline's photometry table, in each format, with
source ids or positions only, becomes complete night groups that ubercal and
the zero-point network's features read; bad rows are rejected, counted and kept."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from flows.cli import main
from tasks.config import load_config
from tasks.ingest import IngestError, ingest_table
from tasks.inputs import check_stage_inputs
from tasks.io.store import read_group
from tasks.ubercal import run_ubercal_stage
from tasks.zp import ZPNetworkConfig, night_features

N_STARS, N_EXP, EXPTIME, SIGMA = 40, 6, 30.0, 0.01
ZP_TRUE = np.array([25.00, 25.05, 24.90, 25.12, 24.97, 25.03])  # per exposure, mag
NIGHT = "2026-03-10"
MJD0 = 61110.2  # 2026-03-11 04:48 UTC: the night of 2026-03-10 at Palomar


def _refcat(tmp_path):
    rng = np.random.default_rng(1)
    mags = rng.uniform(14.0, 18.0, N_STARS)
    t = Table(
        {
            "source_id": np.arange(1000, 1000 + N_STARS, dtype=np.int64),
            "ra": 150.0 + rng.uniform(-0.1, 0.1, N_STARS),
            "dec": 2.0 + rng.uniform(-0.1, 0.1, N_STARS),
            **{f"{b}_mag": mags for b in "gri"},
            **{f"{b}_magerr": np.full(N_STARS, 0.01) for b in "gri"},
            "bp_rp": np.full(N_STARS, 1.0),
        }
    )
    path = tmp_path / "refcat.ecsv"
    t.write(path, format="ascii.ecsv")
    return t, path


def _observations(ref: Table, *, seed: int = 2) -> Table:
    """Every star on every exposure: m_inst = m_ref - zp_true + N(0, SIGMA)."""
    rng = np.random.default_rng(seed)
    e, s = np.meshgrid(np.arange(N_EXP), np.arange(N_STARS), indexing="ij")
    e, s = e.ravel(), s.ravel()
    m_inst = np.asarray(ref["r_mag"])[s] - ZP_TRUE[e] + rng.normal(0, SIGMA, e.size)
    flux = EXPTIME * 10 ** (-0.4 * m_inst)
    return Table(
        {
            "FILE": np.array([f"exp-{k:03d}.fits" for k in e]),
            "SRC": np.asarray(ref["source_id"])[s],
            "RA": np.asarray(ref["ra"])[s] + rng.normal(0, 0.1 / 3600, e.size),
            "DEC": np.asarray(ref["dec"])[s] + rng.normal(0, 0.1 / 3600, e.size),
            "X": rng.uniform(10, 2000, e.size),
            "Y": rng.uniform(10, 2000, e.size),
            "FLUX": flux,
            "FLUXERR": flux * SIGMA / 1.0857,
            "MJD": MJD0 + e * 0.01,
            "AIRMASS": 1.0 + 0.1 * e,
        }
    )


_COLUMNS = ["expid=FILE", "x=X", "y=Y", "flux=FLUX", "flux_err=FLUXERR", "mjd=MJD"]
_COLUMNS += ["airmass=AIRMASS"]
_SETS = ["exptime=30", "quad_nx=2048", "quad_ny=2048"]


def _write(table: Table, path, fmt: str):
    writer = {"fits": "fits", "ecsv": "ascii.ecsv", "csv": "ascii.csv", "parquet": "parquet"}
    table.write(path, format=writer[fmt], overwrite=True)
    return path


def _ingest(table_path, store, refcat, *extra, ids=True):
    argv = ["ingest", str(table_path), "--store", str(store), "--band", "r"]
    argv += ["--refcat", str(refcat)]
    star = ["source_id=SRC"] if ids else ["ra=RA", "dec=DEC"]
    for c in [*_COLUMNS, *star]:
        argv += ["--column", c]
    for c in _SETS:
        argv += ["--set", c]
    return main([*argv, *extra])


@pytest.mark.parametrize("fmt", ["fits", "ecsv", "csv", "parquet"])
@pytest.mark.parametrize("ids", [True, False], ids=["source_id", "ra-dec"])
def test_each_format_with_and_without_source_id(tmp_path, fmt, ids, capsys):
    ref, refcat = _refcat(tmp_path)
    obs = _observations(ref)
    path = _write(obs, tmp_path / f"phot.{fmt}", fmt)
    store = tmp_path / "s.zarr"
    assert _ingest(path, store, refcat, ids=ids) == 0
    assert f"nights/{NIGHT}: {N_EXP} exposures, {N_EXP * N_STARS} observations" in (
        capsys.readouterr().out
    )
    cat = read_group(store, f"nights/{NIGHT}/catalog")
    exp = read_group(store, f"nights/{NIGHT}/exposures")
    assert cat.attrs["quad_nx"] == 2048
    assert cat.attrs["stage"] == "ingest"
    assert "code_revision" in cat.attrs
    # Every observation kept its star (matched by position: 0.1" scatter, 1" radius).
    key = dict(zip(obs["FILE"], obs["SRC"], strict=False))
    assert len(key) == N_EXP
    order = np.lexsort((cat.source_id.values, cat.expid.values))
    got = set(
        zip(cat.expid.values[order].tolist(), cat.source_id.values[order].tolist(), strict=True)
    )
    keys = exp.attrs["expid_keys"]
    want = {(keys[f], int(s)) for f, s in zip(obs["FILE"], obs["SRC"], strict=True)}
    assert got == want
    # m_inst is the contract's -2.5 log10(flux / exptime), to rounding.
    expected = -2.5 * np.log10(np.asarray(obs["FLUX"]) / EXPTIME)
    np.testing.assert_allclose(np.sort(cat.mag_inst.values), np.sort(expected), atol=1e-9)
    np.testing.assert_allclose(np.sort(exp.airmass.values), 1.0 + 0.1 * np.arange(N_EXP))
    # The classical zero point recovers each exposure's truth within 4 sigma of
    # its mean over 40 stars (sigma 0.01 / sqrt(40) = 1.6 mmag, plus the
    # catalog's 0.01 errors that do not average out: they are the same stars).
    by_file = {keys[f]: ZP_TRUE[int(f[4:7])] for f in keys}
    truth = np.array([by_file[e] for e in exp.expid.values.tolist()])
    np.testing.assert_allclose(exp.zp_classic.values[:, 0], truth, atol=4 * 0.01 / np.sqrt(40))


def test_bad_rows_are_rejected_counted_and_kept(tmp_path, capsys):
    ref, refcat = _refcat(tmp_path)
    obs = _observations(ref)
    obs["FLUXERR"][0] = np.nan  # non-finite error
    obs["FLUXERR"][1] = -5.0  # negative error
    obs["SRC"][2] = 999_999  # not in the catalog
    obs["FILE"][3] = ""  # no exposure key
    obs["FLUX"][4] = -1.0  # no magnitude
    obs["SRC"][5] = obs["SRC"][6]  # the same star twice in one exposure
    store = tmp_path / "s.zarr"
    path = _write(obs, tmp_path / "phot.ecsv", "ecsv")
    assert _ingest(path, store, refcat) == 0
    out = capsys.readouterr().out
    assert "rejected rows (6):" in out
    rejected = read_group(store, f"nights/{NIGHT}/rejected")
    reasons = dict(zip(rejected.row.values.tolist(), rejected.reason.values.tolist(), strict=True))
    assert reasons == {
        0: "non-finite or missing flux_err",
        1: "negative flux_err",
        2: "unknown star: source_id not in the reference catalog",
        3: "missing expid",
        4: "non-positive flux (no magnitude)",
        6: "duplicate: the star is already observed in this exposure",
    }
    cat = read_group(store, f"nights/{NIGHT}/catalog")
    assert cat.sizes["obs"] == N_EXP * N_STARS - 6
    assert cat.attrs["rows"] == {"ingested": N_EXP * N_STARS - 6, "rejected": 6}


def test_an_existing_night_is_not_replaced_without_overwrite(tmp_path, capsys):
    ref, refcat = _refcat(tmp_path)
    path = _write(_observations(ref), tmp_path / "phot.fits", "fits")
    store = tmp_path / "s.zarr"
    assert _ingest(path, store, refcat) == 0
    assert _ingest(path, store, refcat) == 2
    assert f"nights/{NIGHT}/catalog already exists" in capsys.readouterr().err
    assert _ingest(path, store, refcat, "--overwrite") == 0


@pytest.mark.parametrize(
    ("columns", "sets", "message"),
    [
        ({"x": "X", "y": "Y", "flux": "FLUX", "flux_err": "FLUXERR", "mjd": "MJD"}, {}, "expid"),
        ({"expid": "NOPE"}, {}, "no column 'NOPE'"),
        ({"expid": "FILE", "flux": "FLUX"}, {"quad_nx": "9", "quad_ny": "9"},
         "flux is given but not flux_err"),
        ({"expid": "FILE", "flux": "FLUX", "flux_err": "FLUXERR"},
         {"quad_nx": "9", "quad_ny": "9"}, "flux needs exptime"),
        ({"colour": "X"}, {}, "'colour' is not a contract name"),
    ],
)  # fmt: skip
def test_missing_contract_values_are_named(tmp_path, columns, sets, message):
    ref, refcat = _refcat(tmp_path)
    path = _write(_observations(ref), tmp_path / "phot.fits", "fits")
    with pytest.raises(IngestError, match=message):
        ingest_table(
            path,
            str(tmp_path / "s.zarr"),
            band="r",
            refcat_path=refcat,
            columns={"source_id": "SRC", **columns},
            constants=sets,
            site_longitude_deg=-116.865,
        )


def test_ubercal_and_features_run_on_an_ingested_night(tmp_path):
    ref, refcat = _refcat(tmp_path)
    path = _write(_observations(ref), tmp_path / "phot.parquet", "parquet")
    store = tmp_path / "s.zarr"
    assert _ingest(path, store, refcat) == 0
    assert check_stage_inputs(str(store), "ubercal", [NIGHT]) == ([NIGHT], [])
    config = load_config(
        {"ubercal": {"plots": False, "options": {"starflat": False, "exposure_gradient": False}}}
    )
    run_ubercal_stage(str(store), refcat, config.build("ubercal", band="r"))
    ub = read_group(store, "ubercal/r")
    exp = read_group(store, f"nights/{NIGHT}/exposures")
    keys = {v: int(k[4:7]) for k, v in exp.attrs["expid_keys"].items()}
    truth = ZP_TRUE[[keys[e] for e in ub.expid.values.tolist()]]
    zp = ub.zp.values[:, 0]
    # Relative zero points: 40 stars at 0.01 mag each, sigma of a difference
    # sqrt(2) * 0.01 / sqrt(40) = 2.2 mmag; 4 sigma.
    np.testing.assert_allclose(zp - zp.mean(), truth - truth.mean(), atol=4 * 0.0022)
    zp_config = ZPNetworkConfig(patch_px=16)
    fs = night_features(str(store), NIGHT, _refcat_obj(refcat), zp_config)
    assert len(fs) == N_EXP
    assert np.all(fs.n_stars == min(N_STARS, zp_config.max_stars))  # the brightest it reads
    assert np.all(fs.patch == 0)  # no images: a blank patch


def _refcat_obj(path):
    from tasks.io.raw import read_refcat

    return read_refcat(path)


def test_the_night_can_be_given_instead_of_time_stamps(tmp_path):
    ref, refcat = _refcat(tmp_path)
    obs = _observations(ref)
    del obs["MJD"]
    path = _write(obs, tmp_path / "phot.fits", "fits")
    result = ingest_table(
        path,
        str(tmp_path / "s.zarr"),
        band="r",
        refcat_path=refcat,
        night="2020-01-02",
        columns={"source_id": "SRC", "expid": "FILE", "flux_err": "FLUXERR"},
        constants={"exptime": "30", "quad_nx": "2048", "quad_ny": "2048"},
        site_longitude_deg=-116.865,
    )
    assert result.nights["2020-01-02"]["observations"] == N_EXP * N_STARS
    exp = read_group(tmp_path / "s.zarr", "nights/2020-01-02/exposures")
    assert np.all(np.isnan(exp.mjd.values))
