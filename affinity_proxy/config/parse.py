"""Reading single config values: errors with key paths, durations, sizes, host:port, ``${VAR}`` expansion.

Pure and I/O-free; imports only the stdlib and must not import the rest of affinity_proxy. Every
reader takes the key path of the value it reads and raises ``ConfigError`` whose message starts
with that path ("limits.max_body_bytes: expected a size like 10MiB, got 'abc'"), so a user sees
where and what. ``config_schema`` validates the typed tree and ``config`` loads YAML; both build on
this module.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

MAX_SECONDS = 10 * 365 * 86400.0  # ten years: longer is a typo, and asyncio timers overflow on huge values
MAX_BYTES = 2**50  # 1 PiB
_MAX_TEXT = 64  # longest duration/size text worth parsing; longer is garbage (and keeps int() cheap)


class ConfigError(Exception):
    """A configuration problem; ``str(err)`` is ``"<key path>: <problem>"``.

    ``path`` is the key path from the root of the YAML file (``cookie.same_site``, ``instances[1].id``)
    or the file name for file-level problems; ``problem`` says what is wrong. Both forms work:
    ``ConfigError("cookie.secret", "required")`` and ``ConfigError("cookie.secret: required")``.
    """

    def __init__(self, path: str, problem: str | None = None) -> None:
        if problem is None:
            message = path
            head, sep, tail = path.partition(": ")
            path, problem = (head, tail) if sep else ("", path)
        else:
            message = f"{path}: {problem}" if path else problem
        super().__init__(message)
        self.path = path
        self.problem = problem

    def rerooted(self, old: str, new: str) -> ConfigError:
        """The same problem with the path prefix ``old`` replaced by ``new`` (for list items)."""
        if old == new or not (self.path == old or self.path.startswith((old + ".", old + "["))):
            return self
        return ConfigError(new + self.path[len(old) :], self.problem)

    def with_note(self, note: str) -> ConfigError:
        """The same error with `` (note)`` appended to the problem."""
        return ConfigError(self.path, f"{self.problem} ({note})")


class EnvText(str):
    """A string produced by ``${VAR}`` expansion. Environment values are always text, so typed keys
    read it leniently ("true", "8080", "" for unset) while literal YAML values must have the right type."""

    __slots__ = ()


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}


def type_name(value: Any) -> str:
    """ "an integer", "a mapping", "null": for messages."""
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    for kind, name in _TYPE_NAMES.items():
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"


def describe(value: Any, *, secret: bool = False) -> str:
    """How a value appears after "got" in a message; a secret shows only its type."""
    if secret:
        return type_name(value)
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int | float | str):
        text = repr(str(value)) if isinstance(value, str) else repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return type_name(value)


# --- durations ---------------------------------------------------------------------------------

_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_HINT = "expected a duration like 250ms, 5s, 2m, 1h, 1d or 1h30m (a bare number is seconds)"


def parse_duration(value: Any, path: str) -> float:
    """Seconds from a number (seconds) or text: ``250ms``, ``5s``, ``1.5s``, ``2m``, ``1h``, ``1d``,
    ``1h30m``, ``"5"``. Negative, non-finite, over ten years or garbage -> ``ConfigError(path: ...)``."""
    seconds: float
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(path, f"{_DURATION_HINT}, got {describe(value)}")
    if isinstance(value, str):
        text = value.strip()
        body = text[1:] if text.startswith("-") else text
        if len(text) > _MAX_TEXT or not (_NUMBER.fullmatch(body) or _DURATION.fullmatch(body)):
            raise ConfigError(path, f"{_DURATION_HINT}, got {describe(value)}")
        if text.startswith("-"):
            raise ConfigError(path, f"must not be negative, got {describe(value)}")
        if _NUMBER.fullmatch(body):
            seconds = float(body)
        else:
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(body))
    else:
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if math.isnan(seconds):
            raise ConfigError(path, f"{_DURATION_HINT}, got {describe(value)}")
        if seconds < 0:
            raise ConfigError(path, f"must not be negative, got {describe(value)}")
    if seconds > MAX_SECONDS:
        raise ConfigError(path, f"must be at most 3650d, got {describe(value)}")
    return seconds


# --- sizes -------------------------------------------------------------------------------------

_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE_HINT = "expected a size like 512B, 16KiB, 10MiB, 1MB or 2GiB (a bare number is bytes)"


def parse_size(value: Any, path: str) -> int:
    """Bytes from an integer or text: ``512B``, ``16KiB``, ``1MiB`` (2^20), ``1MB`` (10^6), ``2GiB``,
    ``1.5KiB``; units are case-insensitive. Negative, fractional bytes, over 1 PiB or garbage ->
    ``ConfigError(path: ...)``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(path, f"{_SIZE_HINT}, got {describe(value)}")
    if isinstance(value, str):
        text = value.strip()
        match = _SIZE.fullmatch(text) if len(text) <= _MAX_TEXT else None
        if match is None or match.group(2).lower() not in _SIZE_UNITS:
            if text.startswith("-") and _SIZE.fullmatch(text[1:]):
                raise ConfigError(path, f"must not be negative, got {describe(value)}")
            raise ConfigError(path, f"{_SIZE_HINT}, got {describe(value)}")
        amount = Decimal(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    elif isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(path, f"must be a whole number of bytes, got {describe(value)}")
        amount = Decimal(value)
    else:
        amount = Decimal(value)
    if amount < 0:
        raise ConfigError(path, f"must not be negative, got {describe(value)}")
    if amount != amount.to_integral_value():
        raise ConfigError(path, f"must be a whole number of bytes, got {describe(value)}")
    if amount > MAX_BYTES:
        raise ConfigError(path, f"must be at most 1PiB, got {describe(value)}")
    return int(amount)


# --- host:port ---------------------------------------------------------------------------------

_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
_PORT = re.compile(r"[0-9]{1,5}")
_HOSTPORT_HINT = "expected host:port like 0.0.0.0:8080, [::1]:9091 or :8080"


def parse_hostport(value: Any, path: str) -> tuple[str, int]:
    """``(host, port)`` from ``0.0.0.0:8080``, ``[::1]:9091``, ``:8080`` (host ``::``, like
    ``[::]:8080``: a listener there takes IPv4 and IPv6, see ``listeners``) or ``localhost:0``
    (port 0: any free port). IPv6 hosts come back without brackets."""
    if not isinstance(value, str):
        raise ConfigError(path, f"{_HOSTPORT_HINT}, got {describe(value)}")
    text = value.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(path, f"{_HOSTPORT_HINT}, got {describe(value)}")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(path, f"{_HOSTPORT_HINT} (the port is missing), got {describe(value)}")
        if ":" in host:
            raise ConfigError(path, f"IPv6 hosts need brackets, like [::1]:9091, got {describe(value)}")
        if not host:
            host = "::"  # every address of both families (``listeners.dual_stack_socket``)
        elif not HOSTNAME.fullmatch(host) or (_looks_numeric(host) and not _is_ipv4(host)):
            raise ConfigError(path, f"{_HOSTPORT_HINT} (bad host), got {describe(value)}")
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ConfigError(path, f"port must be a number from 0 to 65535, got {describe(value)}")
    return host, int(port_text)


def _looks_numeric(host: str) -> bool:
    return all(part.isascii() and part.isdigit() for part in host.rstrip(".").split("."))


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


# --- URLs --------------------------------------------------------------------------------------

_PASSWORD_PARAM = re.compile(r"(^|&)(password=)[^&]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with any password (``redis://:pw@host`` or ``?password=pw``) replaced by ``***``;
    ``***`` alone when the URL cannot be parsed. Everything else is kept byte for byte."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.password:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
        url = url.replace(f"//{parts.netloc}", f"//{netloc}", 1)
    head, sep, rest = url.partition("?")
    if sep:
        query, hash_, fragment = rest.partition("#")
        query = _PASSWORD_PARAM.sub(r"\1\2***", query)
        url = f"{head}?{query}{hash_}{fragment}"
    return url


# --- ${VAR} expansion --------------------------------------------------------------------------

_REFERENCE = re.compile(r"\$(?:(\$)|\{([^}]*)(\}?))")
_VARIABLE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def expand_env(value: Any, environ: Mapping[str, str], path: str = "",
               secret: Callable[[str], bool] | None = None, *, secrets_optional: bool = False) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string of a parsed YAML value, recursively.

    ``$$`` is a literal ``$``, and a ``$`` not followed by ``{`` or ``$`` is kept. ``${VAR:-default}``
    uses the default when VAR is unset or empty (as in the shell). A string that had a substitution
    comes back as ``EnvText``. Mapping keys are not expanded. A malformed reference ->
    ``ConfigError`` at once; ``${VAR}`` with VAR unset -> one ``ConfigError`` naming the key path and
    the variable of the first, and the other unset variables after it (an operator sets them all in
    one go). ``secret(path)`` says which key paths hold secrets: there ``${VAR}`` with VAR empty is
    an error too (an empty secret is no secret) and the hint never suggests a default;
    ``secrets_optional`` instead reads an unset secret as empty, i.e. not set (for CLI commands that
    only need the store or the admin URL). Returns new containers; the input is not changed.
    """
    missing: list[tuple[str, str, bool, bool]] = []  # (path, variable, is secret, set but empty)
    result = _expand(value, environ, path, secret or (lambda _: False), missing)
    if secrets_optional:
        missing = [m for m in missing if not m[2]]
    if missing:
        first_path, name, is_secret, empty = missing[0]
        problem = f"environment variable {name} is {'empty' if empty else 'not set'}"
        if is_secret:
            problem += f" (a secret has no default: set it, e.g. {name}=$(openssl rand -hex 32))"
        else:
            problem += f" (set it, or write ${{{name}:-default}})"
        others = [f"{n} ({p})" for p, n, _, _ in missing[1:]]
        if others:
            problem += f"; also missing: {', '.join(others)}"
        raise ConfigError(first_path, problem)
    return result


def _expand(value: Any, environ: Mapping[str, str], path: str, secret: Callable[[str], bool],
            missing: list[tuple[str, str, bool, bool]]) -> Any:
    if isinstance(value, str):
        return _expand_text(value, environ, path, secret, missing)
    if isinstance(value, Mapping):
        return {key: _expand(item, environ, join_path(path, key), secret, missing) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_expand(item, environ, f"{path}[{i}]", secret, missing) for i, item in enumerate(value)]
    return value


def _expand_text(text: str, environ: Mapping[str, str], path: str, secret: Callable[[str], bool],
                 missing: list[tuple[str, str, bool, bool]]) -> str:
    if "$" not in text:
        return text
    substituted = False

    def replace(match: re.Match[str]) -> str:
        nonlocal substituted
        if match.group(1):
            return "$"
        body, closed = match.group(2), match.group(3)
        variable = _VARIABLE.fullmatch(body)
        if not closed:
            raise ConfigError(path, f"unterminated ${{ in {describe(text)} (write $$ for a literal $)")
        if variable is None:
            raise ConfigError(path, f"bad variable reference ${{{body}}} (use ${{NAME}} or ${{NAME:-default}})")
        name, default = variable.group(1), variable.group(2)
        found = environ.get(name)
        substituted = True
        if default is not None:
            return found if found else default
        is_secret = secret(path)
        if found is None or (is_secret and not found):
            missing.append((path, name, is_secret, found is not None))
            return ""
        return found

    expanded = _REFERENCE.sub(replace, text)
    return EnvText(expanded) if substituted else expanded


def join_path(path: str, key: Any) -> str:
    """``cookie`` + ``name`` -> ``cookie.name``; the root has no leading dot."""
    return f"{path}.{key}" if path else str(key)
