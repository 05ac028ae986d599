"""Make the screenshots of docs/report.md: the HTML QA report, a nightly run's
page in the Prefect UI with its artifacts, and the backfill form.

    .venv/bin/python docs/screenshots/make_screenshots.py [--workdir DIR]

Simulates the tiny survey, starts `photocal serve`'s stack (a real Prefect
server on a free loopback port, a worker, the deployments), runs the nightly
deployment on one night through the API, then opens the pages in headless
Chromium (Debian's package; tests/report/chromium.py). The report shown is
built from the same survey with every stage's groups (tests/report/report_store.py).
Takes a few minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "report"))

from chromium import Browser, ensure_chromium  # noqa: E402
from report_store import build_report_store  # noqa: E402

NIGHT = "2026-03-10"


def _click_text(browser: Browser, text: str) -> None:
    """Click the innermost element whose text is ``text`` (a UI tab)."""
    browser.wait_for(
        "Array.from(document.querySelectorAll('button, a, li, div'))"
        f".some(e => e.textContent.trim() === {text!r})"
    )
    browser.evaluate(
        "(() => { const t = Array.from(document.querySelectorAll('button, a, li, div'))"
        f".filter(e => e.textContent.trim() === {text!r}); t[t.length - 1].click(); }})()"
    )


def report_pages(browser: Browser, work: Path, survey) -> None:
    from tasks.report.html import write_report

    store = build_report_store(str(work / "report-store.zarr"), survey)
    files = write_report(store, work / "report")
    browser.goto(files.pages[NIGHT].as_uri())
    browser.screenshot(HERE / "report-night.png", full_page=True)
    browser.goto(files.index.as_uri())
    browser.screenshot(HERE / "report-index.png", full_page=True)


def ui_pages(browser: Browser, work: Path, survey) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import local_stack

    env = {
        "PREFECT_HOME": str(work / "prefect-home"),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PHOTOCAL_STORE": str(work / "photocal.zarr"),
        "PHOTOCAL_RAW": str(survey.raw),
        "PHOTOCAL_REFCAT": str(survey.refcat),
        "PHOTOCAL_WORKERS": "2",
    }
    with (
        local_stack(env=env, log_dir=work / "logs") as stack,
        temporary_settings(updates={PREFECT_API_URL: stack.api_url}),
    ):
        ui = stack.api_url.removesuffix("/api")
        run = run_deployment("nightly/nightly", parameters={"night": NIGHT}, timeout=1800)
        if not run.state.is_completed():
            raise RuntimeError(f"nightly run failed: {run.state.message}")
        with get_client(sync_client=True) as client:
            backfill = client.read_deployment_by_name("backfill/backfill")
        tall = Browser(browser.executable, width=1400, height=2200)
        with tall:
            tall.goto(f"{ui}/runs/flow-run/{run.id}")
            _click_text(tall, "Artifacts")
            tall.wait_for("document.body.innerText.includes('night-2026-03-10')")
            time.sleep(2)
            tall.screenshot(HERE / "run-artifacts.png", full_page=False, height=1000)
            _click_text(tall, "night-2026-03-10")
            tall.wait_for("document.images.length > 0 && document.images[0].complete")
            time.sleep(2)
            tall.screenshot(HERE / "night-artifact.png", full_page=False)
        browser.goto(f"{ui}/deployments/deployment/{backfill.id}/run")
        browser.wait_for("document.body.innerText.includes('Nights to re-process')")
        time.sleep(2)
        browser.screenshot(HERE / "backfill-form.png", full_page=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory")
    args = parser.parse_args()
    exe, why = ensure_chromium()
    if exe is None:
        print(f"make_screenshots: {why}", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="photocal-screens-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    from tasks.simulate import simulate_survey

    survey = simulate_survey(work / "sim", preset="tiny", seed=3, bad_files=True)
    with Browser(exe, width=1280, height=1000) as browser:
        report_pages(browser, work, survey)
        ui_pages(browser, work, survey)
    print(f"screenshots in {HERE} (scratch: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
