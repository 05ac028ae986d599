"""What ``photocal store`` does: list groups with their state and version, copy
complete groups between any two store URLs, and remove what killed writers left
(docs/store.md)."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zarr

from tasks.io.objstore import object_store
from tasks.io.store import (
    COMPLETE_ATTR,
    StoreError,
    group_exists,
    group_lock,
    is_local,
    local_path,
    read_group,
    write_prepared,
)

DEFAULT_MIN_AGE_S = 12 * 3600.0
"""gc leaves staging younger than this: a build paused between its pieces (the
masters of a long period) must survive it."""


@dataclass(frozen=True)
class GroupState:
    """One group of a store: ``state`` is ``complete``, ``incomplete`` (written
    without its completion marker: a killed in-place writer) or ``removed`` (a
    rollback to before it existed); ``version`` and ``written`` on object stores."""

    name: str
    state: str
    version: int | None = None
    versions: int | None = None
    written: str | None = None


def list_store(store: str, prefix: str = "") -> list[GroupState]:
    """Every group under ``prefix`` (all of the store by default), by name."""
    prefix = prefix.strip("/")
    if not is_local(store):
        objects = object_store(store)
        out = []
        for name in objects.all_groups(prefix):
            history = objects.history(name)
            current = history[-1] if history else None
            state = "complete" if current and current.build else "removed"
            out.append(
                GroupState(
                    name,
                    state,
                    current.version if current else None,
                    len(history),
                    current.time if current else None,
                )
            )
        return out
    root = local_path(store)
    start = root / prefix if prefix else root
    out = []
    for dirpath, dirnames, files in os.walk(start):
        dirnames.sort()
        if "zarr.json" not in files or Path(dirpath) == root:
            continue
        try:
            node = zarr.open_group(dirpath, mode="r")
        except (zarr.errors.NodeTypeValidationError, zarr.errors.ContainsArrayError):
            dirnames.clear()  # an array: its chunks are no groups
            continue
        name = Path(dirpath).relative_to(root).as_posix()
        if node.attrs.get(COMPLETE_ATTR, False):
            out.append(GroupState(name, "complete"))
        elif any(True for _ in node.arrays()):
            out.append(GroupState(name, "incomplete"))
    return sorted(out, key=lambda g: g.name)


def copy_store(src: str, dst: str, groups: Iterable[str] | None = None) -> list[str]:
    """Copy complete groups of ``src`` to ``dst`` (every complete group by
    default), attrs unchanged, each published atomically at ``dst``. A named
    group that is not complete in ``src`` is an error, raised before anything
    is written."""
    names = (
        [g.name for g in list_store(src) if g.state == "complete"]
        if groups is None
        else [g.strip("/") for g in groups]
    )
    missing = [g for g in names if not group_exists(src, g)]
    if missing:
        raise StoreError(f"{src}: group(s) {missing} are missing or incomplete; nothing copied")
    for name in names:
        # A local source is read under its shared lock: a lazy read must not
        # straddle a rewrite. Object-store versions never change.
        with group_lock(src, name, shared=True):
            ds = read_group(src, name, load=False)
            ds.attrs = {k: v for k, v in ds.attrs.items() if k != COMPLETE_ATTR}
            for var in ds.variables.values():
                var.encoding = {k: v for k, v in var.encoding.items() if k in ("chunks", "dtype")}
            write_prepared(dst, name, ds)
    return names


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """Seconds in ``'90'``, ``'90s'``, ``'15m'``, ``'12h'`` or ``'2d'``."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"duration {text!r} is not a number with an optional s/m/h/d unit")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def _locked(lock: Path) -> bool:
    """True when a live writer holds ``lock`` (a staging directory's flock)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def collect_garbage(
    store: str, *, min_age_s: float = DEFAULT_MIN_AGE_S, dry_run: bool = False
) -> list[str]:
    """Remove what killed writers left: staging builds that nothing references,
    older than ``min_age_s`` and not locked (local: a writer's flock; object
    stores: an unexpired lease), and the kept task results of runs that
    stopped that long ago. Returns one line per thing removed (or, with
    ``dry_run``, that would be)."""
    now = time.time()
    removed: list[str] = []
    if is_local(store):
        root = local_path(store)
        staging = root.parent / f".{root.name}.staging"
        runs = root.parent / f".{root.name}.runs"
        for entry in sorted(staging.iterdir()) if staging.is_dir() else []:
            if not entry.exists():  # the lock file of a build removed just before
                continue
            if entry.suffix == ".lock":
                # A writer killed between publishing and dropping its lock file.
                orphan = not entry.with_suffix("").exists()
                if orphan and now - entry.lstat().st_mtime >= min_age_s and not _locked(entry):
                    removed.append(f"{entry}: lock file of a finished build")
                    if not dry_run:
                        entry.unlink(missing_ok=True)
                continue
            lock = entry.with_name(entry.name + ".lock")
            age = now - _newest_mtime(entry)
            if age < min_age_s or _locked(lock):
                continue
            kind = "swap leftover" if entry.name.startswith("old-") else "staging build"
            removed.append(f"{entry}: {kind}, last written {age:.0f} s ago")
            if not dry_run:
                shutil.rmtree(entry, ignore_errors=True)
                lock.unlink(missing_ok=True)
        for entry in sorted(runs.iterdir()) if runs.is_dir() else []:
            age = now - _newest_mtime(entry)
            if age >= min_age_s:
                removed.append(f"{entry}: kept task results of run {entry.name}, {age:.0f} s old")
                if not dry_run:
                    shutil.rmtree(entry, ignore_errors=True)
        return removed
    objects = object_store(store)
    referenced = objects.referenced_builds()
    for build in objects.builds():
        if build in referenced or objects.leased(build):
            continue
        age = now - objects.newest_write(objects.build_path(build))
        if age < min_age_s:
            continue
        removed.append(
            f"{objects.build_url(build)}: unpublished build, last written {age:.0f} s ago"
        )
        if not dry_run:
            objects.remove_build(build)
    for run in objects.runs():
        newest = objects.newest_write(objects.run_dir(run))
        if now - newest >= min_age_s:
            removed.append(f"{store}: kept task results of run {run}, {now - newest:.0f} s old")
            if not dry_run:
                objects.fs.rm(objects.run_dir(run), recursive=True)
    return removed


def roll_back(store: str, as_of, groups: Iterable[str] | None = None) -> list[str]:
    """Put every group (or the named ones) changed after ``as_of`` back to its
    version current then (absent if it did not exist): how a bad backfill is
    undone. Object stores only. Returns one line per group rolled back."""
    import datetime as dt

    from tasks.io.store import rollback_group

    if is_local(store):
        raise StoreError(f"{store}: a local store keeps one version of each group")
    as_of = as_of if as_of.tzinfo else as_of.replace(tzinfo=dt.UTC)
    objects = object_store(store)
    names = objects.all_groups() if groups is None else [g.strip("/") for g in groups]
    out = []
    for name in names:
        history = objects.history(name)
        if not history or history[-1].when <= as_of:
            continue
        entry = rollback_group(store, name, as_of=as_of)
        out.append(f"{name}: {entry.note} (now version {entry.version})")
    return out
