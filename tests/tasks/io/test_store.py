"""Tests for tasks.io.store: atomic, self-describing groups in one Zarr v3 store."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.io.provenance import code_revision, photocal_version
from tasks.io.store import (
    COMPLETE_ATTR,
    StoreError,
    _check_group_name,
    group_exists,
    list_groups,
    read_group,
    write_group,
)


def _dataset(offset: float = 0.0) -> xr.Dataset:
    return xr.Dataset(
        {
            "flux": ("exposure", np.arange(4.0) + offset),
            "count": ("exposure", np.array([3, -1, 7, 2], dtype=np.int64)),
            "band": ("exposure", np.array(["g", "r", "i", "r"])),  # numpy unicode
            "path": ("exposure", np.array(["a.fits", "b/é.fits", "", "c"], dtype=object)),
        },
        coords={"expid": ("exposure", np.array([10, 11, 12, 13], dtype=np.int64))},
        attrs={"stage": "test"},
    )


def _zarr_nodes(root: Path) -> set[Path]:
    """Every Zarr node (group or array) on disk under ``root``."""
    return {p.relative_to(root) for p in root.rglob("zarr.json")}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "photocal.zarr"


# --- round trip ------------------------------------------------------------------------


def test_round_trip_numbers_and_strings(store):
    ds = _dataset()
    write_group(store, "exposures", ds)
    back = read_group(store, "exposures")
    assert set(back.data_vars) == {"flux", "count", "band", "path"}
    assert back["flux"].dtype == np.float64
    assert back["count"].dtype == np.int64
    assert back["expid"].dtype == np.int64
    # Object and fixed-width unicode strings both come back with equal values.
    for name in ("band", "path"):
        assert back[name].values.tolist() == ds[name].values.tolist()
    xr.testing.assert_equal(back, ds)


def test_attrs_carry_provenance_version_and_completion(store):
    write_group(store, "exposures", _dataset(), attrs={"config": {"k": 2}, "inputs": ["a"]})
    attrs = read_group(store, "exposures").attrs
    assert attrs == {
        "stage": "test",
        "config": {"k": 2},
        "inputs": ["a"],
        "photocal_version": photocal_version(),
        "code_revision": code_revision(),
        COMPLETE_ATTR: True,
    }
    assert photocal_version() != "unknown"  # the package is installed in the test env
    assert code_revision() != "unknown"  # a git checkout, or the commit recorded at install


def test_write_does_not_modify_the_callers_dataset(store):
    ds = _dataset()
    before = ds.copy(deep=True)
    write_group(store, "exposures", ds, attrs={"x": 1})
    xr.testing.assert_identical(ds, before)


def test_read_lazily(store):
    write_group(store, "exposures", _dataset())
    lazy = read_group(store, "exposures", load=False)
    assert lazy["flux"].chunks is not None
    np.testing.assert_array_equal(lazy["flux"].values, np.arange(4.0))


# --- replacing -------------------------------------------------------------------------


def test_writing_identical_content_twice_is_idempotent(store):
    write_group(store, "exposures", _dataset(), attrs={"run": 1})
    first = read_group(store, "exposures")
    nodes = _zarr_nodes(store)
    write_group(store, "exposures", _dataset(), attrs={"run": 1})
    second = read_group(store, "exposures")
    xr.testing.assert_identical(first, second)
    assert _zarr_nodes(store) == nodes


def test_rewrite_replaces_the_group_fully(store):
    write_group(store, "exposures", _dataset(), attrs={"old": True})
    new = xr.Dataset({"zp": ("quadrant", np.array([25.1, 25.2]))}, attrs={"stage": "new"})
    write_group(store, "exposures", new)
    back = read_group(store, "exposures")
    assert list(back.variables) == ["zp"]
    assert dict(back.sizes) == {"quadrant": 2}
    assert "old" not in back.attrs
    assert back.attrs["stage"] == "new"
    xr.testing.assert_equal(back, new)
    assert not (store / "exposures" / "flux").exists()


def test_rewriting_one_group_leaves_its_siblings_alone(store):
    write_group(store, "index/2026-03-10", _dataset(0.0))
    write_group(store, "index/2026-03-11", _dataset(1.0))
    write_group(store, "index/2026-03-10", _dataset(5.0))
    np.testing.assert_array_equal(
        read_group(store, "index/2026-03-11")["flux"], np.arange(4.0) + 1.0
    )


# --- hierarchy -------------------------------------------------------------------------


def test_nested_groups_create_parents_and_list_complete_children(store):
    for night in ("2026-03-11", "2026-03-10"):
        write_group(store, f"index/{night}", _dataset())
    assert "index" in zarr.open_group(str(store), mode="r")
    assert list_groups(store, "index") == ["2026-03-10", "2026-03-11"]
    # The parent holds no dataset of its own.
    assert not group_exists(store, "index")
    assert list_groups(store, "masters") == []


def test_deep_group_names(store):
    write_group(store, "maps/flat/g", _dataset())
    assert group_exists(store, "maps/flat/g")
    assert list_groups(store, "maps/flat") == ["g"]
    assert list_groups(store, "maps") == []  # 'flat' is a parent, not a complete group


# --- incomplete groups -----------------------------------------------------------------


def _write_without_marker(store: Path, group: str) -> None:
    """What a writer that crashed before its last step leaves behind."""
    zarr.open_group(str(store), mode="a", zarr_format=3).require_group("index")
    ds = _dataset()
    ds["band"] = ds["band"].astype(object)  # fixed-width unicode has no stable Zarr v3 spec
    ds.to_zarr(str(store), group=group, mode="w", consolidated=False, zarr_format=3)


@pytest.mark.parametrize("marker", [None, False])
def test_group_without_completion_marker_is_invisible(store, marker):
    write_group(store, "index/2026-03-10", _dataset())
    _write_without_marker(store, "index/2026-03-11")
    if marker is not None:
        zarr.open_group(str(store), path="index/2026-03-11", mode="r+").attrs[COMPLETE_ATTR] = (
            marker
        )
    assert not group_exists(store, "index/2026-03-11")
    with pytest.raises(StoreError, match="'index/2026-03-11'"):
        read_group(store, "index/2026-03-11")
    assert list_groups(store, "index") == ["2026-03-10"]


def test_missing_group_and_missing_store(store, tmp_path):
    write_group(store, "exposures", _dataset())
    assert not group_exists(store, "zp")
    with pytest.raises(StoreError, match="'zp'"):
        read_group(store, "zp")
    absent = tmp_path / "absent.zarr"
    assert not group_exists(absent, "zp")
    assert list_groups(absent, "index") == []
    with pytest.raises(StoreError, match="'zp'"):
        read_group(absent, "zp")


def test_a_path_naming_an_array_is_not_a_group(store):
    write_group(store, "exposures", _dataset())
    assert not group_exists(store, "exposures/flux")
    with pytest.raises(StoreError):
        read_group(store, "exposures/flux")


# --- crashes ---------------------------------------------------------------------------


class _SimulatedCrashError(RuntimeError):
    pass


def _crash_after_partial_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``Dataset.to_zarr`` really write one variable, then die."""
    real_to_zarr = xr.Dataset.to_zarr

    def partial_then_crash(self, *args, **kwargs):
        real_to_zarr(self[[next(iter(self.data_vars))]], *args, **kwargs)
        raise _SimulatedCrashError("killed mid-write")

    monkeypatch.setattr(xr.Dataset, "to_zarr", partial_then_crash)


def _unencodable() -> xr.Dataset:
    """Good variables first, then one Zarr cannot encode: dies after writing starts."""
    ds = _dataset(100.0)
    ds["junk"] = ("exposure", np.array([{"a": 1}, None, 3, "x"], dtype=object))
    return ds


def test_crash_mid_write_keeps_the_previous_version(store, tmp_path, monkeypatch):
    write_group(store, "index/2026-03-10", _dataset())
    old = read_group(store, "index/2026-03-10")
    nodes = _zarr_nodes(tmp_path)
    _crash_after_partial_write(monkeypatch)
    with pytest.raises(_SimulatedCrashError):
        write_group(store, "index/2026-03-10", _dataset(100.0))
    monkeypatch.undo()
    xr.testing.assert_identical(read_group(store, "index/2026-03-10"), old)
    assert list_groups(store, "index") == ["2026-03-10"]
    # No half-written copy is left anywhere beside or inside the store.
    assert _zarr_nodes(tmp_path) == nodes


def test_failed_encoding_keeps_the_previous_version(store, tmp_path):
    write_group(store, "exposures", _dataset())
    old = read_group(store, "exposures")
    nodes = _zarr_nodes(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        write_group(store, "exposures", _unencodable())
    xr.testing.assert_identical(read_group(store, "exposures"), old)
    assert _zarr_nodes(tmp_path) == nodes


def test_failed_swap_keeps_the_previous_version(store, monkeypatch):
    write_group(store, "exposures", _dataset())
    old = read_group(store, "exposures")
    real_rename = Path.rename

    def rename(self, target):
        # Only the new version's move into place fails; putting the old one back works.
        new_version = not self.name.startswith("old-")
        if (
            Path(target) == store / "exposures"
            and self.parent.name.endswith(".staging")
            and new_version
        ):
            raise OSError("simulated I/O error on the final rename")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        write_group(store, "exposures", _dataset(100.0))
    monkeypatch.undo()
    xr.testing.assert_identical(read_group(store, "exposures"), old)


def test_crash_on_first_write_leaves_no_group(store, tmp_path, monkeypatch):
    _crash_after_partial_write(monkeypatch)
    with pytest.raises(_SimulatedCrashError):
        write_group(store, "index/2026-03-10", _dataset())
    monkeypatch.undo()
    assert not group_exists(store, "index/2026-03-10")
    assert list_groups(store, "index") == []
    assert not any(p.parts[-2] == "2026-03-10" for p in _zarr_nodes(tmp_path))


def test_object_store_crash_mid_overwrite_keeps_the_previous_version(monkeypatch):
    # fsspec stores write each version to a new build and publish it by one ref
    # write (tasks/io/objstore.py): a crash mid-write leaves the old version.
    store = f"memory://photocal-{uuid.uuid4().hex}.zarr"
    write_group(store, "exposures", _dataset())
    old = read_group(store, "exposures")
    _crash_after_partial_write(monkeypatch)
    with pytest.raises(_SimulatedCrashError):
        write_group(store, "exposures", _dataset(100.0))
    monkeypatch.undo()
    xr.testing.assert_identical(read_group(store, "exposures"), old)
    write_group(store, "exposures", _dataset(100.0))
    np.testing.assert_array_equal(read_group(store, "exposures")["flux"], np.arange(4.0) + 100)


# --- names and attrs -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "/", "../x", "a/../b", "a//b", ".hidden", "index/.tmp"])
def test_invalid_group_names(store, name):
    with pytest.raises(ValueError, match="invalid store group name"):
        write_group(store, name, _dataset())
    with pytest.raises(ValueError, match="invalid store group name"):
        group_exists(store, name)
    assert not store.exists()


@pytest.mark.parametrize(
    "name",
    [
        "/etc/passwd/x",  # absolute: the slashes go, the name stays inside the store
        "..\\..\\x",
        "index/..\\x",
        "C:\\x",
        "s3://bucket/x",
        "file:///tmp/x",
        "index/2026-03-10\x00/x",
        "index/~x",
        "index/2026 03 10",
        "index/%2e%2e",
        "a" * 129,
    ],
)
def test_group_names_from_user_parameters_are_refused(store, name):
    if name.startswith("/etc"):
        write_group(store, name, _dataset())
        assert group_exists(store, "etc/passwd/x")
        assert (store / "etc" / "passwd" / "x" / "zarr.json").is_file()
        return
    with pytest.raises(ValueError, match="invalid store group name"):
        write_group(store, name, _dataset())
    assert not store.exists()


_PIECES = st.sampled_from(
    ["..", ".", "/", "\\", "~", ":", "//", "\x00", "%2e", "C:", "s3://", "a", "2026-03-10", "-"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.one_of(st.text(max_size=12), st.lists(_PIECES, max_size=6).map("".join)))
def test_no_group_name_escapes_the_store(name):
    """Whatever a user types as a night, band or period: the name is refused, or
    everything written lands inside the store (and its staging and lock folders)."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        store = base / "s.zarr"
        try:
            _check_group_name(name)
        except ValueError:
            with pytest.raises(ValueError, match="invalid store group name"):
                write_group(store, name, _dataset())
            assert list(base.iterdir()) == []
            return
        write_group(store, name, _dataset())
        allowed = {store, base / ".s.zarr.staging", base / ".s.zarr.locks"}
        assert {p.resolve() for p in base.iterdir()} <= {p.resolve() for p in allowed}
        group = name.strip("/")
        assert (store / group).resolve().is_relative_to(store.resolve())
        assert group_exists(store, group)


def test_surrounding_slashes_are_ignored(store):
    write_group(store, "/index/2026-03-10/", _dataset())
    assert group_exists(store, "index/2026-03-10")


@pytest.mark.parametrize(
    ("value", "type_name"), [(object(), "object"), (1 + 2j, "complex"), (b"raw", "bytes")]
)
def test_unserialisable_attrs_raise_type_error_naming_the_type(store, value, type_name):
    with pytest.raises(TypeError, match=f"type {type_name} is not JSON-serialisable"):
        write_group(store, "exposures", _dataset(), attrs={"bad": value})
    assert not group_exists(store, "exposures")


def test_numpy_scalars_paths_and_containers_become_plain_values(store):
    attrs = {
        "f32": np.float32(1.5),
        "i64": np.int64(-3),
        "flag": np.bool_(True),
        "path": Path("/raw/night"),
        "pair": (1, 2),
        "bands": {"r", "g"},
        "array": np.array([1, 2]),
        "nested": {"lon": np.float64(-116.865)},
    }
    write_group(store, "exposures", _dataset(), attrs=attrs)
    back = read_group(store, "exposures").attrs
    expected = {
        "f32": 1.5,
        "i64": -3,
        "flag": True,
        "path": "/raw/night",
        "pair": [1, 2],
        "bands": ["g", "r"],
        "array": [1, 2],
        "nested": {"lon": -116.865},
    }
    assert {k: back[k] for k in expected} == expected
    assert [type(back[k]) for k in ("f32", "i64", "flag", "path")] == [float, int, bool, str]
