"""Production path: a real `prefect server` on loopback, a process work pool and
worker, the deployments of infra/prefect.yaml; the backfill deployment is started
through the API with parameters, as the UI does."""

from __future__ import annotations

import ipaddress
import shutil

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

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
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )


def test_server_binds_to_loopback_only(stack):
    assert stack.api_url.startswith("http://127.0.0.1:")


def test_deployments_are_registered(stack):
    with get_client(sync_client=True) as client:
        names = {d.name for d in client.read_deployments()}
        nightly = client.read_deployment_by_name("nightly/nightly")
    assert {"nightly", "backfill", "masters", "ubercal"} <= names
    assert nightly.schedules, "the nightly deployment has its cron schedule"


def test_backfill_through_the_api(stack):
    run = run_deployment(
        "backfill/backfill",
        parameters={"start": "2026-03-10", "end": "2026-03-11", "stages": ["index", "masters"]},
        timeout=600,
    )
    assert run.state.is_completed(), run.state.message
    store = stack.env["PHOTOCAL_STORE"]
    assert {"2026-03-10", "2026-03-11"} <= set(list_groups(store, "index"))
    assert list_groups(store, "masters/bias") == ["2026-03-05"]
    flat = read_group(store, "masters/flat/r/2026-03-05")
    assert flat.attrs["stage"] == "masters"
    report = _artifacts("night-2026-03-10")
    assert report
    assert "Rejected files" in report[0].data
    assert "FOCUS" in report[0].data
    progress = _artifacts("backfill-progress")
    assert progress
    assert float(progress[0].data) == 100.0

    # Started again without overwrite, the backfill skips what is complete.
    again = run_deployment(
        "backfill/backfill", parameters={"start": "2026-03-10", "end": "2026-03-11"}, timeout=600
    )
    assert again.state.is_completed(), again.state.message
    result = again.state.result()
    assert "masters/bias/2026-03-05" in result["skipped"]
    assert "index/2026-03-10" in result["skipped"]


def test_invalid_parameters_are_refused(stack):
    # An unknown stage is refused by the server against the parameter schema.
    with pytest.raises(Exception, match="teleport"):
        run_deployment(
            "backfill/backfill",
            parameters={"start": "2026-03-10", "end": "2026-03-11", "stages": ["teleport"]},
            timeout=0,
        )
    # End before start cannot be said in a schema: the run fails at once, saying so.
    run = run_deployment(
        "backfill/backfill", parameters={"start": "2026-03-11", "end": "2026-03-10"}, timeout=300
    )
    assert run.state.is_failed()
    assert "before start" in (run.state.message or "") + str(
        run.state.result(raise_on_failure=False)
    )


def test_ubercal_deployment_with_an_inline_configuration(stack):
    """A backfill-style ubercal run started through the API with the settings
    inline (as typed into the UI form), on a night brought in by `photocal ingest`."""
    from test_missing_inputs import ingest_stars

    store = stack.env["PHOTOCAL_STORE"]
    ingest_stars(store, stack.env["PHOTOCAL_REFCAT"], "2026-04-01")
    inline = {"ubercal": {"plots": False, "options": {"starflat": False, "zp_mode": "exposure"}}}
    run = run_deployment(
        "ubercal/ubercal",
        parameters={"band": "r", "start": "2026-04-01", "end": "2026-04-01", "config": inline},
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
        parameters={"band": "r", "start": "2026-04-01", "end": "2026-04-01",
                    "config": {"ubercal": {"optoins": {}}}},
        timeout=300,
    )  # fmt: skip
    assert bad.state.is_failed()
    assert "unknown key 'optoins'" in str(bad.state.result(raise_on_failure=False))
    # Over a range, nights without their input are listed with the reason, not failed.
    rng = run_deployment(
        "backfill/backfill",
        parameters={"start": "2026-04-01", "end": "2026-04-03", "stages": ["ubercal"],
                    "config": inline},
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
