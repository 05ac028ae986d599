"""The photocal command line: every command documents itself, refuses bad
arguments with a message naming them, and simulate writes a survey."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.cli import build_parser, main


@pytest.mark.parametrize(
    "command",
    [[], ["simulate"], ["run"], ["report"], ["demo"], ["serve"], ["config"], ["ingest"]],
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: photocal" in out
    if command == ["run"]:
        options = ("--store", "--raw", "--night", "--stages", "--config", "--dask-address")
        for option in (*options, "--workers"):
            assert option in out
    if command not in ([], ["config"], ["ingest"]):
        assert "--verbose" in out


def test_run_help_says_what_each_option_needs(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "needed by reduce, photometry, ubercal, train and score" in out
    assert "in any order: they always run in that order" in out
    assert "-116.865" in out
    assert "evening date" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--store", "s", "--stages", "index,teleport"], "teleport"),
        (["run", "--store", "s", "--night", "2026-13-45"], "2026-13-45"),
        (["run", "--store", "s", "--workers", "0"], "must be >= 1"),
        (["run", "--store", "s", "--workers", "2", "--dask-address", "tcp://x:1"], "not allowed"),
        (["simulate", "out", "--preset", "huge"], "huge"),
        (["simulate", "out", "--domain", "Z"], "Z"),
        (["serve", "--port", "70000"], "1..65535"),
        (["report", "store"], "--out"),
    ],
)
def test_bad_arguments_name_what_is_wrong(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_run_without_raw_says_so(capsys):
    assert main(["run", "--store", "nowhere.zarr"]) == 2
    assert "--raw" in capsys.readouterr().err


def test_simulate_writes_the_three_outputs(tmp_path, capsys):
    assert (
        main(["simulate", str(tmp_path / "sim"), "--preset", "tiny", "--seed", "9", "--jobs", "1"])
        == 0
    )
    out = capsys.readouterr().out
    assert "simulated 22 exposures" in out
    assert (tmp_path / "sim" / "refcat.fits").is_file()
    assert (tmp_path / "sim" / "truth.zarr" / "zp" / "zarr.json").is_file()
    assert len(list((tmp_path / "sim" / "raw").rglob("*.fits"))) == 22


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "simulate" in result.stdout
    assert "demo" in result.stdout


def test_serve_refuses_a_port_in_use(capsys):
    """Another server on the port would silently take the UI's requests."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert f"port {port}" in capsys.readouterr().err
