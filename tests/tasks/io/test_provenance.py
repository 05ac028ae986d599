"""Every group records the code that wrote it: a version computed from git
(never the old fixed 0.1.0) and the commit."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from packaging.version import Version

from tasks.io.provenance import code_revision, photocal_version, provenance

ROOT = Path(__file__).resolve().parents[3]


def test_version_is_computed_and_revision_is_the_running_commit():
    version = photocal_version()
    Version(version)  # PEP 440
    assert version != "0.1.0"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert re.fullmatch(rf"{head}(-dirty)?", code_revision())
    written = (ROOT / "tasks" / "_version.py").read_text()
    assert re.search(r'commit = "g?[0-9a-f]{7,40}"', written)


def test_provenance_has_stage_config_inputs_and_code():
    from tasks.masters import MastersConfig

    attrs = provenance("masters", config=MastersConfig(), inputs=["a.fits"], period="2026-03-05")
    assert attrs["stage"] == "masters"
    assert attrs["config"]["period_days"] == 20
    assert attrs["inputs"] == ["a.fits"]
    assert attrs["period"] == "2026-03-05"
    assert attrs["code_revision"] == code_revision()
    assert attrs["photocal_version"] == photocal_version()
