"""Provenance of what photocal writes: the one place that builds the ``attrs``
every group carries (stage, resolved configuration, inputs, photocal version and
code revision), so no stage hand-builds its own.

The version is computed from git when the package is built or installed
(setuptools-scm, pyproject.toml) and written with the commit into
``tasks/_version.py``; :func:`code_revision` prefers the live checkout (an
editable install keeps working on newer commits than it was installed at) and
falls back to that file where there is no ``.git`` (a wheel, an sdist, a
``git archive``).
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import BaseModel

_SOURCE = Path(__file__).resolve().parents[2]


def photocal_version() -> str:
    """The installed package's version (PEP 440, from git at install time)."""
    try:
        return version("photocal")
    except PackageNotFoundError:
        return "unknown"


@functools.cache
def code_revision() -> str:
    """The commit of the code that runs: ``<sha1>`` or ``<sha1>-dirty`` from the
    checkout this module lives in, else the commit recorded at install time
    (``<sha1-prefix> (installed)``), else ``'unknown'``."""
    live = _git_revision(_SOURCE)
    if live is not None:
        return live
    try:
        from tasks._version import commit  # written by setuptools-scm at build time
    except ImportError:
        return "unknown"
    return f"{commit.removeprefix('g')} (installed)" if commit else "unknown"


def _git_revision(root: Path) -> str | None:
    if not (root / ".git").exists():
        return None
    try:
        sha = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *args], capture_output=True, text=True, check=True, cwd=root, timeout=10
    )
    return out.stdout.strip()


def version_attrs() -> dict[str, str]:
    """What every group records about the code that wrote it."""
    return {"photocal_version": photocal_version(), "code_revision": code_revision()}


def config_attrs(config: Any) -> Any:
    """A stage configuration as attrs (JSON values); a mapping of several
    configurations (``{'reduce': ..., 'photometry': ...}``) is dumped per entry."""
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    if isinstance(config, Mapping):
        return {k: config_attrs(v) for k, v in config.items()}
    return config


def provenance(
    stage: str,
    *,
    config: BaseModel | Mapping[str, Any] | None = None,
    inputs: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """The attrs of a group written by ``stage``.

    Parameters
    ----------
    stage : str
        The stage that wrote it (``'index'``, ``'masters'``, ``'ingest'``, ...).
    config : pydantic model or mapping of them, optional
        The resolved configuration the stage ran with.
    inputs : optional
        What it was made from (files, groups).
    **extra
        Stage-specific attrs (night, band, period, ...).

    Returns
    -------
    dict
        ``stage``, ``config``, ``inputs``, ``extra``, ``photocal_version`` and
        ``code_revision``; :func:`tasks.io.store.write_group` adds the version
        and revision again at write time, so they are never missing.
    """
    out: dict[str, Any] = {"stage": stage}
    if config is not None:
        out["config"] = config_attrs(config)
    if inputs is not None:
        out["inputs"] = inputs
    return {**out, **extra, **version_attrs()}
