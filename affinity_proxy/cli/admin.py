"""How the CLI reaches the pin store and membership: the ``PinBackend`` seam, its admin-API
implementation (HTTP to a running node's admin listener), and the rules that find the admin URL
and token from flags, the environment and the config file. The Redis-direct implementation is
``cli_redis.RedisBackend``; ``cli_base.make_backend`` chooses between them.

Imports aiohttp and ``config`` only. Every network call has a short timeout; every failure becomes
a ``BackendError`` with a one-line message that never contains the token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import aiohttp

from affinity_proxy.config import Config, ConfigError, load_config

DEFAULT_CONFIG_PATH = Path("config/proxy.yaml")
DEFAULT_ADMIN_URL = "http://127.0.0.1:9091"
CONFIG_ENV = "AFFINITY_CONFIG"
TOKEN_ENV = "AFFINITY_ADMIN_TOKEN"
CONNECT_TIMEOUT = 3.0
TOTAL_TIMEOUT = 15.0
_WILDCARD_HOSTS = {"0.0.0.0", "::", "", "[::]"}


class BackendError(Exception):
    """An operational failure (exit 1). ``status`` is the HTTP status, or None when there was no
    answer; ``code`` the API's ``error`` field."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class PinBackend(Protocol):
    """What the pin, instance and reap commands need. Methods return the admin API's JSON shapes
    (see ``web/admin.py``) so a Redis-direct backend can be swapped in without touching the commands.
    Each call does network I/O and raises ``BackendError``; use as an async context manager."""

    async def __aenter__(self) -> PinBackend: ...

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None: ...

    async def list_pins(self, instance: str | None = None, limit: int | None = None) -> dict[str, Any]: ...

    async def show_pin(self, user: str) -> dict[str, Any]: ...

    async def set_pin(self, user: str, instance: str) -> dict[str, Any]: ...

    async def drop_pin(self, user: str) -> dict[str, Any]: ...

    async def instances(self) -> dict[str, Any]: ...

    async def drain(self, instance: str) -> dict[str, Any]: ...

    async def undrain(self, instance: str) -> dict[str, Any]: ...

    async def reap(self, dry_run: bool = False) -> dict[str, Any]: ...

    async def rebalance(self, dry_run: bool = False) -> dict[str, Any]: ...


def _seg(value: str) -> str:
    return quote(value, safe="")


async def get_json(session: aiohttp.ClientSession, method: str, url: str, what: str,
                   **kwargs: Any) -> dict[str, Any]:
    """One request; returns the JSON body of a 2xx answer, raises ``BackendError`` otherwise."""
    try:
        async with session.request(method, url, **kwargs) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = None
            status = resp.status
    except TimeoutError:
        raise BackendError(f"{what} timed out") from None
    except aiohttp.ClientConnectorError as exc:
        raise BackendError(f"{what} unreachable: {_reason(exc)}") from None
    except aiohttp.ClientError as exc:
        raise BackendError(f"{what} failed: {_reason(exc)}") from None
    if not isinstance(body, dict):
        raise BackendError(f"{what} answered HTTP {status} without a JSON object", status)
    if status >= 400:
        message = str(body.get("message") or body.get("error") or "error")
        raise BackendError(message, status, str(body.get("error") or "") or None)
    return body


def _reason(exc: BaseException) -> str:
    """A short cause: ``Connection refused`` rather than aiohttp's repr of the socket call."""
    os_error = getattr(exc, "os_error", None) or (exc if isinstance(exc, OSError) else None)
    if isinstance(os_error, OSError):
        if os_error.errno and os_error.errno > 0:
            return os.strerror(os_error.errno)
        if os_error.strerror:
            return os_error.strerror
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


class AdminApiBackend:
    """``PinBackend`` over a node's admin listener (the only way to reach a ``memory://`` store)."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = TOTAL_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=CONNECT_TIMEOUT)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminApiBackend:
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        assert self._session is not None, "use AdminApiBackend as an async context manager"
        try:
            return await get_json(self._session, method, self.base_url + path,
                                  f"admin API at {self.base_url}", **kwargs)
        except BackendError as exc:
            if exc.status == 401:
                raise BackendError(f"unauthorized: the admin API at {self.base_url} needs a token "
                                   f"(--token or {TOKEN_ENV})", 401, exc.code) from None
            if exc.status == 503:
                raise BackendError(f"store unavailable: {exc}", 503, exc.code) from None
            raise

    async def list_pins(self, instance: str | None = None, limit: int | None = None) -> dict[str, Any]:
        params = {}
        if instance is not None:
            params["instance"] = instance
        if limit is not None:
            params["limit"] = str(limit)
        return await self._call("GET", "/pins", params=params)

    async def show_pin(self, user: str) -> dict[str, Any]:
        return await self._call("GET", f"/pins/{_seg(user)}")

    async def set_pin(self, user: str, instance: str) -> dict[str, Any]:
        return await self._call("PUT", f"/pins/{_seg(user)}", json={"instance": instance})

    async def drop_pin(self, user: str) -> dict[str, Any]:
        return await self._call("DELETE", f"/pins/{_seg(user)}")

    async def instances(self) -> dict[str, Any]:
        return await self._call("GET", "/instances")

    async def drain(self, instance: str) -> dict[str, Any]:
        return await self._call("POST", f"/instances/{_seg(instance)}/drain")

    async def undrain(self, instance: str) -> dict[str, Any]:
        return await self._call("POST", f"/instances/{_seg(instance)}/undrain")

    async def reap(self, dry_run: bool = False) -> dict[str, Any]:
        return await self._call("POST", "/reap", params={"dry_run": "1" if dry_run else "0"})

    async def rebalance(self, dry_run: bool = False) -> dict[str, Any]:
        return await self._call("POST", "/rebalance", params={"dry_run": "1" if dry_run else "0"})


@dataclass(frozen=True, slots=True)
class AdminTarget:
    """Where a store command goes: ``url``/``token`` of the admin API, plus the config that was read
    (None when none was found) and whether ``--admin`` was given (then the admin API is used even
    for a Redis store; see ``cli_base.make_backend``)."""

    url: str
    token: str | None
    config: Config | None = None
    admin_explicit: bool = False

    def __repr__(self) -> str:  # never show the token (nor the config's secrets)
        return (f"AdminTarget(url={self.url!r}, token={'***' if self.token else None}, "
                f"config={'yes' if self.config is not None else None}, admin_explicit={self.admin_explicit})")


def resolve_config_path(explicit: str | None) -> Path | None:
    """``--config``, else ``$AFFINITY_CONFIG``, else ``./config/proxy.yaml`` if it exists, else None."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def read_config(path: Path, *, secrets_optional: bool = False) -> Config:
    """``load_config`` with a missing or unreadable file reported as a ``ConfigError`` too."""
    try:
        return load_config(path, secrets_optional=secrets_optional)
    except ConfigError:
        raise
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None


def admin_url_for(config: Config) -> str:
    host = config.admin_host
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{config.admin_port}"


def check_admin_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected an http:// or https:// URL")
    return url.rstrip("/")


def resolve_admin_target(config_path: str | None, admin: str | None, token: str | None) -> AdminTarget:
    """Flags win; the environment (``AFFINITY_ADMIN_TOKEN``) comes next, then the config file.
    The config is read only when it is named explicitly or something is still missing.
    Raises ``ConfigError`` (exit 2) for an unreadable or invalid config."""
    token = token or os.environ.get(TOKEN_ENV) or None
    admin_explicit = admin is not None
    explicit = bool(config_path or os.environ.get(CONFIG_ENV))
    config: Config | None = None
    if explicit or admin is None or token is None:
        path = resolve_config_path(config_path)
        if path is not None:
            config = read_config(path, secrets_optional=True)  # the cookie secret is not needed here
    if admin is None:
        admin = admin_url_for(config) if config is not None else DEFAULT_ADMIN_URL
    if token is None and config is not None:
        token = config.admin.token or None
    return AdminTarget(admin.rstrip("/"), token, config, admin_explicit)
