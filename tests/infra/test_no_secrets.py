"""No credentials in the repository: every tracked (or new, not ignored) text file
is scanned for private keys, cloud and API tokens, and passwords or auth strings
given literally instead of taken from the environment."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Written in pieces so that this file does not match itself.
_PATTERNS = {
    "private key": re.compile("-----BEGIN [A-Z ]*" + "PRIVATE KEY-----"),
    "AWS access key": re.compile(r"\b" + "AKIA" + r"[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_" + r"[A-Za-z0-9]{36}\b"),
    "Prefect Cloud key": re.compile(r"\bpnu_" + r"[A-Za-z0-9]{36}\b"),
    "password in a URL": re.compile(r"://[A-Za-z0-9_.-]+:(?!\$\{)[^@\s/$]+@"),
    "literal credential": re.compile(
        r"\b[A-Z_]*(PASSWORD|AUTH_STRING|SECRET|TOKEN|API_KEY)[\"']?\s*[:=]\s*"
        r"[\"']?(?![$<{?]|user:password\b)([^\s\"'`,)]{4,})"
    ),
}


def repo_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "work", "__pycache__", ".hypothesis", ".pytest_cache"}
        names = [
            str(p.relative_to(REPO))
            for p in REPO.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(REPO).parts)
        ]
    return [REPO / n for n in names if (REPO / n).is_file()]


def find_secrets(text: str) -> list[str]:
    return [
        f"{kind}: {m.group(0)[:40]}" for kind, rx in _PATTERNS.items() for m in rx.finditer(text)
    ]


def test_no_secrets_in_the_repository():
    files = repo_files()
    assert len(files) > 50
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        found += [f"{path.relative_to(REPO)}: {hit}" for hit in find_secrets(text)]
    assert found == []


@pytest.mark.parametrize(
    "text",
    [
        "-----BEGIN RSA " + "PRIVATE KEY-----",
        "aws_key = AKIA" + "ABCDEFGHIJKLMNOP",
        "key " + "pnu_" + "a" * 36,
        "PREFECT_SERVER_API_AUTH_STRING=" + "admin:hunter2",
        "url: postgresql+asyncpg://prefect:" + "s3cret@postgres:5432/prefect",
        'POSTGRES_PASSWORD: "' + 'hunter2"',
    ],
)
def test_the_scanner_finds_planted_secrets(text):
    assert find_secrets(text)


@pytest.mark.parametrize(
    "text",
    [
        "POSTGRES_PASSWORD: ${PREFECT_DB_PASSWORD:?set PREFECT_DB_PASSWORD}",
        "postgresql+asyncpg://prefect:${PREFECT_DB_PASSWORD}@postgres:5432/prefect",
        "set `PREFECT_SERVER_API_AUTH_STRING=user:password` on the server",
        "PREFECT_API_AUTH_STRING: ${PREFECT_API_AUTH}",
    ],
)
def test_the_scanner_lets_environment_references_through(text):
    assert find_secrets(text) == []
