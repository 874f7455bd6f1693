"""Pieces every CLI command shares: the one-line ``error:`` exception with its exit code, the
``--json`` option, and the store-target options (``--config``, ``--admin``, ``--token``) with the
runner that opens a ``PinBackend`` (Redis directly or a node's admin API, see ``make_backend``),
awaits one coroutine on it and maps failures to exit codes.

Imported only by ``cli`` and ``cli_*`` modules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import IO, Any, TypeVar

import click

from affinity_proxy.cli.admin import (
    CONFIG_ENV,
    TOKEN_ENV,
    AdminApiBackend,
    AdminTarget,
    BackendError,
    PinBackend,
    check_admin_url,
    resolve_admin_target,
)
from affinity_proxy.cli.output import dump_json
from affinity_proxy.config import ConfigError

EXIT_OK = 0
EXIT_OPERATIONAL = 1
EXIT_USAGE = 2

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """Printed as one ``error: ...`` line on stderr; exit 1 (operational) or 2 (usage/config)."""

    def __init__(self, message: str, exit_code: int = EXIT_OPERATIONAL) -> None:
        super().__init__(" ".join(str(message).split()) or "failed")
        self.exit_code = exit_code

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def config_error(exc: ConfigError) -> CliError:
    return CliError(str(exc), EXIT_USAGE)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print the JSON document instead of text.")(f)


def emit(doc: Any, as_json: bool, text: Callable[[], str]) -> None:
    click.echo(dump_json(doc) if as_json else text())


def _admin_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_admin_url(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def admin_options(f: F) -> F:
    """Adds ``--config``, ``--admin`` and ``--token``; the command receives them as
    ``config_path``, ``admin`` and ``token``."""
    f = click.option("--token", default=None, metavar="TOKEN",
                     help=f"Admin bearer token (default: ${TOKEN_ENV}, else admin.token from the config).")(f)
    f = click.option("--admin", default=None, metavar="URL", callback=_admin_url,
                     help="Go through this admin API even when the config names a Redis store "
                          "(default for memory://: http://{admin_listen} from the config, "
                          "wildcard hosts mapped to 127.0.0.1; else http://127.0.0.1:9091).")(f)
    f = click.option("--config", "config_path", default=None, metavar="FILE",
                     help=f"Proxy config (default: ${CONFIG_ENV}, else ./config/proxy.yaml if it exists). "
                          "A redis:// store is reached directly, memory:// through the admin API.")(f)
    return f


def make_backend(target: AdminTarget) -> PinBackend:
    """The backend for a target: Redis directly (``cli_redis.RedisBackend``) when the config's
    ``store.url`` is redis://, rediss:// or unix:// and ``--admin`` was not given; otherwise the
    admin API of a running node (always for ``memory://``, whose pins live in that node)."""
    config = target.config
    if config is not None and not target.admin_explicit and config.store.kind == "redis":
        from affinity_proxy.cli.redis_backend import RedisBackend  # imports redis: keep --help fast

        return RedisBackend(config)
    return AdminApiBackend(target.url, target.token)


def run_backend(config_path: str | None, admin: str | None, token: str | None,
                call: Callable[[PinBackend], Awaitable[T]], errors: Mapping[int, str] | None = None) -> T:
    """Resolve the target, run ``call(backend)`` in a fresh event loop and return its result.

    ``errors`` rewrites the message for given HTTP statuses (``{message}`` is the API's message).
    ConfigError -> exit 2; BackendError -> exit 1."""
    try:
        target = resolve_admin_target(config_path, admin, token)
    except ConfigError as exc:
        raise config_error(exc) from None

    async def go() -> T:
        async with make_backend(target) as backend:
            return await call(backend)

    try:
        return asyncio.run(go())
    except BackendError as exc:
        template = (errors or {}).get(exc.status or 0)
        raise CliError(template.format(message=exc) if template else str(exc)) from None
