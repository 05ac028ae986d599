"""The commit protocol of stores on object storage (S3 and S3-compatible servers).

Object stores have no rename and no lock, so a group is never written where
readers look. Every write goes to a fresh *build* prefix,
``<store>/.photocal/data/<build>/`` (a plain Zarr v3 group), and is published by
one conditional write of the group's *ref*, ``<store>/.photocal/refs/<group>.json``:
a small JSON document listing the group's versions, the last one current. The
write carries the ETag of the ref it was derived from (``If-Match``; for a new
group ``If-None-Match: *``), so of two writers publishing at once one wins and
the other re-reads the ref and appends its version after it: neither version is
lost, both are whole. Builds are never modified once published, so a reader that
resolved a version reads that version to its last chunk (lazily too), and older
versions stay readable: ``read_group(..., version=)`` / ``as_of=``, and a rollback
is one more ref write pointing at an earlier build.

A writer killed before its ref write leaves an unreferenced build (``photocal
store gc`` removes it once it is older than a safety age and its lease has
expired); killed during it, the ref is the old or the new one, as S3 writes are
atomic per object.

``PHOTOCAL_UNSAFE_STORE_IN_PLACE=1`` switches the protocol off for tests: every
version of a group is then written over the same build (the pre-issue-19 in-place
write with a completion marker), which is how the tests show that without the
protocol concurrent writers do mix.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

META = ".photocal"
REF_FORMAT = 1
LEASE_ENV = "PHOTOCAL_STORE_LEASE_S"
LEASE_S = 3600.0
"""How long a build is protected from gc after its writer last touched it
(``PHOTOCAL_STORE_LEASE_S`` overrides)."""
UNSAFE_IN_PLACE_ENV = "PHOTOCAL_UNSAFE_STORE_IN_PLACE"
STORAGE_OPTIONS_ENV = "PHOTOCAL_STORAGE_OPTIONS"
STORE_CONFIG_ENV = "PHOTOCAL_STORE_CONFIG"
_CAS_ATTEMPTS = 200


class StoreConflictError(RuntimeError):
    """A conditional write lost its race (the ref changed since it was read)."""


def storage_options(url: str) -> dict[str, Any]:
    """fsspec storage options for ``url``: the configuration file's ``[store]``
    table (:func:`use_store_config`; endpoint, region, credentials from the
    environment variables it names), updated by the JSON object in
    ``PHOTOCAL_STORAGE_OPTIONS`` (e.g. ``{"endpoint_url": ..., "key": ...}``).
    With neither, s3fs takes credentials, region and endpoint the standard way
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``,
    ``AWS_ENDPOINT_URL``, profiles, instance roles)."""
    opts = _configured_options()
    text = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    if not text:
        return opts
    try:
        given = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{STORAGE_OPTIONS_ENV} is not valid JSON: {err}") from None
    if not isinstance(given, dict):
        raise ValueError(f"{STORAGE_OPTIONS_ENV} must be a JSON object, got {type(given).__name__}")
    return {**opts, **given}


def use_store_config(config: Any) -> None:
    """Reach object stores as the configuration's ``[store]`` table says (a
    :class:`tasks.config.StoreConfig`), in this process and in the ones it
    starts from now on (local Dask workers, Slurm jobs, which inherit the
    environment): the table goes into ``PHOTOCAL_STORE_CONFIG`` as JSON, with
    the *names* of the credential variables, not their values, and each process
    resolves it. Its faults (a named variable not set) are raised here, before
    anything runs."""
    config.fsspec_options()
    values = config.model_dump(mode="json", exclude_defaults=True)
    if values:
        os.environ[STORE_CONFIG_ENV] = json.dumps(values, sort_keys=True)
    else:
        os.environ.pop(STORE_CONFIG_ENV, None)


def _configured_options() -> dict[str, Any]:
    text = os.environ.get(STORE_CONFIG_ENV, "").strip()
    return _store_config(text).fsspec_options() if text else {}


@functools.lru_cache(maxsize=8)
def _store_config(text: str) -> Any:
    from tasks.config import ConfigError, StoreConfig

    try:
        return StoreConfig.model_validate_json(text)
    except ValueError as err:
        raise ConfigError(STORE_CONFIG_ENV, [str(err)]) from None


def unsafe_in_place() -> bool:
    return os.environ.get(UNSAFE_IN_PLACE_ENV, "") not in ("", "0")


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Version:
    """One entry of a group's history: ``build`` is None where the group was
    removed (a rollback to before it existed)."""

    version: int
    build: str | None
    time: str
    note: str

    @property
    def when(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.time)


# -- conditional writes ------------------------------------------------------------


class _Refs:
    """Get/put of small objects with compare-and-swap, per fsspec protocol."""

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self.fs = fs

    def get(self, path: str) -> tuple[bytes, str] | None:
        raise NotImplementedError

    def put(self, path: str, data: bytes, *, etag: str | None) -> None:
        """Write ``data`` if the object's ETag is still ``etag`` (None: if it
        does not exist); StoreConflictError otherwise."""
        raise NotImplementedError


class _S3Refs(_Refs):
    """S3 conditional writes: ``PutObject`` with ``If-Match`` / ``If-None-Match``
    (AWS since 2024, MinIO, Ceph, moto's server)."""

    def _split(self, path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    def get(self, path: str) -> tuple[bytes, str] | None:
        from fsspec.asyn import sync

        bucket, key = self._split(path)
        fs = self.fs

        async def fetch() -> tuple[bytes, str] | None:
            try:
                resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return None
            body = await resp["Body"].read()
            return body, resp["ETag"]

        return sync(fs.loop, fetch)

    def put(self, path: str, data: bytes, *, etag: str | None) -> None:
        bucket, key = self._split(path)
        cond = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
        except OSError as err:  # s3fs translates the ClientError; its code is the cause's
            response = getattr(err.__cause__, "response", None) or {}
            code = response.get("Error", {}).get("Code", "")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # 412: the ref changed (or exists); 409: a concurrent conditional
            # write is in flight (AWS); 404: deleted since it was read.
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or (
                status in (404, 409, 412)
            ):
                raise StoreConflictError(path) from None
            raise


_MEMORY_LOCK = threading.Lock()


class _MemoryRefs(_Refs):
    """fsspec's in-memory filesystem lives in one process: a lock is a true CAS."""

    def get(self, path: str) -> tuple[bytes, str] | None:
        with _MEMORY_LOCK:
            try:
                data = self.fs.cat_file(path)
            except FileNotFoundError:
                return None
        return data, hashlib.md5(data).hexdigest()

    def put(self, path: str, data: bytes, *, etag: str | None) -> None:
        with _MEMORY_LOCK:
            try:
                current: str | None = hashlib.md5(self.fs.cat_file(path)).hexdigest()
            except FileNotFoundError:
                current = None
            if current != etag:
                raise StoreConflictError(path)
            self.fs.pipe_file(path, data)


_REFS_BY_PROTOCOL = {"s3": _S3Refs, "s3a": _S3Refs, "memory": _MemoryRefs}


# -- the store ---------------------------------------------------------------------


class ObjectStore:
    """A photocal store at an fsspec URL, with the commit protocol."""

    def __init__(self, url: str) -> None:
        self.url = str(url).rstrip("/")
        self.options = storage_options(self.url)
        protocol = self.url.split("://", 1)[0]
        refs = _REFS_BY_PROTOCOL.get(protocol)
        if refs is None:
            raise ValueError(
                f"store {self.url}: object stores of protocol {protocol!r} are not supported "
                f"(atomic commits need conditional writes; supported: s3://, memory://)"
            )
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.options)
        self.refs = refs(self.fs)

    # paths
    def _meta(self, *parts: str) -> str:
        return "/".join([self.root, META, *parts])

    def ref_path(self, group: str) -> str:
        return self._meta("refs", f"{group}.json")

    def build_url(self, build: str) -> str:
        return f"{self.url}/{META}/data/{build}"

    def build_of(self, staging: str) -> str:
        """The build id of a staging URL made by :meth:`new_build`."""
        prefix = f"{self.url}/{META}/data/"
        if not staging.startswith(prefix) or "/" in staging[len(prefix) :]:
            raise ValueError(f"{staging!r} is not a build of store {self.url}")
        return staging[len(prefix) :]

    def new_build(self, group: str) -> str:
        if unsafe_in_place():
            return "inplace-" + hashlib.sha256(group.encode()).hexdigest()[:16]
        return uuid.uuid4().hex

    # refs
    def history(self, group: str) -> list[Version]:
        got = self.refs.get(self.ref_path(group))
        return [] if got is None else _parse(got[0])

    def resolve(
        self, group: str, *, version: int | None = None, as_of: dt.datetime | None = None
    ) -> Version | None:
        """The version to read: the current one, the numbered one, or the one
        current at ``as_of``; None when that is no version or a removal."""
        entries = self.history(group)
        if version is not None:
            entries = [v for v in entries if v.version == version]
        if as_of is not None:
            as_of = as_of if as_of.tzinfo else as_of.replace(tzinfo=dt.UTC)
            entries = [v for v in entries if v.when <= as_of]
        if not entries or entries[-1].build is None:
            return None
        return entries[-1]

    def publish(self, group: str, build: str | None, note: str) -> Version:
        """Append a version pointing at ``build`` to the group's ref, by
        compare-and-swap: retried on a lost race, so concurrent publishers all
        land, in some order."""
        path = self.ref_path(group)
        for attempt in range(_CAS_ATTEMPTS):
            got = self.refs.get(path)
            entries, etag = ([], None) if got is None else (_parse(got[0]), got[1])
            number = entries[-1].version + 1 if entries else 1
            entry = Version(number, build, now_utc().isoformat(), note)
            doc = {
                "format": REF_FORMAT,
                "group": group,
                "versions": [e.__dict__ for e in [*entries, entry]],
            }
            try:
                self.refs.put(path, json.dumps(doc, indent=1).encode(), etag=etag)
            except StoreConflictError:
                time.sleep(random.uniform(0.005, 0.05) * min(attempt + 1, 10))
                continue
            return entry
        raise StoreConflictError(f"{path}: gave up after {_CAS_ATTEMPTS} conflicting writes")

    # listing
    def _ls(self, path: str) -> list[dict[str, Any]]:
        try:
            return self.fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return []

    def children(self, prefix: str) -> tuple[list[str], list[str]]:
        """(parent names, group names) directly under ``prefix``."""
        base = self._meta("refs", prefix) if prefix else self._meta("refs")
        parents, groups = [], []
        for entry in self._ls(base):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] == "directory":
                parents.append(name)
            elif name.endswith(".json"):
                groups.append(name.removesuffix(".json"))
        return sorted(parents), sorted(groups)

    def all_groups(self, prefix: str = "") -> list[str]:
        """Every group with a ref under ``prefix``, or named ``prefix`` (complete
        or removed)."""
        base = self._meta("refs")
        start = f"{base}/{prefix}" if prefix else base
        try:
            found = list(self.fs.find(start, refresh=True))
        except FileNotFoundError:
            found = []
        if prefix and self.refs.get(f"{start}.json") is not None:
            found.append(f"{start}.json")
        return sorted(
            {p[len(base) + 1 :].removesuffix(".json") for p in found if p.endswith(".json")}
        )

    def builds(self) -> list[str]:
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1]
            for e in self._ls(self._meta("data"))
            if e["type"] == "directory"
        )

    def referenced_builds(self) -> set[str]:
        return {v.build for g in self.all_groups() for v in self.history(g) if v.build}

    def build_path(self, build: str) -> str:
        return self._meta("data", build)

    def newest_write(self, path: str) -> float:
        """Unix time of the newest object under ``path`` (0 when empty)."""
        newest = 0.0
        for info in self.fs.find(path, detail=True, refresh=True).values():
            modified = info.get("LastModified") or info.get("created") or info.get("mtime")
            if isinstance(modified, dt.datetime):
                stamp = modified.timestamp()
            elif isinstance(modified, (int, float)):
                stamp = float(modified)
            else:
                continue
            newest = max(newest, stamp)
        return newest

    def upload(self, local_dir: str, build: str) -> None:
        """Every file under ``local_dir`` into the build, in one concurrent batch."""
        base = self.build_path(build)
        files = {}
        for dirpath, _, names in os.walk(local_dir):
            for name in names:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
                with open(full, "rb") as fh:
                    files[f"{base}/{rel}"] = fh.read()
        self.fs.pipe(files)

    def download(self, build: str, local_dir: str) -> None:
        """Every object of the build into ``local_dir``, in one concurrent batch."""
        base = self.build_path(build)
        paths = [p for p in self.fs.find(base, refresh=True) if not p.endswith("/")]
        for path, data in self.fs.cat(paths).items():
            target = os.path.join(local_dir, path[len(base) + 1 :].lstrip("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as fh:
                fh.write(data)

    def remove_build(self, build: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._meta("data", build), recursive=True)
        self.drop_lease(build)

    # leases: a build being written is protected from gc
    def _lease_path(self, build: str) -> str:
        return self._meta("leases", build)

    def touch_lease(self, build: str) -> None:
        doc = {
            "expires": time.time() + float(os.environ.get(LEASE_ENV, LEASE_S)),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        self.fs.pipe_file(self._lease_path(build), json.dumps(doc).encode())

    def drop_lease(self, build: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._lease_path(build))

    def leased(self, build: str) -> bool:
        try:
            doc = json.loads(self.fs.cat_file(self._lease_path(build)))
        except FileNotFoundError:
            return False
        return float(doc.get("expires", 0)) > time.time()

    @contextlib.contextmanager
    def leasing(self, build: str) -> Iterator[None]:
        self.touch_lease(build)
        try:
            yield
        finally:
            self.drop_lease(build)

    # task results of a run (tasks/resume.py)
    def result_path(self, run: str, key: str) -> str:
        return self._meta("runs", run, f"{key}.pkl")

    def runs(self) -> list[str]:
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1]
            for e in self._ls(self._meta("runs"))
            if e["type"] == "directory"
        )

    def run_dir(self, run: str) -> str:
        return self._meta("runs", run)


def _parse(data: bytes) -> list[Version]:
    doc = json.loads(data)
    if doc.get("format") != REF_FORMAT:
        raise ValueError(f"unknown ref format {doc.get('format')!r}")
    return [Version(**v) for v in doc["versions"]]


_STORES: dict[tuple[str, str], ObjectStore] = {}


def object_store(url: str) -> ObjectStore:
    """The (per process, cached) ObjectStore of ``url``, one per set of storage
    options (a new ``[store]`` table or credentials make a new one)."""
    url = str(url).rstrip("/")
    key = (url, json.dumps(storage_options(url), sort_keys=True, default=str))
    store = _STORES.get(key)
    if store is None:
        store = _STORES[key] = ObjectStore(url)
    return store
