"""Typed frozen-dataclass configs from plain YAML data: coercion, validation, errors with key paths.

Every config section is a frozen dataclass. Fields declare their constraints with `knob(...)`;
`build(cls, data, path)` turns a YAML mapping into an instance or raises `ConfigError` naming the
exact key path, what was expected and, for a typo, the closest valid key.

Polymorphic sections (the model, the data set) subclass `Choice`: the mapping's `name` key picks the
concrete dataclass from a registry, and an optional `size` key starts from that family's preset.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, Union

__all__ = ["ConfigError", "knob", "Choice", "build", "to_dict", "check_constraints"]


class ConfigError(ValueError):
    """A bad configuration value. `str(err)` is one line naming the key path."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


def knob(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    help: str = "",
) -> Any:
    """A dataclass field with range constraints and a help string (shown by `--help` listings)."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Choice:
    """Base of a polymorphic config section selected by its `name` key.

    Subclasses set `REGISTRY_LOADER` (returns {name: dataclass}) on the abstract base, and each
    concrete class may set `SIZES` ({size name: {field: value}}) for named size ladders.
    """

    KIND: ClassVar[str] = "choice"
    DEFAULT: ClassVar[str | None] = None  # the `name` used when a section omits it
    SIZES: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def registry(cls) -> dict[str, type]:
        raise NotImplementedError

    def check(self) -> None:
        """Cross-field validation; raise ConfigError with a key relative to this section."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Coerce a YAML/CLI scalar to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        hint = _did_you_mean(str(value), [str(a) for a in allowed])
        raise ConfigError(path, f"expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}{hint}")
    if origin is tuple:
        (elem,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {value!r}")
        return tuple(_coerce(v, elem, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp) or (isinstance(tp, type) and issubclass(tp, Choice)):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping (section {tp.__name__}), got {value!r}")
        return build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value.replace("_", ""))
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(path, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-3` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(path, f"expected a string, got {value!r}")
    raise ConfigError(path, f"unsupported field type {tp!r}")


def check_constraints(obj: Any, path: str) -> None:
    """Check each field's ge/gt/le/lt constraints, then the section's own `check()`."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{path}.{f.name}" if path else f.name
        meta = f.metadata
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            for op, bound, ok in (
                (">=", meta.get("ge"), lambda v, b: v >= b),
                (">", meta.get("gt"), lambda v, b: v > b),
                ("<=", meta.get("le"), lambda v, b: v <= b),
                ("<", meta.get("lt"), lambda v, b: v < b),
            ):
                if bound is not None and not ok(value, bound):
                    raise ConfigError(key, f"expected a value {op} {bound}, got {value!r}")
    checker = getattr(obj, "check", None)
    if callable(checker):
        try:
            checker()
        except ConfigError as err:
            raise ConfigError(f"{path}.{err.path}" if path and err.path else (err.path or path), err.message) from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _apply_size(cls: type, data: dict[str, Any], path: str) -> dict[str, Any]:
    """Start from the family's size preset (if `size` names one), then let explicit keys override."""
    size = data.get("size")
    sizes = getattr(cls, "SIZES", {})
    if size is None or not sizes or size == "custom":
        return data
    if size not in sizes:
        hint = _did_you_mean(str(size), list(sizes))
        raise ConfigError(_join(path, "size"), f"unknown size {size!r}{hint}; expected one of {', '.join(sizes)} or 'custom'")
    return {**sizes[size], **data}


def _resolve_choice(base: type, data: Mapping[str, Any], path: str) -> tuple[type, dict[str, Any]]:
    registry = base.registry()
    name = data.get("name", base.DEFAULT)
    if name is None:
        raise ConfigError(_join(path, "name"), f"required; one of {', '.join(sorted(registry))}")
    if name not in registry:
        hint = _did_you_mean(str(name), sorted(registry))
        raise ConfigError(
            _join(path, "name"), f"unknown {base.KIND} {name!r}{hint}; expected one of {', '.join(sorted(registry))}"
        )
    return registry[name], {**dict(data), "name": name}


def build(cls: type, data: Mapping[str, Any] | None, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping: unknown keys, wrong types and ranges raise ConfigError."""
    data = dict(data or {})
    if isinstance(cls, type) and issubclass(cls, Choice):
        if cls not in cls.registry().values():
            cls, data = _resolve_choice(cls, data, path)
        data = _apply_size(cls, data, path)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        full = f"{path}.{key}" if path else str(key)
        raise ConfigError(full, f"unknown key{_did_you_mean(str(key), list(fields))}; expected one of {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(value, hints[name], key)
    for name, f in fields.items():
        if name in kwargs:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            tp = hints[name]
            key = f"{path}.{name}" if path else name
            if isinstance(tp, type) and issubclass(tp, Choice):
                kwargs[name] = _coerce({}, tp, key)  # reports the missing `name`
                continue
            raise ConfigError(key, f"required ({_type_name(tp)})")
    obj = cls(**kwargs)
    check_constraints(obj, path)
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def field_help(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) rows for a dataclass, for `--help`-style listings."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else "(required)"
        if f.default_factory is not dataclasses.MISSING:
            default = "(section)"
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return rows
