"""The stage wiring's sequential runner calls task bodies as Prefect's map would."""

from __future__ import annotations

import pytest
from prefect import task, unmapped

from tasks.stages import SequentialRun


@task
def _add(a: int, b: int, c: int) -> tuple[int, int, int]:
    return (a, b, c)


def test_sequential_map_broadcasts_unmapped_and_zips_the_rest():
    run = SequentialRun()
    assert run.one(_add, 1, 2, 3) == (1, 2, 3)
    assert run.map(_add, unmapped(7), [1, 2, 3], [4, 5, 6]) == [(7, 1, 4), (7, 2, 5), (7, 3, 6)]
    assert run.map(_add, unmapped(7), [], []) == []
    with pytest.raises(ValueError, match=r"shorter|longer"):
        run.map(_add, unmapped(0), [1, 2], [3])
