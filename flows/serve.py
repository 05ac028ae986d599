"""A local production stack: ``prefect server`` on loopback, a process work pool
and worker, and the deployments of infra/prefect.yaml (``photocal serve``)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO / "infra" / "prefect.yaml"
POOL = "photocal"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port_free(port: int) -> None:
    """Refuse a port already taken: the UI and clients would silently talk to
    whatever server holds it."""
    with socket.socket() as s:
        # As the server binds: a port left in TIME_WAIT by a stopped one is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise RuntimeError(
                f"port {port} on 127.0.0.1 is in use (another Prefect server?); "
                "choose another with --port"
            ) from None


def deployments() -> list[tuple[str, str]]:
    """(flow/deployment name, schedule or '') of every deployment in infra/prefect.yaml."""
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    out = []
    for d in spec.get("deployments", []):
        flow_name = d["entrypoint"].rsplit(":", 1)[1].replace("_", "-")
        crons = [f"cron {s['cron']} {s.get('timezone', 'UTC')}" for s in d.get("schedules") or []]
        out.append((f"{flow_name}/{d['name']}", ", ".join(crons)))
    return out


@dataclass
class Stack:
    api_url: str
    server: subprocess.Popen
    worker: subprocess.Popen | None
    env: dict[str, str]


def _prefect(*args: str, env: dict[str, str], timeout: float = 300) -> str:
    cmd = [sys.executable, "-m", "prefect", *args]
    result = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"`prefect {' '.join(args)}` failed ({result.returncode}):\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    return result.stdout


def _wait_healthy(api_url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {api_url} not healthy after {timeout:.0f} s")


@contextmanager
def local_stack(
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    start_worker: bool = True,
    startup_timeout: float = 180.0,
    log_dir: Path | None = None,
) -> Iterator[Stack]:
    """Start server (127.0.0.1 only), work pool, deployments and a worker; stop
    them on exit. ``env`` adds to the environment (PREFECT_HOME, PHOTOCAL_*)."""
    if port:
        check_port_free(port)
    port = port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    full_env = {
        **os.environ,
        **(env or {}),
        "PREFECT_API_URL": api_url,
        "PHOTOCAL_HOME": str(REPO),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    logs = log_dir or Path(full_env.get("PREFECT_HOME", REPO / "work")) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server_env = {k: v for k, v in full_env.items() if k != "PREFECT_API_URL"}
    # The UI asks /ui-settings where its API is: without these it says port 4200
    # whatever --port was, and would drive another server there.
    server_env |= {
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
    }
    log_files = contextlib.ExitStack()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=server_env,
        stdout=log_files.enter_context((logs / "server.log").open("w")),
        stderr=subprocess.STDOUT,
    )
    worker = None
    try:
        _wait_healthy(api_url, server, startup_timeout)
        _prefect("work-pool", "create", POOL, "--type", "process", "--overwrite", env=full_env)
        _prefect(
            "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML), env=full_env
        )
        if start_worker:
            worker = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
                cwd=REPO,
                env=full_env,
                stdout=log_files.enter_context((logs / "worker.log").open("w")),
                stderr=subprocess.STDOUT,
            )
        yield Stack(api_url=api_url, server=server, worker=worker, env=full_env)
    finally:
        for proc in (worker, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        log_files.close()
