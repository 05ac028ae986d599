"""tasks.resume.resumable: within a flow run a repeated call returns the kept
result without computing; another run, other arguments or no run compute."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

import tasks.resume as resume
from tasks.io.store import load_task_result


class Config(BaseModel):
    size: int = 1


def _counting():
    calls = []

    @resume.resumable
    def work(store: str, relpaths: list[str], config: Config) -> dict:
        calls.append(relpaths)
        return {"n": len(relpaths) * config.size}

    return work, calls


def test_same_run_same_arguments_compute_once(tmp_path, monkeypatch):
    store = str(tmp_path / "s.zarr")
    work, calls = _counting()
    monkeypatch.setattr(resume, "flow_run_id", lambda: "run-1")
    assert work(store, ["a", "b"], Config(size=3)) == {"n": 6}
    assert work(store, ["a", "b"], config=Config(size=3)) == {"n": 6}
    assert calls == [["a", "b"]]
    assert work(store, ["a", "b"], Config(size=2)) == {"n": 4}  # other arguments
    monkeypatch.setattr(resume, "flow_run_id", lambda: "run-2")
    assert work(store, ["a", "b"], Config(size=3)) == {"n": 6}  # another run
    assert len(calls) == 3


def test_outside_a_flow_run_nothing_is_kept(tmp_path):
    store = str(tmp_path / "s.zarr")
    work, calls = _counting()
    work(store, ["a"], Config())
    work(store, ["a"], Config())
    assert len(calls) == 2
    assert not (tmp_path / ".s.zarr.runs").exists()


def test_a_failed_call_keeps_nothing(tmp_path, monkeypatch):
    store = str(tmp_path / "s.zarr")
    monkeypatch.setattr(resume, "flow_run_id", lambda: "run-1")

    @resume.resumable
    def fails(store: str, x: int) -> int:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fails(store, 1)
    key = resume.argument_key(fails.__wrapped__, (store, 1), {})
    assert load_task_result(store, "run-1", key) is None


def test_arguments_without_a_stable_key_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(resume, "flow_run_id", lambda: "run-1")

    @resume.resumable
    def work(store: str, thing: object) -> None:
        return None

    with pytest.raises(TypeError, match="resumable task work: an argument object"):
        work(str(tmp_path), object())


def test_a_function_without_store_is_refused():
    with pytest.raises(TypeError, match="needs a 'store' argument"):
        resume.resumable(lambda x: x)
