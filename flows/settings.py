"""Operator settings: where the data are and where tasks run, from ``PHOTOCAL_*``
environment variables (or a ``.env`` file), so deployments and clusters change
without code changes."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class PhotocalSettings(BaseSettings):
    """Resolved per flow run; every field is ``PHOTOCAL_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="PHOTOCAL_", env_file=".env", extra="ignore")

    store: str = Field("work/photocal.zarr", description="Zarr store path or fsspec URL.")
    raw: str | None = Field(None, description="Root of the raw FITS tree (searched recursively).")
    refcat: str | None = Field(None, description="Reference catalog (FITS or ECSV).")
    dask_address: str | None = Field(
        None, description="tcp://host:port of a running dask scheduler; overrides `cluster`."
    )
    cluster: str = Field(
        "local",
        description="Cluster spec: a name in infra/clusters/ (local, slurm, kubernetes) "
        "or a path to a YAML spec.",
    )
    workers: int | None = Field(None, ge=1, description="Override the spec's worker count.")
    config: str | None = Field(
        None,
        description="Default configuration of every run (a TOML path, tasks/config.py); a "
        "deployment's `config` parameter replaces it.",
    )
    site_longitude_deg: float = Field(
        -116.8650,
        ge=-180.0,
        le=360.0,
        description="East-positive site longitude in degrees (default -116.865, Palomar).",
    )
    report_dir: str | None = Field(
        None,
        description="Where nightly and backfill runs write the HTML QA report; default "
        "<store>.report beside a local store.",
    )
    report_url: str | None = Field(
        None,
        description="URL under which report_dir is published (a web server), for the "
        "artifacts' links; default: a file:// link.",
    )
