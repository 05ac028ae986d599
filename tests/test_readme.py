"""The README's reliability table states what the tests do: each count in it is
read here from the test (or the code) that it stands for, so the two cannot
drift apart. The table's outcomes are asserted by those tests themselves."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from sim.badfiles import ALL_KINDS

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
HYPOTHESIS_DEFAULT_EXAMPLES = 100


def _row(label: str) -> str:
    """The README reliability table's row that starts with ``label``."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(f"| {label} |"):
            return line
    raise AssertionError(f"README has no reliability row {label!r}")


def _function(path: Path, name: str) -> ast.FunctionDef:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{path.name} has no function {name}")


def _max_examples(path: Path, name: str) -> int:
    """Hypothesis examples per run of a test: its @settings(max_examples=...)."""
    for deco in _function(path, name).decorator_list:
        if isinstance(deco, ast.Call) and getattr(deco.func, "id", "") == "settings":
            for kw in deco.keywords:
                if kw.arg == "max_examples":
                    return int(ast.literal_eval(kw.value))
    return HYPOTHESIS_DEFAULT_EXAMPLES


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\b\d+\b", text)]


def test_bad_inputs_row_counts_the_corpus(tiny_survey):
    cells = _row("bad inputs").split("|")
    tried, outcome = cells[2], cells[3]
    # 15 kinds of raw file, the catalog missing columns as FITS and ECSV, an empty night.
    assert f"{len(ALL_KINDS)} kinds of raw file" in tried
    assert tried.strip().startswith(f"{len(ALL_KINDS) + 2 + 1}:")
    assert f"the {tiny_survey.n_files} good files all indexed" in outcome


def test_property_row_counts_the_hypothesis_examples():
    raw, store = TESTS / "tasks/io/test_raw.py", TESTS / "tasks/io/test_store.py"
    headers = _max_examples(raw, "test_any_header_damage_is_accepted_or_rejected_with_one_line")
    sections = _max_examples(raw, "test_parse_section_round_trips_every_valid_section")
    sections += _max_examples(raw, "test_parse_section_accepts_only_valid_sections")
    names = _max_examples(store, "test_no_group_name_escapes_the_store")
    tried = _row("property tests (Hypothesis)").split("|")[2]
    assert f"{headers} damaged headers, {sections} section strings, {names} group names" in tried


def test_writer_kill_and_concurrency_rows_count_the_processes():
    faults = (TESTS / "tasks/io/test_store_faults.py").read_text()
    (kills,) = re.findall(r"^MIN_KILLS = (\d+)$", faults, flags=re.M)
    (most,) = re.findall(r"^MAX_KILLS = (\d+)$", faults, flags=re.M)
    (versions,) = re.findall(r"_start_writer\(store, w, (\d+)\) for w in \(1, 2\)", faults)
    assert _numbers(_row("writer SIGKILLed mid-write").split("|")[2])[:2] == [int(kills), int(most)]
    assert f"2 x {versions} rewrites" in _row(
        "two writers of one group at once, a third process reading"
    )


@pytest.mark.parametrize(
    "label", ["lock holder SIGKILLed", "Dask worker SIGKILLed during photometry"]
)
def test_single_fault_rows_say_one(label):
    assert _numbers(_row(label).split("|")[2])[0] == 1
