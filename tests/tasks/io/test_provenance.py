"""Every group records the code that wrote it: a version computed from git
(never the old fixed 0.1.0) and the commit."""

from __future__ import annotations

import re
import subprocess
import sys
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


def test_a_package_built_without_git_knows_its_version_and_commit(tmp_path):
    """`git archive` output (no .git; .git_archival.txt filled in by export-subst)
    builds a wheel whose tasks/_version.py names the commit."""
    import io
    import tarfile
    import zipfile

    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True)
    src = tmp_path / "src"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(src, filter="data")
    assert not (src / ".git").exists()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(src)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("photocal-*.whl")
    with zipfile.ZipFile(wheel) as z:
        written = z.read("tasks/_version.py").decode()
    assert f'commit = "g{head[:7]}' in written or f'commit = "{head[:7]}' in written
    # PEP 440. Until the repository has a release tag, an archive says 0.0 (no
    # distance to count from, unlike a checkout's 0.1.devN): the commit is what
    # identifies the code.
    Version(re.search(r'version = "([^"]+)"', written).group(1))
