"""An S3 store reached from the configuration file's [store] table alone: the
endpoint of the test's S3 server (moto's, on loopback) and the *names* of the
environment variables holding the credentials, with none of the standard AWS_*
variables set; processes started afterwards (as Dask workers and Slurm jobs
are) reach it too, and the file's secrets never land in the environment."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import s3fs
import xarray as xr

from flows.cli import main
from tasks.config import ConfigError, load_config
from tasks.io import objstore
from tasks.io.objstore import STORE_CONFIG_ENV, storage_options
from tasks.io.store import read_group, write_group

STANDARD = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture
def site(s3_server, tmp_path, monkeypatch):
    """A bucket with one group, the credentials under site-specific names, the
    standard variables unset, and a configuration file naming them: (store URL,
    configuration path, access key id)."""
    # Set and unset: the CLI sets it in this process, so it must be restored.
    monkeypatch.setenv(STORE_CONFIG_ENV, "")
    monkeypatch.delenv(STORE_CONFIG_ENV)
    key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    bucket = f"photocal-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    store = f"s3://{bucket}/photocal.zarr"
    write_group(store, "index/2026-03-10", xr.Dataset({"flux": ("obs", np.arange(5.0))}))
    for name in STANDARD:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role probe
    monkeypatch.setenv("SURVEY_S3_KEY", key)
    monkeypatch.setenv("SURVEY_S3_SECRET", secret)
    # s3fs keeps a file system per set of options, and tasks.io.objstore a store:
    # ones made with the standard variables would still reach the server.
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(objstore, "_STORES", {})
    config = tmp_path / "photocal.toml"
    config.write_text(
        "[store]\n"
        f'endpoint_url = "{s3_server}"\n'
        'region = "us-east-1"\n'
        'key_env = "SURVEY_S3_KEY"\n'
        'secret_env = "SURVEY_S3_SECRET"\n'
    )
    yield store, config, key
    s3fs.S3FileSystem.clear_instance_cache()


def test_the_store_table_reaches_an_s3_store_without_the_aws_variables(site, capsys):
    store, config, key = site
    # The control: without the file nothing says where the server is or who we are.
    assert main(["store", "ls", store]) == 1
    assert "credentials" in capsys.readouterr().err.lower()
    assert main(["store", "ls", store, "--config", str(config)]) == 0
    out = capsys.readouterr()
    assert out.out.split()[:2] == ["index/2026-03-10", "complete"], out
    # Only the variables' names went into the environment, not the key.
    assert "SURVEY_S3_KEY" in os.environ[STORE_CONFIG_ENV]
    assert key not in os.environ[STORE_CONFIG_ENV]
    np.testing.assert_array_equal(read_group(store, "index/2026-03-10").flux, np.arange(5.0))
    # A process started from here (a local Dask worker, a Slurm job) resolves
    # the same table from its own environment.
    read = (
        "from tasks.io.store import read_group; "
        f"print(read_group({store!r}, 'index/2026-03-10').flux.values.sum())"
    )
    child = subprocess.run(
        [sys.executable, "-c", read],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "10.0"


def test_a_credentials_variable_that_is_not_set_is_named(site, monkeypatch, capsys):
    store, config, _ = site
    monkeypatch.delenv("SURVEY_S3_SECRET")
    assert main(["store", "ls", store, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "secret_env = 'SURVEY_S3_SECRET'" in err
    assert "not set" in err


def test_storage_options_from_the_table_and_the_environment(monkeypatch):
    monkeypatch.setenv("K_ID", "id-1")
    monkeypatch.setenv("K_SECRET", "s-1")
    table = load_config(
        {
            "store": {
                "endpoint_url": "http://127.0.0.1:9",
                "region": "eu-west-3",
                "key_env": "K_ID",
                "secret_env": "K_SECRET",
                "storage_options": {"client_kwargs": {"verify": False}, "anon": False},
            }
        }
    )["store"]
    assert table.fsspec_options() == {
        "endpoint_url": "http://127.0.0.1:9",
        "client_kwargs": {"verify": False, "region_name": "eu-west-3"},
        "key": "id-1",
        "secret": "s-1",
        "anon": False,
    }
    # PHOTOCAL_STORAGE_OPTIONS, set by hand, wins over the table.
    monkeypatch.setenv(STORE_CONFIG_ENV, table.model_dump_json(exclude_defaults=True))
    monkeypatch.setenv("PHOTOCAL_STORAGE_OPTIONS", '{"endpoint_url": "http://127.0.0.1:10"}')
    assert storage_options("s3://b/p")["endpoint_url"] == "http://127.0.0.1:10"
    assert storage_options("s3://b/p")["key"] == "id-1"
    with pytest.raises(ConfigError, match=r"\[store\] unknown key 'endpoint'"):
        load_config({"store": {"endpoint": "http://x"}})
