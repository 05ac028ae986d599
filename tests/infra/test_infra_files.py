"""infra/ is configuration: every reference in it must resolve."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from prefect import Flow

from flows.runners import ClusterSpec, load_cluster_spec

INFRA = Path(__file__).resolve().parents[2] / "infra"


def test_every_deployment_entrypoint_is_a_flow():
    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    names = set()
    for dep in spec["deployments"]:
        module, func = dep["entrypoint"].split(":")
        obj = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), func)
        assert isinstance(obj, Flow), dep["name"]
        assert dep["work_pool"]["name"] == "photocal"
        names.add(dep["name"])
    assert {"nightly", "backfill", "masters", "ubercal", "train-zp", "score-zp"} <= names
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert nightly["schedules"][0]["cron"]


@pytest.mark.parametrize("name", ["local", "slurm", "kubernetes"])
def test_cluster_specs_validate(name):
    spec = load_cluster_spec(name)
    assert isinstance(spec, ClusterSpec)
    assert "." in spec.cluster_class


def test_unknown_cluster_spec_names_the_choices():
    with pytest.raises(ValueError, match="local"):
        load_cluster_spec("mainframe")


def test_compose_stack_binds_published_ports_to_loopback():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    assert {
        "postgres",
        "prefect-server",
        "photocal-worker",
        "dask-scheduler",
        "dask-worker",
    } <= set(compose["services"])
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
