"""Finished work is not done twice within a flow run.

When a Dask worker dies, the scheduler recomputes every result that lived only
in its memory, finished tasks included; when a flow run is retried, its tasks
run again. :func:`resumable` wraps a task function so that, within one flow run,
a call with the same arguments as a finished one returns that call's result,
kept in the store (:func:`tasks.io.store.save_task_result`), instead of
computing it again. Outside a flow run it only calls the function.

The key is the flow run, the function and its arguments (as JSON: strings,
numbers, lists, dicts and pydantic models), so a new run with new masters or a
new configuration never picks up an old result; :func:`forget_results_task` drops
a run's results when it finishes, and ``photocal store gc`` those of runs that
were killed.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import pickle
from collections.abc import Callable
from pathlib import PurePath
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError
from pydantic import BaseModel

from tasks.io.store import drop_task_results, load_task_result, save_task_result

F = TypeVar("F", bound=Callable[..., Any])


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger (its lines reach the Prefect UI), or this module's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def flow_run_id() -> str | None:
    """The id of the flow run this code runs in (in a task or a flow), or None."""
    task_ctx = TaskRunContext.get()
    if task_ctx is not None and task_ctx.task_run.flow_run_id is not None:
        return str(task_ctx.task_run.flow_run_id)
    flow_ctx = FlowRunContext.get()
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        return str(flow_ctx.flow_run.id)
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {"__model__": type(value).__qualname__, **value.model_dump(mode="json")}
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"{type(value).__name__} has no stable key")


def argument_key(fn: Callable[..., Any], args: tuple, kwargs: dict) -> str:
    """``<function>-<sha256 of its bound arguments as JSON>``."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    try:
        text = json.dumps(bound.arguments, default=_plain, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"resumable task {fn.__name__}: an argument {err}") from None
    return f"{fn.__name__}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def resumable(fn: F) -> F:
    """Keep the result of each finished call of ``fn`` (a task function with a
    ``store`` argument) for the rest of its flow run; a repeated call returns it.

    Put it under ``@task``: the task's retries, logs and states stay Prefect's.
    """
    signature = inspect.signature(fn)
    if "store" not in signature.parameters:
        raise TypeError(f"resumable task {fn.__name__} needs a 'store' argument")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        run = flow_run_id()
        if run is None:
            return fn(*args, **kwargs)
        store = signature.bind(*args, **kwargs).arguments["store"]
        key = argument_key(fn, args, kwargs)
        kept = load_task_result(store, run, key)
        if kept is not None:
            _logger().info("%s: finished earlier in this run; its kept result is used", key)
            return pickle.loads(kept)
        result = fn(*args, **kwargs)
        save_task_result(store, run, key, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        return result

    return wrapper  # type: ignore[return-value]


@task(name="forget-kept-results", retries=2, retry_delay_seconds=2)
def forget_results_task(store: str) -> None:
    """Drop the results this flow run kept (call it last, once the run succeeded)."""
    run = flow_run_id()
    if run is not None:
        drop_task_results(store, run)
