"""The simulator writes what BRIEF §3 promises, deterministically, with
realistic magnitudes of every effect it models."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS
from statchecks import assert_fails

import sim.schedule
from sim.camera import Camera
from sim.config import BANDS, make_config
from sim.instrument import Instrument
from sim.schedule import EXTINCTION_PER_AIRMASS, telemetry_zp_loss_mag
from sim.survey import Survey
from tasks.io.raw import read_quadrants, validate_file
from tasks.simulate import simulate_survey


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_whatever_the_parallelism(tiny_survey, tmp_path):
    again = simulate_survey(tmp_path / "again", preset="tiny", seed=3, bad_files=True, jobs=2)
    ref = _digests(tiny_survey.raw)
    assert ref == _digests(again.raw)
    assert tiny_survey.refcat.read_bytes() == again.refcat.read_bytes()
    a = xr.open_zarr(tiny_survey.truth, group="observations", consolidated=False).load()
    b = xr.open_zarr(again.truth, group="observations", consolidated=False).load()
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())


def test_other_seed_other_sky(tiny_survey, tmp_path):
    other = simulate_survey(tmp_path / "other", preset="tiny", seed=4)
    assert tiny_survey.refcat.read_bytes() != other.refcat.read_bytes()


def _good_files(tiny_survey) -> list[Path]:
    damaged = set(tiny_survey.bad_files.values())
    return [p for p in sorted(tiny_survey.raw.rglob("*.fits")) if p not in damaged]


PRIMARY = {
    "IMAGETYP": str,
    "EXPID": int,
    "MJD-OBS": float,
    "DATE-OBS": str,
    "EXPTIME": float,
}
SCIENCE = {
    "FILTER": str,
    "AIRMASS": float,
    "TELRA": float,
    "TELDEC": float,
    "OUTTEMP": float,
    "OUTRHUM": float,
    "WINDSPD": float,
}
QUADRANT = {
    "EXTNAME": str,
    "CCD_ID": int,
    "QID": int,
    "GAIN": float,
    "RDNOISE": float,
    "SATURATE": float,
    "DATASEC": str,
    "BIASSEC": str,
    "DETSEC": str,
}


def test_every_file_has_every_brief_keyword_typed(tiny_survey):
    files = _good_files(tiny_survey)
    assert len(files) == tiny_survey.n_files
    kinds = set()
    for path in files:
        with fits.open(path) as hdul:
            hdr = hdul[0].header
            kinds.add(hdr["IMAGETYP"])
            expected = dict(PRIMARY)
            if hdr["IMAGETYP"] == "SCIENCE":
                expected |= SCIENCE
            if hdr["IMAGETYP"] == "FLAT":
                expected |= {"FILTER": str, "LEDID": int}
            for key, typ in expected.items():
                assert isinstance(hdr[key], typ), (path.name, key, hdr[key])
            for hdu in hdul[1:]:
                for key, typ in QUADRANT.items():
                    assert isinstance(hdu.header[key], typ), (path.name, hdu.name, key)
                assert hdu.header["BITPIX"] == 16
                assert hdu.header["BZERO"] == 32768
                assert hdu.data.dtype == np.uint16
                if hdr["IMAGETYP"] == "SCIENCE":
                    assert hdu.header["CTYPE1"] == "RA---TAN-SIP"
        # ... and the pipeline's reader accepts it as such.
        validate_file(path)
    assert kinds == {"BIAS", "DARK", "FLAT", "SCIENCE"}


def test_reader_splits_data_and_overscan_on_the_readout_side(tiny_survey):
    science = next(p for p in _good_files(tiny_survey) if "science" in p.name)
    frames = read_quadrants(science)
    assert len(frames) == 8
    for fr in frames:
        # Overscan holds the bias level only; the data section holds sky on top.
        assert 900 < np.median(fr.overscan) < 1150
        assert np.median(fr.data) > np.median(fr.overscan) + 50
        assert fr.data.shape == (128, 128)
        assert fr.overscan.shape == (128, 8)


def test_pixel_area_truth_is_the_jacobian_of_the_header_wcs(tiny_survey):
    """The truth area map equals the solid angle per pixel that the FITS WCS
    (TAN-SIP) implies, measured independently with astropy by finite differences."""
    science = next(p for p in _good_files(tiny_survey) if "science" in p.name)
    area = xr.open_zarr(tiny_survey.truth, group="maps/area", consolidated=False).load()
    frames = read_quadrants(science)
    scale = 1.0 / 3600.0
    for fr in frames[::3]:
        w = fr.wcs
        for y, x in [(5, 7), (64, 64), (120, 100)]:
            h = 0.5
            pts = np.array([[x - h, y], [x + h, y], [x, y - h], [x, y + h]], dtype=float)
            ra, dec = w.all_pix2world(pts[:, 0], pts[:, 1], 0)
            cosd = np.cos(np.deg2rad(dec.mean()))
            dx = np.array([(ra[1] - ra[0]) * cosd, dec[1] - dec[0]])
            dy = np.array([(ra[3] - ra[2]) * cosd, dec[3] - dec[2]])
            solid = abs(dx[0] * dy[1] - dx[1] * dy[0]) / scale**2
            truth = float(area.area.sel(quadrant=fr.header.quadrant)[y, x])
            assert solid == pytest.approx(truth, rel=2e-5)


def test_effects_have_realistic_sizes():
    cfg = make_config("small", seed=11)
    survey = Survey(cfg)
    cam, inst = survey.camera, survey.instrument
    # Pixel area grows by a few % from the optical axis to the corner.
    areas = np.concatenate([cam.area_map(q).ravel() for q in cam.quadrant_ids])
    assert 0.02 < areas.max() - areas.min() < 0.05
    # Starflat: 10-30 mmag peak to peak over the focal plane, per band.
    for band in cfg.schedule.bands:
        sf = np.concatenate([inst.starflat(q, band).ravel() for q in cam.quadrant_ids])
        assert 0.010 < np.ptp(sf) < 0.036, band
        assert abs(sf.mean()) < 1e-3
    # Bias ~1000 ADU, read noise 5-10 e-, gain spread ~5 %, over the full camera.
    ztf = make_config("ztf", seed=11)
    full = Instrument(ztf, Camera(ztf.camera))
    elec = [full.electronics(g.quadrant) for g in Camera(ztf.camera).quadrants]
    gains = np.array([e.gain_e_per_adu for e in elec])
    assert 0.03 < gains.std() / gains.mean() < 0.07
    assert all(900 < e.bias_level_adu < 1150 for e in elec)
    assert all(5 <= e.read_noise_e <= 10 for e in elec)


def test_flats_carry_qe_vignetting_dust_and_led_colour():
    cfg = make_config("small", seed=5)
    survey = Survey(cfg)
    inst, cam = survey.instrument, survey.camera
    q = int(cam.quadrant_ids[0])
    prnu = inst.prnu(q)
    good = inst.defects(q) == 0
    # ~1 % pixel-to-pixel QE scatter (high-pass: neighbour differences / sqrt 2).
    hp = np.diff(prnu, axis=1)[good[:, 1:] & good[:, :-1]] / np.sqrt(2)
    assert 0.008 < hp.std() < 0.012
    vign = np.concatenate([inst.vignetting(g) for g in cam.quadrant_ids])
    assert 0.02 < 1 - vign.min() < 0.05
    dusty = [g for g in cam.quadrant_ids if inst.dust(int(g)).min() < 0.995]
    assert dusty, "no dust donut anywhere on the small focal plane"
    # The LED colour terms average out: the mean LED flat is the band flat.
    coeffs = inst.led_coefficients("g")
    assert len(coeffs) == 3
    assert abs(coeffs.mean()) < 1e-12
    assert np.ptp(coeffs) > 1


def test_telemetry_moves_zero_point_non_linearly_by_tens_of_mmag():
    temp = np.linspace(0, 25, 51)
    loss = telemetry_zp_loss_mag(temp, np.full_like(temp, 50.0), np.full_like(temp, 5.0))
    assert 0.010 < np.ptp(loss) < 0.035
    # Not linear: the second differences are far from zero.
    assert np.abs(np.diff(loss, 2)).max() > 1e-4
    full = telemetry_zp_loss_mag(
        np.array([0.0, 25.0]), np.array([10.0, 95.0]), np.array([0.0, 15.0])
    )
    assert 0.02 < full[1] - full[0] < 0.06


def zero_point_table(zp: np.ndarray, headers: list[dict], quadrants: np.ndarray) -> pd.DataFrame:
    """One row per (exposure, quadrant): the truth zero point beside what the
    camera wrote in the exposure's header (band, airmass, telemetry)."""
    rows = [
        {**h, "quadrant": int(q), "zp": float(z)}
        for h, zps in zip(headers, zp, strict=True)
        for q, z in zip(quadrants, zps, strict=True)
    ]
    return pd.DataFrame(rows)


def _header_row(h, night: str) -> dict:
    return {
        "expid": h.expid, "night": night, "band": h.band, "airmass": h.airmass,
        "temp": h.out_temp_c, "rhum": h.out_rhum_pct, "wind": h.wind_speed_mps,
    }  # fmt: skip


def check_zero_points_follow_the_atmosphere(table: pd.DataFrame) -> None:
    """The physics, not the simulator's own sum: with k_b X from the header
    airmass and the telemetry loss from the header's temperature, humidity and
    wind, zp + k_b X + loss(T, RH, W) is one constant per band on the clear
    night (to the headers' rounding: 2 decimals of T, RH, W and 5 of X move the
    loss by < 4e-5 mag), and below it by grey clouds (>= 0, tens of mmag,
    varying in time and across the focal plane) on the cloudy night."""
    k = table.band.map(EXTINCTION_PER_AIRMASS)
    loss = telemetry_zp_loss_mag(table.temp.values, table.rhum.values, table.wind.values)
    level = table.zp + k * table.airmass + loss
    first = sorted(set(table.night))[0]
    for band, rows in table.groupby("band"):
        clear = level[rows.index[rows.night == first]]
        assert np.ptp(clear) < 1e-4, (band, np.ptp(clear))
        cloud = float(np.median(clear)) - level[rows.index[rows.night != first]]
        assert cloud.min() > -1e-4, (band, cloud.min())
        assert cloud.mean() > 0.03, (band, cloud.mean())
        by_exposure = cloud.groupby(table.expid[cloud.index])
        assert np.ptp(by_exposure.mean()) > 0.01  # in time
        assert (by_exposure.max() - by_exposure.min()).max() > 0.002  # across the focal plane
    # Airmass and telemetry each move the clear-night zero points by more than
    # the 1e-4 the constancy allows.
    assert np.ptp(k * table.airmass) > 1e-3
    assert np.ptp(loss) > 1e-3


def test_truth_zero_points_follow_airmass_clouds_and_telemetry(tiny_survey):
    zp = xr.open_zarr(tiny_survey.truth, group="zp", consolidated=False).load()
    ex = xr.open_zarr(tiny_survey.truth, group="exposures", consolidated=False).load()
    ex = ex.swap_dims({"exposure": "expid"}).sel(expid=zp.expid)
    headers = [
        _header_row(validate_file(tiny_survey.raw / str(path)).header, str(night))
        for path, night in zip(ex.path.values, ex.night.values, strict=True)
    ]
    table = zero_point_table(zp.zp.values, headers, zp.quadrant.values)
    check_zero_points_follow_the_atmosphere(table)


def _zenith_extinction(monkeypatch) -> None:
    """The schedule computes each exposure's extinction as if at the zenith (the
    header airmass is right): the simulator's own sum still adds up."""
    made = sim.schedule.Exposure

    def exposure(*args, **kw):
        e = made(*args, **kw)
        if e.extinction_mag is None:
            return e
        return dataclasses.replace(e, extinction_mag=EXTINCTION_PER_AIRMASS[e.band])

    monkeypatch.setattr(sim.schedule, "Exposure", exposure)


def _zp_plus(term):
    """zp_true with a term added: how a broken simulator could sum it."""
    original = Survey.zp_true
    return lambda self, e, q: original(self, e, q) + term(self, e, q)


PERTURBATIONS = {
    "extinction at the zenith": _zenith_extinction,
    "telemetry ignored": lambda mp: mp.setattr(
        Survey, "zp_true", _zp_plus(lambda s, e, q: e.telemetry_mag)
    ),
    "clouds ignored": lambda mp: mp.setattr(
        Survey, "zp_true", _zp_plus(lambda s, e, q: s.cloud_mag(e, q))
    ),
    "extinction twice": lambda mp: mp.setattr(
        Survey, "zp_true", _zp_plus(lambda s, e, q: -e.extinction_mag)
    ),
}


@pytest.mark.parametrize("perturbation", sorted(PERTURBATIONS))
def test_zero_point_check_fails_on_a_broken_atmosphere(perturbation, monkeypatch):
    """The truth of a perturbed simulator (same headers) must fail the check."""
    PERTURBATIONS[perturbation](monkeypatch)
    survey = Survey(make_config("tiny", seed=3))
    science = [e for e in survey.exposures if e.imagetyp == "SCIENCE"]
    quadrants = survey.camera.quadrant_ids
    zp = np.array([[survey.zp_true(e, int(q)) for q in quadrants] for e in science])
    headers = [
        _header_row(
            SimpleNamespace(
                expid=e.expid,
                band=e.band,
                airmass=e.airmass,
                out_temp_c=e.out_temp_c,
                out_rhum_pct=e.out_rhum_pct,
                wind_speed_mps=e.wind_mps,
            ),
            e.night,
        )
        for e in science
    ]
    assert_fails(check_zero_points_follow_the_atmosphere, zero_point_table(zp, headers, quadrants))


def test_dithers_put_stars_on_several_quadrants(tiny_survey):
    obs = xr.open_zarr(tiny_survey.truth, group="observations", consolidated=False).load()
    per_star = obs.to_dataframe().groupby("source_id")["quadrant"].nunique()
    assert (per_star >= 2).mean() > 0.3


def test_refcat_is_a_noisy_colour_transformed_view_of_the_truth(tiny_survey):
    from tasks.io.raw import read_refcat

    ref = read_refcat(tiny_survey.refcat)
    stars = xr.open_zarr(tiny_survey.truth, group="stars", consolidated=False).load()
    stars = stars.swap_dims({"source": "source_id"}).sel(source_id=ref.source_id)
    assert np.all(stars.in_refcat)
    assert len(ref) > 300
    colour_term = make_config("tiny").instrument.colour_term["r"]
    expected = stars.mag_r - colour_term * (stars.bp_rp - 1.0)
    pull = (ref.r_mag - expected.values) / ref.r_magerr
    assert abs(np.mean(pull)) < 0.2
    assert 0.85 < np.std(pull) < 1.15
    assert 0.01 < float(np.mean(stars.var_amp_mag > 0)) < 0.06
    assert all(b in BANDS for b in ("g", "r", "i"))


def test_domain_b_is_a_different_instrument():
    a, b = make_config("tiny", domain="A"), make_config("tiny", domain="B")
    assert a.instrument.domain == 0
    assert b.instrument.domain == 1
    assert b.instrument.gain_e_per_adu < 0.5 * a.instrument.gain_e_per_adu
    assert b.instrument.psf != a.instrument.psf
    hdus, _ = Survey(b).render(next(e for e in Survey(b).exposures if e.imagetyp == "SCIENCE"))
    assert hdus[0].header["GAIN"] < 3.0


def test_bad_arguments_are_refused_with_their_name():
    with pytest.raises(ValueError, match="preset"):
        make_config("huge")
    with pytest.raises(ValueError, match="domain"):
        make_config("tiny", domain="C")
    with pytest.raises(ValueError, match="nights"):
        make_config("tiny", nights=0)
    with pytest.raises(ValueError, match="jobs"):
        simulate_survey("/nonexistent", preset="tiny", jobs=0)


def test_mosaic_wcs_places_quadrants_where_detsec_says(tiny_survey):
    """A star's sky position maps to the same mosaic pixel through the quadrant
    header WCS + DETSEC as through the camera model."""
    science = next(p for p in _good_files(tiny_survey) if "science" in p.name)
    with fits.open(science) as hdul:
        ra0, dec0 = hdul[0].header["TELRA"], hdul[0].header["TELDEC"]
        cam = Camera(make_config("tiny").camera)
        mosaic = WCS(cam.mosaic_wcs_header(ra0, dec0))
        for fr in read_quadrants(science):
            det = fr.header.detsec
            ra, dec = fr.wcs.all_pix2world([10.0], [20.0], 0)
            mx, my = mosaic.all_world2pix(ra, dec, 0)
            assert mx[0] == pytest.approx(det[1].start + 10.0, abs=1e-3)
            assert my[0] == pytest.approx(det[0].start + 20.0, abs=1e-3)
