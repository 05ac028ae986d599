"""Group names come from one module and follow the store contract (BRIEF §4)."""

from __future__ import annotations

import pytest

from tasks.io import groups
from tasks.io.store import _check_group_name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (groups.index("2026-03-10"), "index/2026-03-10"),
        (groups.bias("2026-03-05"), "masters/bias/2026-03-05"),
        (groups.flat("r", "2026-03-05"), "masters/flat/r/2026-03-05"),
        (groups.exposures("2026-03-10"), "nights/2026-03-10/exposures"),
        (groups.catalog("2026-03-10"), "nights/2026-03-10/catalog"),
        (groups.kept_reduced("2026-03-10"), "nights/2026-03-10/reduced"),
        (groups.reduced("2026-03-10", 17), "nights/2026-03-10/reduced/17"),
        (groups.ubercal("g"), "ubercal/g"),
        (groups.scores("2026-03-10"), "ml/scores/2026-03-10"),
        (groups.transients("2026-03-10"), "transients/2026-03-10"),
        (groups.lightcurve("sn2026abc"), "lightcurves/sn2026abc"),
        (groups.lightcurve_forced("sn2026abc"), "lightcurves_forced/sn2026abc"),
        (groups.index(groups.UNKNOWN_NIGHT), "index/unknown-night"),
        (groups.rejected(groups.UNKNOWN_NIGHT), "nights/unknown-night/rejected"),
    ],
)
def test_names_follow_the_store_contract(name, expected):
    assert name == expected
    assert _check_group_name(name) == expected


def test_parents_are_the_prefixes_of_their_groups():
    assert groups.index("n").startswith(groups.INDEX + "/")
    assert groups.bias("p").startswith(groups.BIAS + "/")
    assert groups.catalog("n").startswith(groups.NIGHTS + "/")
    assert groups.scores("n").startswith(groups.SCORES + "/")
    assert groups.lightcurve("x").startswith(groups.LIGHTCURVES + "/")
    assert groups.lightcurve_forced("x").startswith(groups.LIGHTCURVES_FORCED + "/")
    assert groups.reduced("n", 3).startswith(groups.kept_reduced("n") + "/")
    assert groups.flats("r").startswith(groups.FLATS + "/")
