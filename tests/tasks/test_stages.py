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


@task
def _fails_on(k: int, bad: int) -> int:
    if k == bad:
        raise ValueError(f"chunk {k} is bad")
    return k


@task
def _total(parts: list[int]) -> int:
    return sum(parts)


def test_prefect_one_fails_the_flow_when_a_mapped_upstream_failed(prefect_server):
    """A night written from chunks one of which failed: before, the writing task
    ended NotReady, the call returned None and the flow said Completed."""
    from prefect import flow

    from tasks.stages import PrefectRun

    @flow
    def night(bad: int) -> int:
        run = PrefectRun()
        parts = run.map(_fails_on, [0, 1, 2, 3], unmapped(bad))
        return run.one(_total, parts)

    assert night(bad=-1) == 6
    state = night(bad=2, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"_total.*NotReady|Upstream"):
        state.result()
