"""One generic loader: a YAML mapping -> a frozen dataclass, driven by the dataclass's fields and type hints.

Why not pydantic: the objects are small, frozen dataclasses that the rank processes also unpickle
(in the Horovod environment too); a ~200-line loader over the standard library's ``dataclasses`` and
``typing`` keeps every environment free of another compiled dependency, and its errors already read the
way ours must: the file, then the full field path (``layers[2].filters``), then what to change.

Supported field types: ``int``, ``float`` (an int is accepted), ``str``, ``bool`` (never a number),
``X | None``, ``tuple[X, ...]`` and ``tuple[X, Y, Z]`` (from YAML lists), ``Literal[...]`` choices,
``dict[str, X]``, a nested dataclass, and a union of dataclasses told apart by their ``type`` field.
A field's ``metadata`` may add a ``check`` (value -> problem text or None) and a ``convert`` run before
the type check; a class may define ``validate()`` raising :class:`Invalid` for rules across fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, TypeVar, Union

import yaml

from sparkml_mnist.errors import ConfigError

T = TypeVar("T")
SOURCE_FIELD = "source"  # a dataclass field of this name receives the file it was loaded from
TAG_FIELD = "type"  # the field that tells the members of a union of dataclasses apart
_TYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool"}


class Invalid(Exception):
    """A value breaks a rule; ``path`` is the field's path inside the object that raised it."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem


def rule(check: Callable[[Any], str | None] | None = None, convert: Callable[[Any], Any] | None = None) -> dict:
    """Field metadata: ``field(metadata=rule(positive))``."""
    return {key: value for key, value in (("check", check), ("convert", convert)) if value is not None}


def positive(value: Any) -> str | None:
    return None if value > 0 else f"must be a positive integer, got {value}" if isinstance(value, int) else (
        f"must be positive, got {value}"
    )


def fraction_below_one(value: float) -> str | None:
    return None if 0 <= value < 1 else f"must be in [0, 1), got {value}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML mapping; a missing file or a syntax error names the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read configuration file ({error.strerror})") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """Parse YAML text that must hold a mapping at the top level."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark is not None else source
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{where}: invalid YAML ({problem})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level")
    return document


def load_file(cls: type[T], path: str | Path) -> T:
    """A YAML file as a ``cls``; every error names the file and the field."""
    return from_mapping(cls, load_yaml(path), str(path))


def from_mapping(cls: type[T], settings: Mapping[str, Any], source: str) -> T:
    """``settings`` (a parsed YAML mapping) as a ``cls``; errors are ``ConfigError('<source>: ...')``."""
    try:
        return _build(cls, settings, "", source)
    except Invalid as error:
        raise ConfigError(f"{source}: {_describe(error)}") from None


def check(obj: T) -> T:
    """Run a dataclass's own ``validate()`` again (after ``dataclasses.replace``); errors name its source."""
    try:
        _validate(obj, "")
    except Invalid as error:
        raise ConfigError(f"{getattr(obj, SOURCE_FIELD, type(obj).__name__)}: {_describe(error)}") from None
    return obj


def _describe(error: Invalid) -> str:
    return f"field '{error.path}' {error.problem}" if error.path else error.problem


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _build(cls: type, settings: Any, path: str, source: str) -> Any:
    if not isinstance(settings, Mapping):
        raise Invalid(path, f"must be a mapping of settings, got {type(settings).__name__} {settings!r}")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init and f.name != SOURCE_FIELD]
    known = {f.name for f in fields}
    unknown = sorted(set(map(str, settings)) - known)
    if unknown:
        raise Invalid(
            "", f"unknown field(s) {', '.join(_join(path, name) for name in unknown)}; expected {sorted(known)}"
        )
    values: dict[str, Any] = {}
    for f in fields:
        where = _join(path, f.name)
        if f.name not in settings:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise Invalid("", f"missing required field '{where}'")
            continue
        value = settings[f.name]
        convert = f.metadata.get("convert")
        if convert is not None:
            try:
                value = convert(value)
            except (TypeError, ValueError) as error:
                raise Invalid(where, str(error)) from None
        value = _coerce(hints[f.name], value, where, source)
        problem = f.metadata.get("check")
        if problem is not None and value is not None:
            message = problem(value)
            if message:
                raise Invalid(where, message)
        values[f.name] = value
    if SOURCE_FIELD in {f.name for f in dataclasses.fields(cls)}:
        values[SOURCE_FIELD] = source
    obj = cls(**values)
    _validate(obj, path)
    return obj


def _validate(obj: Any, path: str) -> None:
    validate = getattr(obj, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except Invalid as error:
        raise Invalid(_join(path, error.path) if error.path else path, error.problem) from None


def _coerce(hint: Any, value: Any, path: str, source: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        members = [arg for arg in args if arg is not type(None)]
        if value is None and len(members) < len(args):
            return None
        if len(members) == 1:
            return _coerce(members[0], value, path, source)
        if all(dataclasses.is_dataclass(member) for member in members):
            return _tagged(members, value, path, source)
        for member in members:
            try:
                return _coerce(member, value, path, source)
            except Invalid:
                continue
        raise Invalid(path, f"must be one of {' or '.join(_name(m) for m in members)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise Invalid(path, f"is {value!r}; expected one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise Invalid(path, f"must be a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], item, f"{path}[{i}]", source) for i, item in enumerate(value))
        if len(value) != len(args):
            raise Invalid(path, f"must be a list of {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(arg, item, f"{path}[{i}]", source) for i, (arg, item) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise Invalid(path, f"must be a mapping, got {type(value).__name__} {value!r}")
        return {str(key): _coerce(args[1], item, _join(path, str(key)), source) for key, item in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, source)
    if hint is Any:
        return value
    return _scalar(hint, value, path)


def _scalar(kind: type, value: Any, path: str) -> Any:
    accepted: tuple[type, ...] = (int, float) if kind is float else (kind,)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, accepted):
        raise Invalid(path, f"must be {_name(kind)}, got {type(value).__name__} {value!r}")
    return float(value) if kind is float else value


def _tagged(members: list[type], value: Any, path: str, source: str) -> Any:
    """A union of dataclasses, each with a ``type: Literal[...]`` field: pick by the value's ``type``."""
    by_tag = {}
    for member in members:
        tag_hint = typing.get_type_hints(member)[TAG_FIELD]
        for tag in typing.get_args(tag_hint):
            by_tag[tag] = member
    if not isinstance(value, Mapping) or not isinstance(value.get(TAG_FIELD), str):
        raise Invalid(path, f"must be a mapping with a '{TAG_FIELD}' ({', '.join(by_tag)}), got {value!r}")
    tag = value[TAG_FIELD]
    if tag not in by_tag:
        raise Invalid(_join(path, TAG_FIELD), f"is {tag!r}; expected one of {', '.join(by_tag)}")
    return _build(by_tag[tag], value, path, source)


def _name(kind: Any) -> str:
    return _TYPE_NAMES.get(kind, getattr(kind, "__name__", str(kind)))
