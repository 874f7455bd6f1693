"""The ``affinity-proxy`` command line (click group ``main``): ``serve``, ``demo``, ``config check``
and ``check`` live here; ``pins``, ``instances`` and ``reap`` in ``cli_store``.

Thin: commands parse flags, call library code and print. Exit codes: 0 ok, 1 operational error,
2 usage or config error, always with one ``error: ...`` line on stderr. Heavy modules (the server,
the demo) are imported inside their commands so ``--help`` stays fast. Only ``__main__`` imports this.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import click

from affinity_proxy import __version__
from affinity_proxy.cli.admin import TOKEN_ENV, BackendError, get_json, read_config, resolve_config_path
from affinity_proxy.cli.base import EXIT_USAGE, CliError, config_error, emit, json_option
from affinity_proxy.cli.output import dump_yaml, explain_session_check
from affinity_proxy.cli.store import COMMANDS
from affinity_proxy.config import ConfigError

CHECK_TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=3)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="affinity-proxy")
def main() -> None:
    """Session-affinity reverse proxy: cookie pins, consistent hashing and Fly.io fly-replay."""


for _command in COMMANDS:
    main.add_command(_command)


@main.command()
@click.option("--config", "config_path", default=None, metavar="FILE",
              help="Proxy config (default: $AFFINITY_CONFIG, else ./config/proxy.yaml if it exists).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes sharing the listeners.")
@click.option("--exec", "app_command", default=None, metavar="COMMAND",
              help="Start and supervise the app beside the proxy (run by /bin/sh; stops with the proxy).")
def serve(config_path: str | None, workers: int, app_command: str | None) -> None:
    """Run the proxy (main and admin listeners) until SIGTERM or SIGINT; SIGHUP reloads the config."""
    path = resolve_config_path(config_path)
    if path is None:
        raise CliError("--config FILE is required (or set AFFINITY_CONFIG, or create ./config/proxy.yaml)",
                       EXIT_USAGE)
    try:
        config = read_config(path)
        config.require_cookie_secret()
        config.require_admin_token()
    except ConfigError as exc:
        raise config_error(exc) from None
    from affinity_proxy.serve.main import run_serve

    raise SystemExit(run_serve(config, workers, config_path=str(path), app_command=app_command))


@main.command()
@click.option("--instances", "count", type=click.IntRange(min=1), default=3, show_default=True,
              help="Demo app instances to start.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port of the proxy's main listener.")
@click.option("--fly", is_flag=True, help="Also run a local stand-in for Fly's edge (fly-replay mode).")
def demo(count: int, port: int, fly: bool) -> None:
    """Start demo backends and the proxy on the embedded store, then print what to try."""
    from affinity_proxy.devtools.demo.runner import run_demo

    raise SystemExit(run_demo(count, port, fly))


@main.group("config")
def config_group() -> None:
    """Work with proxy config files."""


@config_group.command("check")
@click.argument("file", metavar="FILE")
@json_option
def config_check(file: str, as_json: bool) -> None:
    """Validate FILE and print the effective config with secrets redacted (YAML, or JSON with --json)."""
    try:
        config = read_config(Path(file))
    except ConfigError as exc:
        raise config_error(exc) from None
    doc = config.redacted()
    if as_json:
        emit(doc, True, str)
    else:
        click.echo(f"# {file}: valid\n{dump_yaml(doc)}")
    for requirement in (config.require_cookie_secret, config.require_admin_token):
        try:
            requirement()
        except ConfigError as exc:
            click.echo(f"warning: serve will refuse this config: {' '.join(str(exc).split())}", err=True)


def session_check_url(url: str) -> str:
    """``http://host:8080`` -> ``http://host:8080/_affinity/session-check``; a URL that already ends in
    ``/session-check`` (e.g. the admin listener's) is kept."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise click.BadParameter("expected an http:// or https:// URL", param_hint="URL")
    base = url.split("?", 1)[0].rstrip("/")
    return base if base.endswith("/session-check") else base + "/_affinity/session-check"


def is_admin_session_check(url: str) -> bool:
    """The admin listener's ``/session-check`` (not the main listener's ``/_affinity/session-check``)."""
    return not urlsplit(url).path.endswith("/_affinity/session-check")


async def _fetch_session_check(url: str, user: str | None, cookie: str | None, token: str | None) -> dict[str, Any]:
    params = {"userId": user} if user is not None else {}
    headers = {"Cookie": cookie} if cookie else {}
    if token and is_admin_session_check(url):  # never hand the admin token to a public listener
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession(timeout=CHECK_TIMEOUT) as session:
        return await get_json(session, "GET", url, f"session-check at {url}", params=params, headers=headers)


@main.command()
@click.argument("url")
@click.option("--user", default=None, metavar="ID", help="Explain the routing of this user key (userId).")
@click.option("--cookie", default=None, metavar="COOKIES",
              help="Cookie header to send, e.g. 'fly-instance-id=...' to explain a browser's cookie.")
@click.option("--token", default=None, metavar="TOKEN",
              help=f"Admin bearer token, sent only to an admin listener's /session-check (default: ${TOKEN_ENV}).")
@json_option
def check(url: str, user: str | None, cookie: str | None, token: str | None, as_json: bool) -> None:
    """Ask the proxy at URL how it would route a request (session-check) and explain it in words.

    URL is the main listener (explains your own request; --user works there only with
    session_check.lookup: public) or the admin listener's /session-check (any --user)."""
    endpoint = session_check_url(url)
    token = token or os.environ.get(TOKEN_ENV) or None
    try:
        doc = asyncio.run(_fetch_session_check(endpoint, user, cookie, token))
    except BackendError as exc:
        if exc.status == 403 and exc.code == "lookup_forbidden":
            raise CliError(f"{endpoint} explains only the caller's own request: look {user} up on the admin "
                           f"listener, e.g. affinity-proxy check http://127.0.0.1:9091/session-check --user {user} "
                           "(or set session_check.lookup: public)") from None
        raise CliError(str(exc)) from None
    emit(doc, as_json, lambda: explain_session_check(doc))
