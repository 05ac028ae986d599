"""Production path: a real `prefect server` on loopback (on a port of its own,
not Prefect's default), a process work pool and worker, the deployments of
infra/prefect.yaml; the backfill and nightly deployments are started through
the API with parameters, as the UI does."""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path

import httpx
import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
)
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.backfill_progress import progress_key
from flows.serve import local_stack
from tasks.io.store import list_groups, read_group

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tiny_survey, tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    data = tmp_path_factory.mktemp("data")
    raw = data / "raw"
    shutil.copytree(tiny_survey.raw, raw)
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PHOTOCAL_STORE": str(data / "photocal.zarr"),
        "PHOTOCAL_RAW": str(raw),
        "PHOTOCAL_REFCAT": str(tiny_survey.refcat),
        "PHOTOCAL_WORKERS": "2",
    }
    with (
        local_stack(env=env, log_dir=home / "logs") as s,
        temporary_settings(updates={PREFECT_API_URL: s.api_url}),
    ):
        yield s


def _artifacts(key: str):
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )


def _run_artifacts(flow_run_id) -> dict:
    """The artifacts on one flow run (not its children), by key."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def test_server_binds_to_loopback_only(stack):
    assert stack.api_url.startswith("http://127.0.0.1:")


def test_ui_is_told_the_servers_own_port(stack):
    """The UI asks /ui-settings where its API is: the stack's port, not 4200."""
    port = stack.api_url.rsplit(":", 1)[1].split("/")[0]
    assert port != "4200"
    settings = httpx.get(stack.api_url.removesuffix("/api") + "/ui-settings", timeout=30).json()
    assert settings["api_url"] == stack.api_url


def test_deployments_are_registered(stack):
    with get_client(sync_client=True) as client:
        names = {d.name for d in client.read_deployments()}
        nightly = client.read_deployment_by_name("nightly/nightly")
    assert {"nightly", "backfill", "masters", "ubercal", "lightcurves"} <= names
    assert nightly.schedules, "the nightly deployment has its cron schedule"


def test_backfill_through_the_api(stack):
    run = run_deployment(
        "backfill/backfill",
        parameters={
            "nights": {"start": "2026-03-10", "end": "2026-03-11"},
            "stages": ["index", "masters"],
        },
        timeout=600,
    )
    assert run.state.is_completed(), run.state.message
    store = stack.env["PHOTOCAL_STORE"]
    assert {"2026-03-10", "2026-03-11"} <= set(list_groups(store, "index"))
    assert list_groups(store, "masters/bias") == ["2026-03-05"]
    flat = read_group(store, "masters/flat/r/2026-03-05")
    assert flat.attrs["stage"] == "masters"
    # The reports are on the backfill's own run, one per night.
    on_run = _run_artifacts(run.id)
    report = on_run["night-2026-03-10"]
    assert "FOCUS" in report.data  # this night's rejected file, with its reason
    assert "keyword MJD-OBS missing" not in report.data  # a file of no night
    assert "rejected-2026-03-10" in on_run
    assert "report-2026-03-10" in on_run
    progress = on_run[progress_key(run.id)]
    assert float(progress.data) == 100.0
    assert "2 of 2 nights done" in progress.description

    # Started again without overwrite, the backfill skips what is complete and
    # still reports each night, saying what it kept.
    again = run_deployment(
        "backfill/backfill",
        parameters={"nights": {"start": "2026-03-10", "end": "2026-03-11"}},
        timeout=600,
    )
    assert again.state.is_completed(), again.state.message
    result = again.state.result()
    assert "masters/bias/2026-03-05" in result["skipped"]
    assert "index/2026-03-10" in result["skipped"]
    resumed = _run_artifacts(again.id)
    for night in ("2026-03-10", "2026-03-11"):
        text = resumed[f"night-{night}"].data
        assert "Kept, already complete" in text
        assert f"index/{night}" in text
        assert "masters/bias/2026-03-05" in text
    # Each run has its own progress key: the first run's bar is untouched.
    assert progress_key(again.id) in resumed
    assert progress_key(run.id) not in resumed


def test_nightly_parent_run_carries_the_nights_artifacts(stack):
    run = run_deployment(
        "nightly/nightly", parameters={"night": "2026-03-10", "overwrite": False}, timeout=600
    )
    assert run.state.is_completed(), run.state.message
    on_run = _run_artifacts(run.id)
    assert {"night-2026-03-10", "rejected-2026-03-10", "report-2026-03-10"} <= set(on_run)
    text = on_run["night-2026-03-10"].data
    store = stack.env["PHOTOCAL_STORE"]
    exposures = read_group(store, "nights/2026-03-10/exposures")
    assert "## Zero points per exposure" in text
    for expid in exposures.expid.values:
        assert f"| {expid} |" in text
    assert "](data:image/png;base64," in text
    page = Path(on_run["report-2026-03-10"].data.split("(", 1)[1].split(")", 1)[0])
    assert page.name == "night-2026-03-10.html"
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs()
    child_ids = [r.id for r in children if r.parent_task_run_id is not None]
    assert child_ids
    assert all("night-2026-03-10" not in _run_artifacts(c) for c in child_ids)


def _deployment_runs(deployment_id) -> int:
    with get_client(sync_client=True) as client:
        return len(
            client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
        )


@pytest.mark.parametrize(
    ("name", "parameters", "reason"),
    [
        ("backfill/backfill", {"nights": {"start": "2026-03-11", "end": "2026-03-10"}}, "nights"),
        ("backfill/backfill", {"nights": {"start": "2026-13-01", "end": "2027-01-01"}}, "nights"),
        (
            "backfill/backfill",
            {"nights": {"start": "2026-03-10", "end": "2026-03-11"}, "stages": ["teleport"]},
            "teleport",
        ),
        (
            "backfill/backfill",
            {"nights": {"start": "2026-03-10", "end": "2026-03-11"}, "stages": ["lightcurves"]},
            "lightcurves",
        ),
        ("lightcurves/lightcurves", {"nights": {"start": "2026-03-10", "end": "2026-03-11"}},
         "targets"),
    ],
)  # fmt: skip
def test_bad_request_is_refused_at_submission(stack, name, parameters, reason):
    """The UI's request, answered by the server against the parameter schema:
    an HTTP 4xx and no flow run, so no worker ever starts."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
    before = _deployment_runs(deployment.id)
    response = httpx.post(
        f"{stack.api_url}/deployments/{deployment.id}/create_flow_run",
        json={"parameters": parameters},
        timeout=60,
    )
    assert 400 <= response.status_code < 500, response.text
    assert reason in response.json()["detail"]
    assert _deployment_runs(deployment.id) == before


APRIL_1 = {"start": "2026-04-01", "end": "2026-04-01"}


def test_ubercal_deployment_with_an_inline_configuration(stack):
    """A backfill-style ubercal run started through the API with the settings
    inline (as typed into the UI form), on a night brought in by `photocal ingest`."""
    from test_missing_inputs import ingest_stars

    store = stack.env["PHOTOCAL_STORE"]
    ingest_stars(store, stack.env["PHOTOCAL_REFCAT"], "2026-04-01")
    inline = {"ubercal": {"plots": False, "options": {"starflat": False, "zp_mode": "exposure"}}}
    run = run_deployment(
        "ubercal/ubercal",
        parameters={"band": "r", "nights": APRIL_1, "config": inline},
        timeout=600,
    )
    assert run.state.is_completed(), run.state.message
    ub = read_group(store, "ubercal/r")
    assert ub.attrs["config"]["options"]["starflat"] is False
    assert ub.attrs["config"]["options"]["zp_mode"] == "exposure"
    assert ub.attrs["inputs"]["nights"] == ["2026-04-01"]
    # A wrong key in the inline configuration fails the run, naming it.
    bad = run_deployment(
        "ubercal/ubercal",
        parameters={"band": "r", "nights": APRIL_1, "config": {"ubercal": {"optoins": {}}}},
        timeout=300,
    )  # fmt: skip
    assert bad.state.is_failed()
    assert "unknown key 'optoins'" in str(bad.state.result(raise_on_failure=False))
    # Over a range, nights without their input are listed with the reason, not failed.
    rng = run_deployment(
        "backfill/backfill",
        parameters={"nights": {"start": "2026-04-01", "end": "2026-04-03"},
                    "stages": ["ubercal"], "config": inline},
        timeout=600,
    )  # fmt: skip
    assert rng.state.is_completed(), rng.state.message
    missing = {(m["night"], m["group"]): m["reason"] for m in rng.state.result()["missing"]}
    assert set(missing) == {
        ("2026-04-02", "nights/2026-04-02/catalog"),
        ("2026-04-03", "nights/2026-04-03/catalog"),
    }
    assert all(r.startswith("is missing") for r in missing.values())


def test_served_stack_listens_on_loopback_only(stack):
    """The server's real sockets, not just its URL (and the worker opens none)."""
    procs = [psutil.Process(stack.server.pid), psutil.Process(stack.worker.pid)]
    sockets = [
        c.laddr
        for p in procs
        for q in [p, *p.children(recursive=True)]
        for c in q.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert sockets, "the server listens somewhere"
    assert all(ipaddress.ip_address(a.ip).is_loopback for a in sockets), sockets
