"""The refactors of issue 15 change no output: index, masters and reduce+photometry
on the tiny preset give the arrays of ``tiny_seed3.npz`` (made before them) to
1e-9 relative (the centroid offsets, near 0 px, to 1e-9 px: ``ATOL``).

Deliberate changes of behaviour regenerate the golden copy in their own commit
(``pipeline_golden.py capture --preset tiny tests/golden/tiny_seed3.npz``) and say
why. The comparison needs the numerical libraries the copy was made with: with
others, last-bit differences in photutils or numpy are not ours to judge, so the
test skips and says which versions differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pipeline_golden import ATOL, collect, differences, library_versions, load, run_stages

GOLDEN = Path(__file__).with_name("tiny_seed3.npz")


def test_tiny_preset_outputs_equal_the_golden_copy(tiny_survey, tmp_path):
    golden, versions = load(GOLDEN)
    if versions != library_versions():
        pytest.skip(f"golden copy made with {versions}, this environment has {library_versions()}")
    store = run_stages(str(tiny_survey.raw), str(tmp_path / "s.zarr"), str(tiny_survey.refcat))
    fresh = collect(store)
    assert not differences(golden, fresh, rtol=1e-9, atol=ATOL)
    # The copy covers every stage's groups, so the comparison cannot pass empty.
    groups = {key.split(":")[0] for key in golden}
    for prefix in ("masters/bias/", "masters/flat/r/"):
        assert any(g.startswith(prefix) for g in groups), prefix
    for night in tiny_survey.nights:
        assert {f"nights/{night}/catalog", f"nights/{night}/exposures"} <= groups


def test_comparison_sees_a_last_bit_change_and_a_moved_nan():
    """The comparison itself: a 1e-8 relative change, a NaN moved, a string changed."""
    a = {"g:x": np.array([1.0, 2.0, np.nan]), "g:s": np.array(["a", "b"])}
    assert not differences(a, {k: v.copy() for k, v in a.items()}, rtol=1e-9)
    b = {"g:x": np.array([1.0, 2.0 * (1 + 1e-8), np.nan]), "g:s": a["g:s"]}
    assert differences(a, b, rtol=1e-9) == ["g:x: 1 of 2 values differ, max relative 1.00e-08"]
    c = {"g:x": np.array([1.0, np.nan, 3.0]), "g:s": np.array(["a", "c"])}
    assert len(differences(a, c, rtol=1e-9)) == 2
    # An absolute tolerance covers its variable only, and only up to itself.
    d = {"g:x": np.array([1e-12, 2.0, np.nan]), "g:s": a["g:s"]}
    e = {"g:x": np.array([2e-12, 2.0, np.nan]), "g:s": a["g:s"]}
    assert len(differences(d, e, rtol=1e-9)) == 1
    assert not differences(d, e, rtol=1e-9, atol={"x": 1e-11})
    assert len(differences(d, e, rtol=1e-9, atol={"x": 1e-13})) == 1
    assert len(differences(d, e, rtol=1e-9, atol={"y": 1e-11})) == 1
    assert differences(a, {"g:x": a["g:x"]}, rtol=1e-9) == ["g:s: missing from the new run"]
