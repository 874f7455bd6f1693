"""Reading parsed YAML into config values: typed reads per field, unknown keys, FLY_*/LOG_* fill, files.

Helpers of ``config.config_from_mapping`` and ``config.load_config``. ``read_yaml_file`` is the only
I/O. Literal YAML values must have the right type (``"true"`` in quotes is not a boolean); text
that came from ``${VAR}`` (``EnvText``) is read leniently, since the environment only holds text.
Imports the stdlib, PyYAML and ``config_*``/``routing.model``; never ``config`` itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING
from pathlib import Path
from typing import Any

import yaml

from affinity_proxy.config.parse import (
    ConfigError,
    EnvText,
    describe,
    join_path,
    parse_duration,
    parse_size,
)
from affinity_proxy.config.schema import UserKeySourceConfig
from affinity_proxy.routing.model import is_valid_instance_id


def read_yaml_file(path: str | os.PathLike[str]) -> Any:
    """The parsed YAML document (None for an empty file). Missing or unreadable file, syntax error or
    duplicate key -> ``ConfigError`` whose path is the file name."""
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(name, "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(name, f"cannot read the file ({getattr(err, 'strerror', None) or err})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        raise ConfigError(name, f"invalid YAML: {_yaml_problem(err)}") from None


def fill_from_env(data: dict[Any, Any], environ: Mapping[str, str]) -> tuple[dict[Any, Any], dict[str, str]]:
    """FLY_* fill unset ``fly`` keys; LOG_LEVEL/LOG_FORMAT override ``log`` keys (env wins).
    Returns the new data and which key paths came from which variable (for error messages)."""
    sources: dict[str, str] = {}
    fly, log = data.get("fly"), data.get("log")
    if fly is None or isinstance(fly, Mapping):
        fly = dict(fly or {})
        alloc = environ.get("FLY_ALLOC_ID") or ""
        if alloc and not is_valid_instance_id(alloc):
            alloc = alloc.partition("-")[0]
        fills = {
            "machine_id": [("FLY_MACHINE_ID", environ.get("FLY_MACHINE_ID")), ("FLY_ALLOC_ID", alloc)],
            "app": [("FLY_APP_NAME", environ.get("FLY_APP_NAME"))],
            "region": [("FLY_REGION", environ.get("FLY_REGION"))],
            "api_token": [("FLY_API_TOKEN", environ.get("FLY_API_TOKEN"))],
            "process_group": [("FLY_PROCESS_GROUP", environ.get("FLY_PROCESS_GROUP"))],
        }
        for key, candidates in fills.items():
            current = fly.get(key)
            if key == "process_group" and key in fly and current is None:
                continue  # an explicit ``process_group: null`` means every group
            if current is not None and not (isinstance(current, EnvText) and not current):
                continue
            for variable, found in candidates:
                if found:
                    fly[key], sources[f"fly.{key}"] = EnvText(found), variable
                    break
        if fly:
            data["fly"] = fly
    if log is None or isinstance(log, Mapping):
        log = dict(log or {})
        for key, variable in (("level", "LOG_LEVEL"), ("format", "LOG_FORMAT")):
            if environ.get(variable):
                log[key], sources[f"log.{key}"] = EnvText(environ[variable]), variable
        if log:
            data["log"] = log
    return data, sources


def build_section(cls: Any, raw: Any, path: str) -> Any:
    """One dataclass from a YAML mapping at ``path``: unknown and missing keys, then typed reads."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"expected a mapping, got {describe(raw)}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in known:
            raise unknown_key(path, key, known)
        values[key] = read_field(known[key], value, join_path(path, key))
    for name, f in known.items():
        if name not in values and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(join_path(path, name), "required")
    try:
        return cls(**values)
    except ConfigError as err:
        raise err.rerooted(cls.PATH, path) from None


def user_key_source(item: Any, path: str) -> UserKeySourceConfig:
    """One ``user_key`` item: a mapping with exactly one of header, query or cookie."""
    kinds = UserKeySourceConfig.KINDS
    if not isinstance(item, Mapping):
        raise ConfigError(path, f"expected a mapping like {{header: X-User-Id}}, got {describe(item)}")
    for key in item:
        if key not in kinds:
            raise unknown_key(path, key, dict.fromkeys(kinds))
    if len(item) != 1:
        found = ", ".join(map(str, item)) or "none"
        raise ConfigError(path, f"expected exactly one of {', '.join(kinds)}, got {found}")
    ((kind, name),) = item.items()
    name = _coerce("text", name, f"{path}.{kind}")
    try:
        return UserKeySourceConfig(kind, name)
    except ConfigError as err:
        raise ConfigError(f"{path}.{kind}", err.problem) from None


def as_list(value: Any, path: str, secret: bool = False) -> list[Any]:
    """A YAML list (null is empty)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a list, got {describe(value, secret=secret)}")
    return value


def unknown_key(path: str, key: Any, known: Mapping[str, Any]) -> ConfigError:
    """The error for a key not in ``known``, listing the known keys and the closest one."""
    names = list(known)
    close = difflib.get_close_matches(key, names, n=1) if isinstance(key, str) else []
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(join_path(path, key), f"unknown key (known: {', '.join(names)}){hint}")


# How each field is read from YAML, by its annotation; ``metadata={"kind": ...}`` overrides.
_KIND_BY_TYPE = {
    "str": "text", "str | None": "text?", "int": "int", "bool": "bool",
    "float": "seconds", "float | None": "seconds?", "tuple[str, ...]": "texts",
}  # fmt: skip
_ENV_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}
_ENV_INT = re.compile(r"[+-]?[0-9]{1,18}")


def field_kind(f: dataclasses.Field[Any]) -> str:
    """How the loader reads a field: text, int, bool, seconds, whole_seconds, size, texts (``?``: nullable)."""
    return f.metadata.get("kind") or _KIND_BY_TYPE[str(f.type)]


def read_field(f: dataclasses.Field[Any], value: Any, path: str) -> Any:
    if f.metadata.get("kind") == "section":  # a nested section (``fly.replay_cache``)
        factory = f.default_factory
        assert factory is not MISSING
        return build_section(type(factory()), value, path)
    return _coerce(field_kind(f), value, path, secret=bool(f.metadata.get("secret")))


def _coerce(kind: str, value: Any, path: str, secret: bool = False) -> Any:
    """A YAML value as ``kind``. Literal YAML must have the right type ("true" in quotes is not a
    boolean); text from ``${VAR}`` (EnvText) is read leniently, and empty means null."""
    env = isinstance(value, EnvText)
    if kind.endswith("?"):
        if value is None or (env and not value.strip()):
            return None
        kind = kind[:-1]
    got = describe(value, secret=secret)
    if kind == "text":
        if isinstance(value, str):
            return str(value)
        hint = " (quote it in YAML)" if isinstance(value, int | float) else ""
        raise ConfigError(path, f"expected a string, got {got}{hint}")
    if kind == "int":
        if env and _ENV_INT.fullmatch(value.strip()):
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        hint = " (write it without quotes)" if isinstance(value, str) and _ENV_INT.fullmatch(value.strip()) else ""
        raise ConfigError(path, f"expected an integer, got {got}{hint}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if env and value.strip().lower() in _ENV_BOOLS:
            return _ENV_BOOLS[value.strip().lower()]
        quoted = isinstance(value, str) and value.strip().lower() in ("true", "false")
        raise ConfigError(path, f"expected true or false, got {got}" + (" (write it without quotes)" if quoted else ""))
    if kind == "number":  # a plain number (``placement.load_factor``); the dataclass checks the range
        if env:
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, int | float) and not isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected a number, got {got}")
    if kind == "seconds":
        return parse_duration(value, path)
    if kind == "whole_seconds":
        seconds = parse_duration(value, path)
        if not seconds.is_integer():
            raise ConfigError(path, f"must be a whole number of seconds, got {got}")
        return int(seconds)
    if kind == "size":
        return parse_size(value, path)
    if kind == "texts":
        return tuple(
            _coerce("text", item, f"{path}[{i}]", secret) for i, item in enumerate(as_list(value, path, secret))
        )
    raise AssertionError(f"unknown field kind {kind!r}")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged in with << may be overridden
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it below
        if duplicate:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1}, column {mark.column + 1})", mark
            )
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is None:
        return problem
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
