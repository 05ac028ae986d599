"""The photocal Zarr store: one Zarr v3 hierarchy, groups written as xarray
Datasets, each write atomic per group (BRIEF §4, docs/store.md).

Atomicity. On a local store a group is written in full to a staging directory
beside the store and then swapped into place with directory renames, so a reader
sees either the old group, no group, or the complete new one. Every group also
carries ``attrs['photocal_complete'] = True``, written last; readers treat a
group without it as absent, which also protects object stores (fsspec URLs),
where the group is written in place.

Concurrency. Publishing a group on a local store (the directory swap) holds an
exclusive lock on that group (:func:`group_lock`), so two runs rewriting the same
group at once (a nightly run and a backfill) publish one after the other: the
group ends up as one writer's complete output, never a mix, and neither fails.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from tasks.io.provenance import version_attrs

COMPLETE_ATTR = "photocal_complete"
# What zarr raises when a path holds no group: nothing there, or an array.
_NOT_A_GROUP = (
    FileNotFoundError,
    KeyError,
    zarr.errors.GroupNotFoundError,
    zarr.errors.ContainsArrayError,
    zarr.errors.NodeTypeValidationError,
)


class StoreError(RuntimeError):
    """A store group is missing, incomplete or malformed."""


def is_local(store: str | os.PathLike) -> bool:
    """Whether ``store`` is a local path (plain or ``file://``), not an object store."""
    s = str(store)
    return "://" not in s or s.startswith("file://")


def local_path(store: str | os.PathLike) -> Path:
    """The filesystem path of a local store."""
    s = str(store)
    return Path(s.removeprefix("file://"))


# One path component of a group name: letters, digits, '_', '-', '.', not starting
# with '.'. Group names are built from user parameters (nights, bands, periods), so
# this is what keeps them inside the store: no '..', no absolute or drive paths, no
# backslashes, URL schemes, NULs or other characters a filesystem may interpret.
_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def _check_group_name(group: str) -> str:
    """``group`` without surrounding slashes; ValueError unless every part is safe."""
    parts = group.strip("/").split("/") if isinstance(group, str) else [""]
    if not all(_NAME_PART.fullmatch(p) for p in parts):
        raise ValueError(
            f"invalid store group name {group!r}: parts must be letters, digits, "
            "'_', '-' or '.', not starting with '.'"
        )
    return "/".join(parts)


@contextmanager
def group_lock(store: str | os.PathLike, group: str, *, shared: bool = False) -> Iterator[None]:
    """Hold the lock of ``group`` of a local store (object stores: no-op).

    Writers take it exclusively to publish a group; a loaded read takes it shared,
    so it never mixes arrays of two versions. The lock is an ``flock`` on
    ``.<store>.locks/<group>.lock`` beside the store (``/`` in the name becomes
    ``~``, which group names cannot contain). The kernel releases it when its
    holder exits, killed or not, so a crashed writer leaves no stale lock. Lock
    files stay: deleting one while another process waits on it would let a third
    lock a new file of the same name. A reader that cannot create the lock file
    (a read-only store) reads without it.
    """
    group = _check_group_name(group)
    if not is_local(store):
        yield
        return
    root = local_path(store)
    locks = root.parent / f".{root.name}.locks"
    if shared and not root.is_dir():
        yield  # nothing to read, nothing to wait for
        return
    try:
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{group.replace('/', '~')}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if not shared:
            raise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _json_safe(value: Any) -> Any:
    """Attrs must be JSON: turn numpy scalars, paths and tuples into plain values."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, os.PathLike)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"attribute value of type {type(obj).__name__} is not JSON-serialisable")


def _prepare(ds: xr.Dataset) -> xr.Dataset:
    """Strings go to Zarr as variable-length UTF-8 (object dtype): fixed-width
    unicode has no stable Zarr v3 specification."""
    out = ds.copy()
    for name, var in list(out.variables.items()):
        if var.dtype.kind == "U" or var.dtype.kind == "T":
            out[name] = var.copy(data=np.asarray(var.values, dtype=object))
    return out


def _ensure_parents(root: Path | str, group: str) -> None:
    """Create the intermediate groups (with their zarr.json) above ``group``.

    Two runs starting on a fresh store create the same parents at once; zarr's
    look-then-create loses that race with ContainsGroupError, which here only
    means that the other run created it first.
    """
    try:
        g = zarr.open_group(str(root), mode="a", zarr_format=3)
    except zarr.errors.ContainsGroupError:
        g = zarr.open_group(str(root), mode="r+", zarr_format=3)
    for part in group.split("/")[:-1]:
        try:
            g = g.require_group(part)
        except zarr.errors.ContainsGroupError:
            g = zarr.open_group(g.store, path=f"{g.path}/{part}".lstrip("/"), mode="r+")


def write_group(
    store: str | os.PathLike,
    group: str,
    ds: xr.Dataset,
    *,
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write ``ds`` as ``store/group``, replacing any previous version atomically.

    Parameters
    ----------
    store : str or path
        Local path of the Zarr store (created if missing) or an fsspec URL.
    group : str
        Group path such as ``'index/2026-03-10'``.
    ds : xarray.Dataset
        The content. String variables are stored as variable-length UTF-8.
    attrs : mapping, optional
        Provenance written into the group's attrs (configuration, inputs; see
        :func:`tasks.io.provenance.provenance`); the photocal version, the code
        revision and the completion marker are added.
    """
    group = _check_group_name(group)
    ds = _prepare(ds)
    ds.attrs = {
        **_json_safe(dict(ds.attrs)),
        **_json_safe(dict(attrs or {})),
        **version_attrs(),
    }
    if not is_local(store):
        _write_in_place(str(store), group, ds)
        return
    root = local_path(store)
    root.mkdir(parents=True, exist_ok=True)
    _ensure_parents(root, group)
    staging_root = root.parent / f".{root.name}.staging"
    staging_root.mkdir(exist_ok=True)
    staging = staging_root / uuid.uuid4().hex
    trash = staging_root / f"old-{uuid.uuid4().hex}"
    try:
        ds.to_zarr(str(staging), mode="w", consolidated=False, zarr_format=3)
        zarr.open_group(str(staging), mode="r+").attrs[COMPLETE_ATTR] = True
        _publish(store, group, staging, trash)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(store: str | os.PathLike, group: str, staging: Path, trash: Path) -> None:
    """Swap the complete group at ``staging`` into ``store/group``, under its lock."""
    target = local_path(store) / group
    with group_lock(store, group):
        if target.exists():
            target.rename(trash)
        try:
            staging.rename(target)
        except OSError:
            # Put the previous version back: a failed rewrite must not lose it.
            if trash.exists():
                trash.rename(target)
            raise
    shutil.rmtree(trash, ignore_errors=True)


def _write_in_place(store: str, group: str, ds: xr.Dataset) -> None:
    root = zarr.open_group(store, mode="a", zarr_format=3)
    if group in root:
        # Readers must stop trusting the old group before it is overwritten.
        root[group].attrs[COMPLETE_ATTR] = False
    _ensure_parents(store, group)
    ds.to_zarr(store, group=group, mode="w", consolidated=False, zarr_format=3)
    zarr.open_group(store, path=group, mode="r+").attrs[COMPLETE_ATTR] = True


def group_exists(store: str | os.PathLike, group: str) -> bool:
    """True when ``group`` exists and was completely written."""
    group = _check_group_name(group)
    try:
        g = zarr.open_group(str(store), path=group, mode="r")
    except _NOT_A_GROUP:
        return False
    return bool(g.attrs.get(COMPLETE_ATTR, False))


def read_group(store: str | os.PathLike, group: str, *, load: bool = True) -> xr.Dataset:
    """Open a complete group as a Dataset (loaded into memory unless ``load=False``).

    A loaded read holds the group's shared lock, so a concurrent rewrite cannot
    swap versions under it; a lazy one (``load=False``) reads chunks by path later
    and is only as stable as the group it points to.
    """
    path = _check_group_name(group)
    if not load:
        _require_complete(store, path)
        return xr.open_zarr(str(store), group=path, consolidated=False)
    with group_lock(store, path, shared=True):
        _require_complete(store, path)
        # Loaded groups are read without dask: a read inside a task running on a
        # Dask worker would otherwise submit to that worker's own cluster and, with
        # every worker thread busy (one worker, one thread), wait for itself forever.
        return xr.open_zarr(str(store), group=path, consolidated=False, chunks=None).load()


def _require_complete(store: str | os.PathLike, group: str) -> None:
    if not group_exists(store, group):
        raise StoreError(f"{store}: group {group!r} is missing or incomplete")


def list_groups(store: str | os.PathLike, prefix: str) -> list[str]:
    """Names of the complete child groups of ``prefix`` (e.g. nights under 'index')."""
    prefix = _check_group_name(prefix)
    try:
        parent = zarr.open_group(str(store), path=prefix, mode="r")
    except _NOT_A_GROUP:
        return []
    return sorted(name for name, child in parent.groups() if child.attrs.get(COMPLETE_ATTR, False))


# -- groups built piecewise by parallel tasks -------------------------------------


def begin_group(store: str | os.PathLike, group: str, template: xr.Dataset) -> str:
    """Start building ``group`` from parallel pieces; returns the staging location.

    ``template`` fixes variables, shapes, dtypes and chunks (use lazy dask arrays:
    nothing but metadata is written). Tasks then call :func:`write_region` on
    disjoint regions aligned with the chunks, and one call of :func:`commit_group`
    publishes the result atomically. On a local store the staging location is a
    private directory beside the store; on an object store it is the group itself,
    invisible to readers until committed.
    """
    group = _check_group_name(group)
    template = _prepare(template)
    if is_local(store):
        root = local_path(store)
        root.mkdir(parents=True, exist_ok=True)
        staging_root = root.parent / f".{root.name}.staging"
        staging_root.mkdir(exist_ok=True)
        staging = str(staging_root / uuid.uuid4().hex)
        template.to_zarr(staging, mode="w", consolidated=False, zarr_format=3, compute=False)
        return staging
    root_group = zarr.open_group(str(store), mode="a", zarr_format=3)
    if group in root_group:
        root_group[group].attrs[COMPLETE_ATTR] = False
    _ensure_parents(str(store), group)
    template.to_zarr(
        str(store), group=group, mode="w", consolidated=False, zarr_format=3, compute=False
    )
    return f"{store}#{group}"


def _split_staging(staging: str) -> tuple[str, str | None]:
    if "#" in staging:
        store, group = staging.rsplit("#", 1)
        return store, group
    return staging, None


def write_region(staging: str, ds: xr.Dataset, region: Mapping[str, slice]) -> None:
    """Write ``ds`` into ``region`` of a group started with :func:`begin_group`."""
    store, group = _split_staging(staging)
    _prepare(ds).drop_attrs().to_zarr(
        store, group=group, region=dict(region), consolidated=False, zarr_format=3
    )


def open_staging(staging: str) -> xr.Dataset:
    """The group being built, lazily (to read pieces back before committing)."""
    store, group = _split_staging(staging)
    return xr.open_zarr(store, group=group, consolidated=False)


def commit_group(
    store: str | os.PathLike, group: str, staging: str, *, attrs: Mapping[str, Any] | None = None
) -> None:
    """Publish a group built with :func:`begin_group`, replacing any previous version."""
    group = _check_group_name(group)
    stage_store, stage_group = _split_staging(staging)
    meta = {**_json_safe(dict(attrs or {})), **version_attrs()}
    node = zarr.open_group(stage_store, path=stage_group or "", mode="r+")
    node.attrs.update(meta)
    node.attrs[COMPLETE_ATTR] = True
    if stage_group is not None:
        return
    _ensure_parents(local_path(store), group)
    _publish(store, group, Path(staging), Path(staging).parent / f"old-{uuid.uuid4().hex}")


def abandon_group(staging: str) -> None:
    """Drop a local staging directory (a failed build); object stores keep the
    unmarked group, which readers ignore and the next build overwrites."""
    _, group = _split_staging(staging)
    if group is None:
        shutil.rmtree(staging, ignore_errors=True)


def staging_committed(store: str | os.PathLike, group: str, staging: str) -> bool:
    """True when the build of ``group`` at ``staging`` was already committed: a
    piece re-run after that (Dask recomputes lost results when a worker dies)
    must not write again."""
    if not group_exists(store, group):
        return False
    _, stage_group = _split_staging(staging)
    return stage_group is not None or not os.path.isdir(staging)


def list_children(store: str | os.PathLike, prefix: str) -> list[str]:
    """Names of every child group of ``prefix`` (complete or not; parents such as
    ``nights/<night>`` carry no completion marker of their own)."""
    prefix = _check_group_name(prefix)
    try:
        parent = zarr.open_group(str(store), path=prefix, mode="r")
    except _NOT_A_GROUP:
        return []
    return sorted(name for name, _ in parent.groups())
