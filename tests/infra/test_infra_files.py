"""infra/ is configuration: every reference in it must resolve."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
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
    expected = {"nightly", "backfill", "masters", "ubercal", "lightcurves", "train-zp", "score-zp"}
    assert expected <= names
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert nightly["schedules"][0]["cron"]


def _accepted_keywords(cls: type) -> set[str]:
    """Keyword arguments ``cls(...)`` accepts. A LocalCluster passes unknown
    keywords on to its Nanny and Worker, and a dask-jobqueue cluster to its job
    class (SLURMJob, then the base Job), so theirs count too."""
    import distributed

    chain = [cls]
    if cls is distributed.LocalCluster:
        chain += [distributed.Nanny, distributed.Worker]
    job_cls = getattr(cls, "job_cls", None)
    if isinstance(job_cls, type):
        chain += [c for c in job_cls.__mro__ if "__init__" in vars(c) and c is not object]
    names: set[str] = set()
    for c in chain:
        params = inspect.signature(c.__init__).parameters.values()
        names |= {p.name for p in params if p.kind is not p.VAR_KEYWORD}
    return names


def check_cluster_spec(spec: ClusterSpec) -> None:
    """The class resolves to a Dask Cluster and takes every keyword of the spec."""
    from distributed.deploy.cluster import Cluster

    module, _, name = spec.cluster_class.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(cls, type), spec.cluster_class
    assert issubclass(cls, Cluster), spec.cluster_class
    unknown = set(spec.cluster_kwargs) - _accepted_keywords(cls)
    assert not unknown, f"{spec.cluster_class} does not take {sorted(unknown)}"


@pytest.mark.parametrize("name", ["local", "slurm", "kubernetes"])
def test_cluster_specs_validate(name):
    spec = load_cluster_spec(name)
    assert isinstance(spec, ClusterSpec)
    package = spec.cluster_class.partition(".")[0]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed here: the {name} spec is checked where it is")
    check_cluster_spec(spec)


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        ("local", "cluster_class", "distributed.LocalClusterr"),
        ("local", "cluster_class", "distributed.Client"),
        ("local", "cluster_kwargs", {"n_workers": 2, "thread_per_worker": 1}),
        ("slurm", "cluster_kwargs", {"queue": "normal", "walltme": "04:00:00"}),
    ],
    ids=["misspelt class", "not a cluster", "misspelt keyword", "misspelt Slurm job keyword"],
)
def test_a_broken_cluster_spec_fails_the_check(name, field, value):
    spec = load_cluster_spec(name).model_copy(update={field: value})
    with pytest.raises((AssertionError, AttributeError)):
        check_cluster_spec(spec)


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
