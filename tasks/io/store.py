"""The photocal Zarr store: one Zarr v3 hierarchy, groups written as xarray
Datasets, each write atomic per group (BRIEF §4, docs/store.md).

Atomicity. On a local store a group is written in full to a staging directory
beside the store and then swapped into place with directory renames, so a reader
sees either the old group, no group, or the complete new one. Every group also
carries ``attrs['photocal_complete'] = True``, written last; readers treat a
group without it as absent. On object stores (``s3://``) every write goes to a
fresh build prefix and is published by one conditional write of the group's ref
(:mod:`tasks.io.objstore`), which also keeps earlier versions readable.

Concurrency. Publishing a group on a local store (the directory swap) holds an
exclusive lock on that group (:func:`group_lock`), so two runs rewriting the same
group at once (a nightly run and a backfill) publish one after the other: the
group ends up as one writer's complete output, never a mix, and neither fails.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from tasks.io.objstore import META as _META
from tasks.io.objstore import ObjectStore, Version, object_store, unsafe_in_place
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
    ds = _prepare(ds)
    ds.attrs = {
        **_json_safe(dict(ds.attrs)),
        **_json_safe(dict(attrs or {})),
        **version_attrs(),
    }
    write_prepared(store, group, ds)


def write_prepared(store: str | os.PathLike, group: str, ds: xr.Dataset) -> None:
    """Write ``ds`` with its attrs as they are (the completion marker added):
    :func:`write_group` without the provenance, for copying a group unchanged."""
    group = _check_group_name(group)
    if not is_local(store):
        _write_object(object_store(str(store)), group, ds)
        return
    root = local_path(store)
    root.mkdir(parents=True, exist_ok=True)
    _ensure_parents(root, group)
    staging_root = root.parent / f".{root.name}.staging"
    staging_root.mkdir(exist_ok=True)
    staging = staging_root / uuid.uuid4().hex
    trash = staging_root / f"old-{uuid.uuid4().hex}"
    try:
        with staging_lock(staging):
            ds.to_zarr(str(staging), mode="w", consolidated=False, zarr_format=3)
            zarr.open_group(str(staging), mode="r+").attrs[COMPLETE_ATTR] = True
            _publish(store, group, staging, trash)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        _drop_staging_lock(staging)


@contextmanager
def staging_lock(staging: str | os.PathLike, *, shared: bool = False) -> Iterator[None]:
    """Hold the flock of a local staging directory while writing into it, so
    that ``photocal store gc`` never removes a build that is being written
    (gc takes it exclusively, without waiting)."""
    fd = os.open(f"{staging}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _drop_staging_lock(staging: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{staging}.lock")


def _write_object(objects: ObjectStore, group: str, ds: xr.Dataset) -> None:
    """Write a new build and publish it (or, with the protocol switched off for
    tests, overwrite the group's one build in place).

    The build is written to a local temporary directory and uploaded in one
    concurrent batch of PUTs: writing through zarr's fsspec store costs ~100
    sequential requests (existence checks, listings) for a small group, the
    batch one PUT per object (benchmarks/store_s3.py)."""
    build = objects.new_build(group)
    url = objects.build_url(build)
    with objects.leasing(build):
        if unsafe_in_place():
            _unmark(url)
            ds.to_zarr(
                url, mode="w", consolidated=False, zarr_format=3, storage_options=objects.options
            )
            _open(url, mode="r+").attrs[COMPLETE_ATTR] = True
        else:
            # Invisible until published, so the marker can go in with the rest.
            ds.attrs[COMPLETE_ATTR] = True
            with tempfile.TemporaryDirectory(prefix="photocal-build-") as tmp:
                ds.to_zarr(tmp, mode="w", consolidated=False, zarr_format=3)
                objects.upload(tmp, build)
        objects.publish(group, build, "write")


def _unmark(url: str) -> None:
    with contextlib.suppress(*_NOT_A_GROUP):
        _open(url, mode="r+").attrs[COMPLETE_ATTR] = False


def _open(url: str, *, mode: str) -> zarr.Group:
    """A Zarr group at a build URL (object stores) or path."""
    opts = None if is_local(url) else object_store_options(url)
    return zarr.open_group(url, mode=mode, zarr_format=3, storage_options=opts)


def object_store_options(url: str) -> dict[str, Any]:
    from tasks.io.objstore import storage_options

    return storage_options(url)


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


def _object_version(
    store: str | os.PathLike,
    group: str,
    version: int | None = None,
    as_of: dt.datetime | None = None,
) -> tuple[ObjectStore, Version] | None:
    """The object store and the resolved version of ``group``, or None; with the
    protocol switched off, only while its in-place build carries the marker."""
    objects = object_store(str(store))
    found = objects.resolve(group, version=version, as_of=as_of)
    if found is None:
        return None
    if unsafe_in_place():
        try:
            marked = _open(objects.build_url(found.build), mode="r").attrs.get(COMPLETE_ATTR)
        except _NOT_A_GROUP:
            return None
        if not marked:
            return None
    return objects, found


def group_exists(store: str | os.PathLike, group: str) -> bool:
    """True when ``group`` exists and was completely written."""
    group = _check_group_name(group)
    if not is_local(store):
        return _object_version(store, group) is not None
    try:
        g = zarr.open_group(str(store), path=group, mode="r")
    except _NOT_A_GROUP:
        return False
    return bool(g.attrs.get(COMPLETE_ATTR, False))


def read_group(
    store: str | os.PathLike,
    group: str,
    *,
    load: bool = True,
    version: int | None = None,
    as_of: dt.datetime | None = None,
) -> xr.Dataset:
    """Open a complete group as a Dataset (loaded into memory unless ``load=False``).

    A loaded read of a local store holds the group's shared lock, so a
    concurrent rewrite cannot swap versions under it; a lazy one (``load=False``)
    reads chunks by path later and is only as stable as the group it points to.
    On object stores every version is immutable, so lazy reads are stable too,
    and ``version`` (a number from :func:`group_history`) or ``as_of`` (the
    version current at that time; naive times are UTC) read an earlier one.
    """
    path = _check_group_name(group)
    if not is_local(store):
        found = _object_version(store, path, version, as_of)
        if found is None:
            which = (
                "" if version is None and as_of is None else f" (version {version}, as of {as_of})"
            )
            raise StoreError(f"{store}: group {path!r}{which} is missing or incomplete")
        objects, v = found
        if load:  # one listing and a concurrent batch of GETs, then a local read
            with tempfile.TemporaryDirectory(prefix="photocal-read-") as tmp:
                objects.download(v.build, tmp)
                return xr.open_zarr(tmp, consolidated=False, chunks=None).load()
        url = objects.build_url(v.build)
        return xr.open_zarr(url, consolidated=False, storage_options=objects.options)
    if version is not None or as_of is not None:
        raise StoreError(f"{store}: a local store keeps one version of each group")
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


def group_history(store: str | os.PathLike, group: str) -> list[Version]:
    """Every version of ``group``, oldest first (object stores; a local store's
    one version has no history: empty)."""
    group = _check_group_name(group)
    if is_local(store):
        return []
    return object_store(str(store)).history(group)


def rollback_group(
    store: str | os.PathLike,
    group: str,
    *,
    version: int | None = None,
    as_of: dt.datetime | None = None,
) -> Version:
    """Make an earlier version of ``group`` current again (object stores): the
    numbered ``version``, or the one current at ``as_of`` (absent if the group
    did not exist then). The rollback is itself a new version, so it can be undone."""
    group = _check_group_name(group)
    if is_local(store):
        raise StoreError(f"{store}: a local store keeps one version of each group")
    if (version is None) == (as_of is None):
        raise ValueError("give one of version or as_of")
    objects = object_store(str(store))
    if version is not None and not any(v.version == version for v in objects.history(group)):
        raise StoreError(f"{store}: group {group!r} has no version {version}")
    target = objects.resolve(group, version=version, as_of=as_of)
    note = f"rollback to version {target.version}" if target else "rollback to absent"
    return objects.publish(group, target.build if target else None, note)


def list_groups(store: str | os.PathLike, prefix: str) -> list[str]:
    """Names of the complete child groups of ``prefix`` (e.g. nights under 'index')."""
    prefix = _check_group_name(prefix)
    if not is_local(store):
        _, groups = object_store(str(store)).children(prefix)
        return [g for g in groups if group_exists(store, f"{prefix}/{g}")]
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
    private directory beside the store; on an object store it is a new build URL,
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
        with staging_lock(staging, shared=True):
            template.to_zarr(staging, mode="w", consolidated=False, zarr_format=3, compute=False)
        return staging
    objects = object_store(str(store))
    build = objects.new_build(group)
    staging = objects.build_url(build)
    objects.touch_lease(build)
    if unsafe_in_place():
        _unmark(staging)
    template.to_zarr(
        staging,
        mode="w",
        consolidated=False,
        zarr_format=3,
        compute=False,
        storage_options=objects.options,
    )
    return staging


@contextmanager
def _writing(staging: str) -> Iterator[dict[str, Any] | None]:
    """Guard a write into a staging location: the local flock, or the object
    build's lease renewed; yields the storage options to write with."""
    if is_local(staging):
        with staging_lock(staging, shared=True):
            yield None
        return
    objects = object_store(staging.split(f"/{_META}/data/")[0])
    objects.touch_lease(objects.build_of(staging))
    yield objects.options


def write_region(staging: str, ds: xr.Dataset, region: Mapping[str, slice]) -> None:
    """Write ``ds`` into ``region`` of a group started with :func:`begin_group`."""
    with _writing(staging) as options:
        _prepare(ds).drop_attrs().to_zarr(
            staging,
            region=dict(region),
            consolidated=False,
            zarr_format=3,
            storage_options=options,
        )


def open_staging(staging: str) -> xr.Dataset:
    """The group being built, lazily (to read pieces back before committing)."""
    options = None if is_local(staging) else object_store_options(staging)
    return xr.open_zarr(staging, consolidated=False, storage_options=options)


def commit_group(
    store: str | os.PathLike, group: str, staging: str, *, attrs: Mapping[str, Any] | None = None
) -> None:
    """Publish a group built with :func:`begin_group`, replacing any previous version."""
    group = _check_group_name(group)
    meta = {**_json_safe(dict(attrs or {})), **version_attrs()}
    with _writing(staging):
        node = _open(staging, mode="r+")
        node.attrs.update(meta)
        node.attrs[COMPLETE_ATTR] = True
    if not is_local(store):
        objects = object_store(str(store))
        build = objects.build_of(staging)
        objects.publish(group, build, "write")
        objects.drop_lease(build)
        return
    _ensure_parents(local_path(store), group)
    with staging_lock(staging):
        _publish(store, group, Path(staging), Path(staging).parent / f"old-{uuid.uuid4().hex}")
    _drop_staging_lock(staging)


def abandon_group(staging: str) -> None:
    """Drop the staging location of a failed build."""
    if is_local(staging):
        shutil.rmtree(staging, ignore_errors=True)
        _drop_staging_lock(staging)
        return
    objects = object_store(staging.split(f"/{_META}/data/")[0])
    objects.remove_build(objects.build_of(staging))


def staging_committed(store: str | os.PathLike, group: str, staging: str) -> bool:
    """True when the build of ``group`` at ``staging`` was already committed: a
    piece re-run after that (Dask recomputes lost results when a worker dies)
    must not write again."""
    if not is_local(store):
        objects = object_store(str(store))
        build = objects.build_of(staging)
        return any(v.build == build for v in objects.history(_check_group_name(group)))
    if not group_exists(store, group):
        return False
    return not os.path.isdir(staging)


def list_children(store: str | os.PathLike, prefix: str) -> list[str]:
    """Names of every child group of ``prefix`` (complete or not; parents such as
    ``nights/<night>`` carry no completion marker of their own)."""
    prefix = _check_group_name(prefix)
    if not is_local(store):
        parents, groups = object_store(str(store)).children(prefix)
        return sorted({*parents, *groups})
    try:
        parent = zarr.open_group(str(store), path=prefix, mode="r")
    except _NOT_A_GROUP:
        return []
    return sorted(name for name, _ in parent.groups())


# -- results of finished tasks, kept for the rest of their flow run -----------------


def _results_dir(store: str | os.PathLike, run: str) -> str:
    if is_local(store):
        root = local_path(store)
        return str(root.parent / f".{root.name}.runs" / _check_group_name(run))
    return object_store(str(store)).run_dir(_check_group_name(run))


def save_task_result(store: str | os.PathLike, run: str, key: str, payload: bytes) -> None:
    """Keep ``payload`` (a finished task's pickled result) for the rest of flow
    run ``run``; written whole or not at all (a rename locally, one PUT on S3)."""
    path = f"{_results_dir(store, run)}/{_check_group_name(key)}.pkl"
    if is_local(store):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
        return
    object_store(str(store)).fs.pipe_file(path, payload)


def load_task_result(store: str | os.PathLike, run: str, key: str) -> bytes | None:
    """The payload saved under ``key`` for run ``run``, or None."""
    path = f"{_results_dir(store, run)}/{_check_group_name(key)}.pkl"
    try:
        if is_local(store):
            with open(path, "rb") as fh:
                return fh.read()
        return object_store(str(store)).fs.cat_file(path)
    except FileNotFoundError:
        return None


def drop_task_results(store: str | os.PathLike, run: str) -> None:
    """Forget the kept results of run ``run`` (it finished)."""
    path = _results_dir(store, run)
    if is_local(store):
        shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        object_store(str(store)).fs.rm(path, recursive=True)
