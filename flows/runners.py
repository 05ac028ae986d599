"""Where tasks run: a Dask cluster described by a spec in infra/clusters/ (the
local one by default), or an existing scheduler by address."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import yaml
from prefect_dask import DaskTaskRunner
from pydantic import BaseModel, Field

CLUSTER_DIR = Path(__file__).resolve().parent.parent / "infra" / "clusters"


class ClusterSpec(BaseModel):
    """A cluster description (infra/clusters/*.yaml)."""

    cluster_class: str = Field(description="Import path of a dask Cluster class.")
    cluster_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Its keyword arguments."
    )
    adapt_kwargs: dict[str, Any] | None = Field(None, description="Adaptive scaling, or null.")
    dask_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Dask configuration (dotted keys) set in this process before the "
        "cluster starts, e.g. the environment its worker processes are spawned with.",
    )


def load_cluster_spec(name_or_path: str) -> ClusterSpec:
    """A spec by name (``local``, ``slurm``, ``kubernetes``) or YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CLUSTER_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml"))
        raise ValueError(
            f"cluster spec {name_or_path!r} not found (known: {known}, or a YAML path)"
        )
    with path.open() as fh:
        data = yaml.safe_load(fh)
    try:
        return ClusterSpec.model_validate(data)
    except ValueError as err:
        raise ValueError(f"cluster spec {path}: {err}") from None


def parse_cluster_options(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings (values read as YAML scalars: ``cores=1``,
    ``queue=debug``, ``adapt.maximum_jobs=4``) as a dict; ValueError naming the
    bad item otherwise."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"cluster option {item!r} is not KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def make_task_runner(
    *,
    dask_address: str | None = None,
    workers: int | None = None,
    cluster: str = "local",
    cluster_options: dict[str, Any] | None = None,
) -> DaskTaskRunner:
    """A Dask task runner.

    Parameters
    ----------
    dask_address : str, optional
        ``tcp://host:port`` of a running ``dask scheduler``, used as it is (its
        workers are scaled by the cluster operator).
    workers : int, optional
        Worker count for the spec (``n_workers``), e.g. of the local cluster.
    cluster : str
        Spec name or path (see :func:`load_cluster_spec`).
    cluster_options : dict, optional
        Site values over the spec's: ``cluster_kwargs`` by name (``queue``,
        ``account``, ``cores``, ``memory``, ``walltime``, ...), adaptive scaling
        as ``adapt.<name>`` (``adapt.maximum_jobs``; ``adapt=null`` turns it off).
    """
    if dask_address is not None and workers is not None:
        raise ValueError("give either dask_address or workers, not both")
    if dask_address is not None:
        return DaskTaskRunner(address=dask_address)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    spec = load_cluster_spec(cluster)
    if spec.dask_config:
        dask.config.set(spec.dask_config)
    kwargs = dict(spec.cluster_kwargs)
    adapt = None if spec.adapt_kwargs is None else dict(spec.adapt_kwargs)
    for key, value in (cluster_options or {}).items():
        if key == "adapt":
            if value is not None:
                raise ValueError("cluster option adapt takes only null (adapt.<name>=... sets one)")
            adapt = None
        elif key.startswith("adapt."):
            adapt = {**(adapt or {}), key.removeprefix("adapt."): value}
        else:
            kwargs[key] = value
    if workers is not None:
        kwargs["n_workers"] = workers
    return DaskTaskRunner(
        cluster_class=spec.cluster_class, cluster_kwargs=kwargs, adapt_kwargs=adapt
    )
