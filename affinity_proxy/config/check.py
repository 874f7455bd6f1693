"""Field checks shared by the config dataclasses' ``__post_init__``.

``Check(obj, prefix)`` reads one field of a frozen dataclass, checks its type and range, normalises
it in place (``"lax"`` -> ``"Lax"``, ``60`` -> ``60.0``, ``EnvText`` -> ``str``) and raises
``ConfigError("<prefix>.<field>", ...)``. Values of fields marked ``metadata={"secret": True}`` never
appear in messages. Pure; imports only the stdlib and ``config_parse``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection
from typing import Any
from urllib.parse import urlsplit

from affinity_proxy.config.parse import HOSTNAME, MAX_SECONDS, ConfigError, describe, join_path

TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 7230 tchar: header and cookie names
_UNSAFE = re.compile(r"[\x00-\x20\x7f;,]")  # breaks a Set-Cookie attribute or a request line


class Check:
    """Validator for the fields of one dataclass instance; ``prefix`` is its key path (``cookie``)."""

    __slots__ = ("obj", "prefix", "secrets")

    def __init__(self, obj: Any, prefix: str) -> None:
        self.obj = obj
        self.prefix = prefix
        self.secrets = {f.name for f in dataclasses.fields(obj) if f.metadata.get("secret")}

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(join_path(self.prefix, name), problem)

    def got(self, name: str, value: Any) -> str:
        return f"got {describe(value, secret=name in self.secrets)}"

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self.obj, name, value)

    def text(self, name: str, *, optional: bool = False, pattern: re.Pattern[str] | None = None,
             what: str = "") -> str | None:  # fmt: skip
        """A non-empty string (or None when ``optional``), fully matching ``pattern`` if given."""
        value = getattr(self.obj, name)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(name, f"expected a string, {self.got(name, value)}")
        if not value:
            raise self.fail(name, "must not be empty" + (" (leave it out or use null)" if optional else ""))
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(name, f"must be {what}, {self.got(name, value)}")
        if type(value) is not str:
            self._set(name, value := str(value))
        return value

    def texts(self, name: str) -> tuple[str, ...]:
        """A tuple of non-empty strings (a list is accepted and frozen)."""
        value = getattr(self.obj, name)
        if not isinstance(value, tuple | list):
            raise self.fail(name, f"expected a list of strings, got {describe(value, secret=True)}")
        items = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise ConfigError(
                    f"{join_path(self.prefix, name)}[{i}]", f"expected a non-empty string, {self.got(name, item)}"
                )
            items.append(str(item))
        self._set(name, result := tuple(items))
        return result

    def flag(self, *names: str) -> None:
        for name in names:
            value = getattr(self.obj, name)
            if not isinstance(value, bool):
                raise self.fail(name, f"expected true or false, {self.got(name, value)}")

    def integer(self, name: str, low: int, high: int | None = None) -> int:
        value = getattr(self.obj, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"expected an integer, {self.got(name, value)}")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise self.fail(name, f"must be {bound}, {self.got(name, value)}")
        return value

    def seconds(self, name: str, *, positive: bool = True, optional: bool = False) -> float | None:
        """A duration in seconds as a float: ``> 0`` when ``positive``, else ``>= 0``; at most ten years."""
        value = getattr(self.obj, name)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(name, f"expected a number of seconds, {self.got(name, value)}")
        if not (value > 0 if positive else value >= 0):
            raise self.fail(name, f"must be {'greater than 0' if positive else 'at least 0'}, {self.got(name, value)}")
        if value > MAX_SECONDS:
            raise self.fail(name, f"must be at most 3650d, {self.got(name, value)}")
        self._set(name, value := float(value))
        return value

    def choice(self, name: str, options: Collection[str]) -> str:
        """One of ``options``, matched case-insensitively and stored in the spelling of ``options``."""
        value = getattr(self.obj, name)
        canonical = {o.lower(): o for o in options}
        if not isinstance(value, str) or value.lower() not in canonical:
            raise self.fail(name, f"must be one of {', '.join(options)}, {self.got(name, value)}")
        self._set(name, value := canonical[value.lower()])
        return value

    def http_url(self, name: str, *, optional: bool = False, allow_path: bool = False) -> str | None:
        """An ``http://`` or ``https://`` URL naming a host, with no credentials (and no path unless
        ``allow_path``)."""
        value = self.text(name, optional=optional)
        if value is None:
            return None
        problem = http_url_problem(value, allow_path=allow_path)
        if problem:
            raise self.fail(name, f"{problem}, {self.got(name, value)}")
        return value

    def url_path(self, name: str) -> str:
        """A URL path: starts with ``/``, no whitespace, control characters, ``;`` or ``,``."""
        value = self.text(name)
        assert value is not None
        if not value.startswith("/") or _UNSAFE.search(value):
            raise self.fail(name, f"must be a path starting with / (no spaces, ';' or ','), {self.got(name, value)}")
        return value

    def hostname(self, name: str, *, optional: bool = False) -> str | None:
        return self.text(name, optional=optional, pattern=HOSTNAME, what="a DNS name like example.com")

    def kind(self, name: str, cls: type, *, label: str) -> None:
        value = getattr(self.obj, name)
        if not isinstance(value, cls):
            raise self.fail(name, f"expected {label}, got {describe(value)}")

    def items(self, name: str, cls: type) -> tuple[Any, ...]:
        """A tuple of ``cls`` instances (a list is accepted and frozen)."""
        value = getattr(self.obj, name)
        if not isinstance(value, tuple | list):
            raise self.fail(name, f"expected a list, got {describe(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, cls):
                raise ConfigError(
                    f"{join_path(self.prefix, name)}[{i}]", f"expected a {cls.__name__}, got {describe(item)}"
                )
        self._set(name, result := tuple(value))
        return result


def http_url_problem(value: str, *, allow_path: bool = False) -> str | None:
    """Why ``value`` is not a usable http(s) URL, or None when it is."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as err:
        return f"is not a valid URL ({err})"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return "must name a host"
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials"
    if parts.query or parts.fragment or (not allow_path and parts.path not in ("", "/")):
        return "must be scheme://host[:port] with no path, query or fragment"
    if _UNSAFE.search(value):
        return "must not contain spaces or control characters"
    return None
