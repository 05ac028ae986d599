"""The HTML QA report, opened in headless Chromium from disk as an operator
would: no broken image, every section there, and the numbers it shows equal to
the store's, recomputed here from the groups (rounded as the report says)."""

from __future__ import annotations

import numpy as np
import pytest
from chromium import Browser, ensure_chromium
from report_store import LIGHTCURVE

from flows.cli import main
from tasks.io import groups
from tasks.io.store import read_group
from tasks.io.store_tools import copy_store
from tasks.report import markdown
from tasks.report.data import night_qa
from tasks.report.html import INDEX, page_name, write_report
from tasks.report.sections import NIGHT_SECTIONS, Figure, Table, night_sections
from tasks.reports import default_report_dir

TABLES_JS = """
Object.fromEntries(Array.from(document.querySelectorAll('table[data-table]')).map(t => [
  t.dataset.table,
  Array.from(t.tBodies[0].rows).map(r => Array.from(r.cells).map(c => c.textContent))]))
"""
IMAGES_JS = """
Array.from(document.images).map(i => ({
  src: i.src.slice(0, 22), ok: i.complete && i.naturalWidth > 0}))
"""
SECTIONS_JS = "Array.from(document.querySelectorAll('section[data-section]')).map(s => s.id)"
EXTERNAL_JS = """
Array.from(document.querySelectorAll('[src], link[href], script'))
  .map(e => e.src || e.href || 'script')
"""


@pytest.fixture(scope="module")
def browser():
    exe, why = ensure_chromium()
    if exe is None:
        pytest.skip(f"headless Chromium unavailable: {why}")
    with Browser(exe) as b:
        yield b


@pytest.fixture(scope="module")
def report(report_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    return report_store, write_report(report_store, out)


def _page(browser, path) -> dict:
    browser.goto(path.resolve().as_uri())
    return {
        "images": browser.evaluate(IMAGES_JS),
        "sections": browser.evaluate(SECTIONS_JS),
        "tables": browser.evaluate(TABLES_JS),
        "external": browser.evaluate(EXTERNAL_JS),
    }


def _mag(x: float) -> str:
    return f"{x:.4f}" if np.isfinite(x) else "–"


def _mean_over_quadrants(zp: np.ndarray) -> np.ndarray:
    """The report's per-exposure zero point: the mean of the finite quadrants'."""
    n = np.isfinite(zp).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.nansum(zp, axis=1) / n, np.nan)


def test_night_pages_show_every_section_with_the_stores_numbers(browser, report, tiny_survey):
    store, files = report
    first = tiny_survey.nights[0]
    for night in tiny_survey.nights:
        page = _page(browser, files.pages[night])
        assert page["images"], night
        assert all(img["ok"] for img in page["images"]), page["images"]
        assert all(img["src"].startswith("data:image/png") for img in page["images"])
        assert not [e for e in page["external"] if e.startswith("http")], page["external"]
        expected = [sid for sid, _ in NIGHT_SECTIONS] + (
            ["transients", "lightcurves"] if night == first else ["lightcurves"]
        )
        assert page["sections"] == expected, night
        _check_numbers(store, night, page["tables"])


def _check_numbers(store: str, night: str, tables: dict) -> None:
    index = read_group(store, groups.index(night))
    status = index.status.values
    assert tables["files"][-1] == [
        "all",
        str(int((status == "ok").sum())),
        str(int((status == "rejected").sum())),
    ]
    assert sorted(r[0] for r in tables.get("rejected", [])) == sorted(
        str(p) for p in index.path.values[status == "rejected"]
    )

    catalog = read_group(store, groups.catalog(night))
    exposures = read_group(store, groups.exposures(night))
    assert tables["photometry"][-1][:4] == [
        "all",
        str(exposures.sizes["exposure"]),
        str(catalog.sizes["obs"]),
        str(int((catalog.flags.values == 0).sum())),
    ]

    shown = {int(r[0]): r for r in tables["zeropoints"]}
    assert sorted(shown) == sorted(exposures.expid.values.tolist())
    classic = _mean_over_quadrants(exposures.zp_classic.values)
    scores = read_group(store, groups.scores(night))
    network = dict(zip(scores.expid.values.tolist(), scores.zp.values, strict=True))
    for i, expid in enumerate(exposures.expid.values.tolist()):
        band = str(exposures.band.values[i])
        sol = read_group(store, groups.ubercal(band))
        ubercal = _mean_over_quadrants(sol.zp.sel(expid=[expid]).values)[0]
        row = shown[expid]
        assert row[1] == band
        assert row[4] == _mag(ubercal), (expid, row)
        assert row[6] == _mag(classic[i]), (expid, row)
        assert row[8] == _mag(network[expid]), (expid, row)

    for row in tables["ubercal"]:
        stats = read_group(store, groups.ubercal(row[0]), load=False).attrs["fit_statistics"]
        assert row[2:5] == [str(stats[k]) for k in ("n_used", "n_clipped", "n_rejected_stars")]
        assert row[5] == f"{stats['chi2_per_dof']:.3f}"

    lc = read_group(store, groups.lightcurve(LIGHTCURVE))
    forced = read_group(store, groups.lightcurve_forced(LIGHTCURVE))
    in_night = np.isin(lc.expid.values, exposures.expid.values)
    assert tables["lightcurves"] == [
        [
            LIGHTCURVE,
            str(lc.sizes["epoch"]),
            str(int(in_night.sum())),
            str(int(np.isfinite(lc.flux_njy.values).sum())),
            ", ".join(sorted({str(b) for b in lc.band.values})),
            f"{np.max(lc.flux_njy.values):.1f}",
            f"{np.max(forced.flux_njy.values):.1f}",
            f"{np.min(lc.mag.values):.4f}",
        ]
    ]


def test_transients_section_counts_the_stores_detections(browser, report, tiny_survey):
    store, files = report
    night = tiny_survey.nights[0]
    tables = _page(browser, files.pages[night])["tables"]
    ds = read_group(store, groups.transients(night))
    for row in tables["transients"]:
        method = row[0]
        assert row[1:4] == [
            str(int(ds.n_injected.sum())),
            str(int(ds.n_found.sel(methods=method).sum())),
            str(int(ds.n_false.sel(methods=method).sum())),
        ]


def test_index_links_every_night_page(browser, report, tiny_survey):
    store, files = report
    page = _page(browser, files.index)
    assert page["sections"] == ["nights", "unknown-night", "masters", "lightcurves"]
    assert page["images"]
    assert all(img["ok"] for img in page["images"])
    assert [r[0] for r in page["tables"]["nights"]] == list(tiny_survey.nights)
    links = browser.evaluate(
        "Array.from(document.querySelectorAll('table[data-table=nights] a'))"
        ".map(a => a.getAttribute('href'))"
    )
    assert links == [page_name(n) for n in tiny_survey.nights]
    unknown = read_group(store, groups.index("unknown-night"))
    assert sorted(r[0] for r in page["tables"]["rejected"]) == sorted(
        str(p) for p in unknown.path.values
    )


def test_markdown_artifact_carries_the_same_tables(report_store, tiny_survey):
    night = tiny_survey.nights[0]
    sections = night_sections(night_qa(report_store, night))
    text = markdown.render(f"photocal night {night}", sections)
    for sid, title in NIGHT_SECTIONS:
        assert f"## {title}" in text, sid
    zeropoints = next(s for s in sections if s.id == "zeropoints")
    table = next(b for b in zeropoints.blocks if isinstance(b, Table))
    for row in table.rows:
        assert "| " + " | ".join(row) + " |" in text
    assert text.count("](data:image/png;base64,") == sum(
        1 for s in sections for b in s.blocks if isinstance(b, Figure)
    )


def test_report_command_writes_the_pages_asked_for(report_store, tiny_survey, tmp_path, capsys):
    night = tiny_survey.nights[1]
    assert main(["report", report_store, "--night", night, "--out", str(tmp_path)]) == 0
    assert str(tmp_path / INDEX) in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("*.html")) == [INDEX, page_name(night)]
    assert main(["report", report_store, "--night", "2031-01-01", "--out", str(tmp_path)]) == 2
    assert "2031-01-01" in capsys.readouterr().err


def test_files_of_no_night_report_only_those_files(report_store):
    """index/unknown-night holds files whose MJD-OBS could not be read: their
    report lists them and nothing else (before, "unknown-night" sorted after
    every period and the report showed the latest period's masters as its own)."""
    qa = night_qa(report_store, groups.UNKNOWN_NIGHT)
    unknown = read_group(report_store, groups.index(groups.UNKNOWN_NIGHT))
    assert qa.files is not None
    assert sorted(p for p, _ in qa.files.rejected) == sorted(str(p) for p in unknown.path.values)
    assert (qa.photometry, qa.masters, qa.zeropoints, qa.ubercal, qa.lightcurves) == (
        None, (), None, (), ()
    )  # fmt: skip
    sections = night_sections(qa)
    assert [s.id for s in sections] == ["unknown-night"]
    text = markdown.render("photocal night unknown-night", sections)
    assert "did not run" not in text
    for path in unknown.path.values:
        assert str(path) in text


def test_report_of_a_store_on_s3(browser, report, s3_store, tmp_path):
    """The store on S3 (moto's server on loopback): the report reads it there and
    writes its pages beside it, as for a local store; the pages show the same
    tables as the local store's report."""
    local_store, local_files = report
    copy_store(local_store, s3_store)
    out = default_report_dir(s3_store)
    assert out == s3_store + ".report"
    files = write_report(s3_store, out)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert sorted(fs.ls(out.removeprefix("s3://"))) == sorted(
        u.removeprefix("s3://") for u in [files.index, *files.pages.values()]
    )
    fs.get(out.removeprefix("s3://") + "/", str(tmp_path), recursive=True)
    for name, local in [
        (INDEX, local_files.index),
        *((page_name(n), p) for n, p in local_files.pages.items()),
    ]:
        page = _page(browser, tmp_path / name)
        assert all(img["ok"] for img in page["images"]), name
        assert page["tables"] == _page(browser, local)["tables"], name
