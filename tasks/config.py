"""One configuration for every stage: a TOML file (or a mapping) with one table
per stage, validated by the stages' own pydantic models (docs/configuration.md).

Every stage configuration derives from :class:`StageConfig` and names its table
(``class MastersConfig(StageConfig, table="masters")``): that is the registry.
Defining the class registers it, so a new stage or a new field appears in
``--config``, ``photocal config show`` and ``photocal config template`` without
touching this module. :func:`stage_tables` imports every ``tasks`` module first,
so no stage is missed because nothing had imported it yet.

Errors name the table, the key, the value given and what is allowed; unknown
tables and keys are refused (``extra='forbid'`` on every stage model, and the same
check on nested dataclasses such as ``[ubercal.options]``, which pydantic would
otherwise let through).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import pkgutil
import re
import tomllib
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

_REGISTRY: dict[str, type[StageConfig]] = {}
# Tables in the order a reader meets them in the pipeline; any other registered
# table (a new stage) follows, alphabetically.
_ORDER = (
    "index",
    "masters",
    "reduce",
    "photometry",
    "ubercal",
    "zp",
    "transients",
    "ingest",
    "store",
)
_HIDDEN_KEYS = re.compile(r"secret|password|token|key$", re.IGNORECASE)


class StageConfig(BaseModel):
    """Base of every stage configuration: unknown keys are refused, and the
    subclass's ``table`` keyword registers it as a table of the configuration
    file. ``per_run`` names the fields a run sets itself (the band and nights of
    ubercal), which the file may not."""

    model_config = ConfigDict(extra="forbid")
    table: ClassVar[str] = ""
    per_run: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, table: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if table:
            if table in _REGISTRY and _REGISTRY[table].__qualname__ != cls.__qualname__:
                raise TypeError(f"configuration table [{table}] is already {_REGISTRY[table]}")
            cls.table = table
            _REGISTRY[table] = cls


class StoreConfig(StageConfig, table="store"):
    """How to reach the Zarr store when it is on object storage (``s3://...``).
    Never written into the store's attrs nor into flow-run parameters;
    ``photocal config show`` masks secret-looking values. Left empty, S3 is
    reached the standard way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."""

    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint, e.g. https://s3.example.org (MinIO, Ceph); "
        "default: AWS_ENDPOINT_URL or AWS itself",
    )
    region: str | None = Field(
        default=None, description="S3 region; default: AWS_DEFAULT_REGION or the profile's"
    )
    key_env: str | None = Field(
        default=None,
        description="name of the environment variable that holds the access key id "
        "(the key itself stays out of the file); default: AWS_ACCESS_KEY_ID",
    )
    secret_env: str | None = Field(
        default=None,
        description="name of the environment variable that holds the secret access key; "
        "default: AWS_SECRET_ACCESS_KEY",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="further fsspec (s3fs) storage options, e.g. anon, profile, "
        "client_kwargs; the keys above win over the same ones here",
    )

    def fsspec_options(self, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The s3fs storage options: ``storage_options`` with the endpoint, the
        region and the credentials read from the named environment variables
        (of this process: each Dask worker reads its own).

        Raises
        ------
        ConfigError
            When a named environment variable is not set.
        """
        env = os.environ if environ is None else environ
        out = dict(self.storage_options)
        if self.endpoint_url:
            out["endpoint_url"] = self.endpoint_url
        if self.region:
            out["client_kwargs"] = {**out.get("client_kwargs", {}), "region_name": self.region}
        missing = []
        for field, option in (("key_env", "key"), ("secret_env", "secret")):
            name = getattr(self, field)
            if name is None:
                continue
            if not env.get(name):
                missing.append(f"[store] {field} = {name!r}: that environment variable is not set")
            else:
                out[option] = env[name]
        if missing:
            raise ConfigError("[store]", missing)
        return out


class ConfigError(ValueError):
    """A configuration that cannot be used; ``problems`` has one line per fault."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + f"\n{source}: ".join(problems))


def stage_tables() -> dict[str, type[StageConfig]]:
    """Every registered table and its model, in pipeline order."""
    import tasks

    for module in pkgutil.iter_modules(tasks.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"tasks.{module.name}")
    known = [t for t in _ORDER if t in _REGISTRY]
    return {t: _REGISTRY[t] for t in known + sorted(set(_REGISTRY) - set(known))}


# --- the resolved configuration ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PhotocalConfig:
    """The resolved configuration: one validated model per table.

    ``tables[name]`` is the stage's model; for a stage with ``per_run`` fields it is
    a model of the other fields, and :meth:`build` adds the run's values.
    ``source`` says where it came from (a path, 'inline', 'defaults').
    """

    tables: Mapping[str, BaseModel]
    source: str = "defaults"

    def __getitem__(self, table: str) -> BaseModel:
        try:
            return self.tables[table]
        except KeyError:
            raise KeyError(
                f"no configuration table [{table}]; known: {', '.join(self.tables)}"
            ) from None

    def build(self, table: str, **per_run: Any) -> Any:
        """The stage's own model, with the run's values for its ``per_run`` fields."""
        model = stage_tables()[table]
        return model(**self[table].model_dump(), **per_run)

    def as_dict(self, *, exclude: tuple[str, ...] = ("store",)) -> dict[str, Any]:
        """JSON values by table (``store`` left out: it may hold secrets)."""
        return {t: m.model_dump(mode="json") for t, m in self.tables.items() if t not in exclude}

    def changed(self) -> dict[str, dict[str, Any]]:
        """The values that differ from the defaults, by table."""
        out = {}
        for table, model in self.tables.items():
            default = _settings_model(stage_tables()[table])().model_dump(mode="json")
            value = model.model_dump(mode="json")
            diff = {k: v for k, v in value.items() if default.get(k) != v}
            if diff:
                out[table] = diff
        return out


def load_config(
    config: str | os.PathLike | Mapping[str, Any] | PhotocalConfig | None = None,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> PhotocalConfig:
    """Resolve a configuration.

    Parameters
    ----------
    config : path, mapping, PhotocalConfig or None
        A TOML file, an inline mapping ``{table: {key: value}}`` (what a deployment
        parameter carries; a JSON string of one also works), or None for the
        defaults.
    overrides : mapping, optional
        Values that win over ``config`` (command-line options).
    defaults : mapping, optional
        Values that ``config`` wins over (the environment of a worker).

    Raises
    ------
    ConfigError
        Naming each unknown table or key, and each value refused, with what is allowed.
    """
    if isinstance(config, PhotocalConfig):
        if not overrides and not defaults:
            return config
        config, source = config.as_dict(exclude=()), config.source
    else:
        config, source = _read(config)
    merged = _merge(_merge(defaults or {}, config), overrides or {})
    return PhotocalConfig(_validate(merged, source), source)


def _read(config: str | os.PathLike | Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    if config is None:
        return {}, "defaults"
    if isinstance(config, Mapping):
        return dict(config), "inline configuration"
    text = os.fspath(config)
    if isinstance(config, str) and text.lstrip().startswith("{"):
        try:
            return json.loads(text), "inline configuration"
        except json.JSONDecodeError as err:
            raise ConfigError("inline configuration", [f"not valid JSON: {err}"]) from None
    path = Path(text)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(text, [f"cannot be read: {err.strerror or err}"]) from None
    try:
        return tomllib.loads(data.decode("utf-8")), text
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(text, [f"not valid TOML: {err}"]) from None


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _validate(data: Mapping[str, Any], source: str) -> dict[str, BaseModel]:
    tables = stage_tables()
    problems: list[str] = []
    for name, value in data.items():
        if name not in tables:
            problems.append(f"unknown table [{name}]; known tables: {', '.join(tables)}")
        elif not isinstance(value, Mapping):
            problems.append(f"[{name}] must be a table of settings, got {value!r}")
    out: dict[str, BaseModel] = {}
    for name, model in tables.items():
        table = data.get(name, {})
        if not isinstance(table, Mapping):
            continue
        problems += [
            f"[{name}] {key} = {table[key]!r}: set by each run (command-line options or "
            "deployment parameters), not in the configuration"
            for key in model.per_run
            if key in table
        ]
        settings = _settings_model(model)
        table = {k: v for k, v in table.items() if k not in model.per_run}
        before = len(problems)
        problems += _unknown_keys(settings, table, name)
        if len(problems) > before:
            continue
        try:
            out[name] = settings.model_validate(table)
        except ValidationError as err:
            problems += [_describe(name, settings, table, e) for e in err.errors()]
    if problems:
        raise ConfigError(source, problems)
    return out


def _settings_model(model: type[StageConfig]) -> type[BaseModel]:
    """``model`` itself, or without its ``per_run`` fields (a model of the rest)."""
    if not model.per_run:
        return model
    fields: Any = {
        name: (info.annotation, info)
        for name, info in model.model_fields.items()
        if name not in model.per_run
    }
    derived = create_model(
        model.__name__, __config__=ConfigDict(extra="forbid"), __doc__=model.__doc__, **fields
    )
    derived.per_run = model.per_run  # type: ignore[attr-defined]
    return derived


def _unknown_keys(model: Any, table: Mapping[str, Any], where: str) -> list[str]:
    """Keys of ``table`` that ``model`` (a pydantic model or a dataclass) lacks, in
    nested tables too."""
    fields = dict(_fields(model))
    out = []
    for key, value in table.items():
        if key not in fields:
            out.append(f"[{where}] unknown key {key!r}; allowed: {', '.join(fields)}")
            continue
        nested = _nested_type(fields[key].annotation)
        if nested is not None and isinstance(value, Mapping):
            out += _unknown_keys(nested, value, f"{where}.{key}")
    return out


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    """One configuration field: its type, default and description."""

    name: str
    annotation: Any
    default: Any
    description: str


def _fields(model: Any) -> Iterator[tuple[str, FieldDoc]]:
    if isinstance(model, type) and issubclass(model, BaseModel):
        for name, info in model.model_fields.items():
            yield name, FieldDoc(name, info.annotation, _default(info), info.description or "")
        return
    docs = _numpydoc_attributes(model.__doc__ or "")
    hints = typing.get_type_hints(model)
    for f in dataclasses.fields(model):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        yield f.name, FieldDoc(f.name, hints.get(f.name, f.type), default, docs.get(f.name, ""))


def _default(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return None if info.is_required() else info.default


def _nested_type(annotation: Any) -> Any:
    """The model or dataclass behind a field that is a table of its own."""
    if isinstance(annotation, type) and (
        issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)
    ):
        return annotation
    return None


def _numpydoc_attributes(doc: str) -> dict[str, str]:
    """``name -> description`` from a numpydoc Attributes section (``a, b : type``
    lines followed by indented text)."""
    out: dict[str, str] = {}
    lines = doc.expandtabs().splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Attributes")
    except StopIteration:
        return out
    names: list[str] = []
    indent = None
    for line in lines[start + 2 :]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        indent = width if indent is None else indent
        if width == indent and " : " in line:
            names = [n.strip() for n in line.split(" : ")[0].split(",")]
            for n in names:
                out[n] = ""
        elif width > indent and names:
            for n in names:
                out[n] = f"{out[n]} {line.strip()}".strip()
        elif width <= indent:
            break
    return out


def _describe(table: str, model: Any, data: Mapping[str, Any], error: Mapping[str, Any]) -> str:
    """One line for a pydantic error: the key (nested tables dotted), the value
    given, pydantic's reason and the field's type."""
    loc = [str(p) for p in error["loc"]]
    path, doc, value, target = [], None, data, model
    for part in loc:
        fields = dict(_fields(target)) if target is not None else {}
        if part not in fields or not isinstance(value, Mapping):
            break
        path.append(part)
        doc, value = fields[part], value.get(part)
        target = _nested_type(doc.annotation)
    where = f"[{table}] {'.'.join(path) or '.'.join(loc)}"
    if error["type"] == "missing" and len(path) == len(loc):
        return f"{where}: required"
    rest = loc[len(path) :]
    detail = f" (item {'.'.join(rest)})" if rest else ""
    allowed = f"; allowed: {_type_text(doc.annotation)}" if doc is not None else ""
    return f"{where} = {value!r}: {error['msg']}{detail}{allowed}"


def _type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) if origin is None else None
    return text or str(annotation).replace("typing.", "")


# --- TOML out ------------------------------------------------------------------------


def render_toml(
    config: PhotocalConfig | None = None,
    *,
    tables: list[str] | None = None,
    show_defaults: bool = False,
) -> str:
    """The configuration as a commented TOML file that :func:`load_config` reads
    back to the same values: every field with its description and default.

    ``config`` None renders the defaults (``photocal config template``);
    ``show_defaults`` adds the default beside each value that differs from it
    (``photocal config show``).
    """
    models = stage_tables()
    names = tables or list(models)
    for name in names:
        if name not in models:
            raise ConfigError("--stage", [f"unknown table [{name}]; known: {', '.join(models)}"])
    config = config or load_config(None)
    head = [
        "# photocal configuration: one table per stage, read by `photocal run --config FILE`",
        f"# (resolved from {config.source}). Every key is optional: what is left out keeps",
        "# its default. Keys commented out have no value by default.",
    ]
    out = head
    for name in names:
        model = _settings_model(models[name])
        values = config[name].model_dump()
        out += ["", *_table_lines(name, model, values, show_defaults, mask=name == "store")]
    return "\n".join(out).rstrip() + "\n"


def _table_lines(
    name: str, model: Any, values: Mapping[str, Any], show_defaults: bool, *, mask: bool
) -> list[str]:
    doc = (model.__doc__ or "").strip().split("\n\n")[0]
    lines = [*(f"# {ln.strip()}" for ln in doc.splitlines()), f"[{name}]"]
    per_run = getattr(model, "per_run", ())
    if per_run:
        lines.insert(-1, f"# Set by each run, not here: {', '.join(per_run)}.")
    nested = []
    for key, field in _fields(model):
        value = values.get(key)
        sub = _nested_type(field.annotation)
        if sub is not None:
            nested.append((f"{name}.{key}", sub, _as_mapping(value)))
            continue
        lines += _field_lines(key, field, value, show_defaults, mask=mask)
    for sub_name, sub, sub_values in nested:
        lines += ["", *_table_lines(sub_name, sub, sub_values, show_defaults, mask=mask)]
    return lines


def _as_mapping(value: Any) -> Mapping[str, Any]:
    if isinstance(value, BaseModel):
        return value.model_dump()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value or {}


def _field_lines(
    key: str, field: FieldDoc, value: Any, show_defaults: bool, *, mask: bool
) -> list[str]:
    default = _plain(field.default)
    value = _plain(value)
    comment = field.description or "(no description)"
    lines = [f"# {ln}" for ln in _wrap(comment)]
    lines.append(f"#   type: {_type_text(field.annotation)}; default: {_toml_value(default)}")
    if mask and isinstance(value, Mapping):
        value = {k: ("***" if _HIDDEN_KEYS.search(str(k)) else v) for k, v in value.items()}
    if value is None:
        lines.append(f"# {key} =")
    else:
        changed = show_defaults and value != default
        lines.append(f"{key} = {_toml_value(value)}" + ("  # changed" if changed else ""))
    return lines


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple):
        return list(value)
    return value


def _wrap(text: str, width: int = 86) -> list[str]:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return [*lines, line] if line else lines


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = (
            f"{k if _BARE_KEY.match(str(k)) else json.dumps(str(k))} = {_toml_value(v)}"
            for k, v in value.items()
        )
        return "{ " + ", ".join(items) + " }" if value else "{}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")
