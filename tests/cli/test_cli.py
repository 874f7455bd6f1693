"""The ``affinity-proxy`` CLI against real listeners.

Servers run on 127.0.0.1 port 0 in an event loop on a background thread, so the CLI's own
``asyncio.run`` works unchanged; commands run through click's CliRunner (one subprocess test checks
the real entry point and its one-line stderr).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from affinity_proxy.cli.main import main
from affinity_proxy.cli.output import duration, pin_stats, table
from affinity_proxy.devtools.ports import free_port as _free_port

T = TypeVar("T")

COOKIE_SECRET = "cookie-SECRET-value-0123456789"
ADMIN_TOKEN = "admin-TOKEN-value-9876543210"
CLEAN_ENV = {"AFFINITY_CONFIG": None, "AFFINITY_ADMIN_TOKEN": None}


class LoopThread:
    """An event loop running forever on a daemon thread; ``run`` awaits a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cli-test-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 15.0) -> T:
        async def wrap() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrap() -> T:
            return fn()

        return self.run(wrap())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def config_yaml(instances: list[tuple[str, str]], *, token: str | None = None, admin_listen: str = "127.0.0.1:0",
                extra: str = "") -> str:
    lines = ["listen: 127.0.0.1:0", f"admin_listen: {admin_listen!r}"]
    if token:
        lines += ["admin:", f"  token: {token}"]
    lines.append("instances:")
    lines += [f"  - {{id: {i}, url: {json.dumps(url)}}}" for i, url in instances]
    lines += ["cookie:", f"  secret: {COOKIE_SECRET}", "store:", "  url: memory://", "reaper:", "  grace: 0s"]
    return "\n".join(lines) + "\n" + extra


DEAD = [("a", "http://127.0.0.1:1"), ("b", "http://127.0.0.1:2"), ("c", "http://127.0.0.1:3")]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class AdminListener:
    """Only an admin application over a real ProxyContext (no health checker, so states stay put)."""

    def __init__(self, lt: LoopThread, config_path: Path) -> None:
        from affinity_proxy.admin.api import REAPER, add_admin_routes, token_middleware
        from affinity_proxy.config import load_config
        from affinity_proxy.pins.reaper import Reaper
        from affinity_proxy.proxy.context import CONTEXT
        from affinity_proxy.serve.app import build_context

        self.lt = lt
        config = load_config(config_path, environ={})

        async def start() -> tuple[Any, web.AppRunner, int]:
            ctx = build_context(config)
            app = web.Application(middlewares=[token_middleware(config.admin.token)])
            app[CONTEXT] = ctx
            app[REAPER] = Reaper(ctx.store, ctx.membership.current, grace=config.reaper.grace,
                                 interval=config.reaper.interval)
            add_admin_routes(app)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return ctx, runner, runner.addresses[0][1]

        self.ctx, self.runner, self.port = lt.run(start())
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        async def stop() -> None:
            await self.runner.cleanup()
            await self.ctx.tasks.close()
            await self.ctx.store.close()

        self.lt.run(stop())


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.close()


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./config/proxy.yaml is picked up by accident
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def admin_server(lt: LoopThread, tmp_path: Path) -> Iterator[AdminListener]:
    server = AdminListener(lt, write(tmp_path / "proxy.yaml", config_yaml(DEAD)))
    yield server
    server.close()


@pytest.fixture
def token_server(lt: LoopThread, tmp_path: Path) -> Iterator[tuple[AdminListener, Path]]:
    path = write(tmp_path / "token.yaml", config_yaml(DEAD, token=ADMIN_TOKEN))
    server = AdminListener(lt, path)
    yield server, path
    server.close()


def cli(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env={**CLEAN_ENV, **(env or {})}, catch_exceptions=False)


def ok(*args: str, **kwargs: Any) -> Result:
    result = cli(*args, **kwargs)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# --- help ----------------------------------------------------------------------------------------

COMMANDS = [
    [], ["serve"], ["demo"], ["config"], ["config", "check"], ["check"], ["pins"], ["pins", "list"],
    ["pins", "show"], ["pins", "set"], ["pins", "drop"], ["pins", "stats"], ["instances"], ["instances", "list"],
    ["instances", "drain"], ["instances", "undrain"], ["reap"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "main")
def test_every_command_has_help(command: list[str]) -> None:
    result = ok(*command, "--help")
    assert "Usage:" in result.stdout


STORE_COMMANDS = [c for c in COMMANDS if c[:1] == ["reap"] or (c[:1] in (["pins"], ["instances"]) and len(c) > 1)]


@pytest.mark.parametrize("command", STORE_COMMANDS, ids=lambda c: " ".join(c))
def test_store_commands_take_admin_options_and_json(command: list[str]) -> None:
    text = ok(*command, "--help").stdout
    for option in ("--config", "--admin", "--token", "--json"):
        assert option in text


def test_usage_error_exits_2() -> None:
    assert cli("pins", "show").exit_code == 2
    assert cli("pins", "list", "--admin", "not-a-url").exit_code == 2
    assert cli("nonsense").exit_code == 2


# --- config check --------------------------------------------------------------------------------


def test_config_check_valid_redacts_secrets(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", config_yaml(DEAD, token=ADMIN_TOKEN))
    result = ok("config", "check", str(path))
    assert COOKIE_SECRET not in result.output and ADMIN_TOKEN not in result.output
    assert "valid" in result.stdout.splitlines()[0]
    import yaml

    doc = yaml.safe_load(result.stdout)
    assert doc["cookie"]["secret"] == "***"
    assert doc["admin"]["token"] == "***"
    assert [i["id"] for i in doc["instances"]] == ["a", "b", "c"]

    as_json = json.loads(ok("config", "check", str(path), "--json").stdout)
    assert as_json == doc


def test_config_check_invalid_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", config_yaml(DEAD).replace("cookie:\n", "cookie:\n  same_site: sideways\n"))
    result = cli("config", "check", str(path))
    assert result.exit_code == 2
    assert "cookie.same_site" in one_error_line(result)
    assert result.stdout == ""


def test_config_check_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", config_yaml(DEAD, extra="bogus: 1\n"))
    result = cli("config", "check", str(path))
    assert result.exit_code == 2
    assert "bogus" in one_error_line(result)


def test_config_check_missing_file(tmp_path: Path) -> None:
    result = cli("config", "check", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert "nope.yaml" in one_error_line(result)


def test_config_check_warns_when_serve_would_refuse(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", config_yaml(DEAD).replace(f"  secret: {COOKIE_SECRET}\n", ""))
    result = ok("config", "check", str(path))
    assert "warning:" in result.stderr and "cookie.secret" in result.stderr


def test_serve_refuses_without_secret_and_bad_config(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", config_yaml(DEAD).replace(f"  secret: {COOKIE_SECRET}\n", ""))
    result = cli("serve", "--config", str(path))
    assert result.exit_code == 2
    assert "cookie.secret" in one_error_line(result)
    result = cli("serve", "--config", str(tmp_path / "missing.yaml"))
    assert result.exit_code == 2
    one_error_line(result)
    result = cli("serve")  # no --config, no $AFFINITY_CONFIG, no ./config/proxy.yaml
    assert result.exit_code == 2
    assert "--config" in one_error_line(result)


# --- pins ----------------------------------------------------------------------------------------


def test_pins_round_trip(admin_server: AdminListener) -> None:
    url = admin_server.url
    result = ok("pins", "set", "alice", "b", "--admin", url)
    assert result.stdout.startswith("pinned alice to b (expires in ")
    doc = json.loads(ok("pins", "set", "bob", "a", "--admin", url, "--json").stdout)
    assert doc["user"] == "bob" and doc["instance"] == "a" and doc["expires_in"] > 0
    ok("pins", "set", "carol", "b", "--admin", url)

    shown = json.loads(ok("pins", "show", "alice", "--admin", url, "--json").stdout)
    assert shown["instance"] == "b" and shown["state"] == "up"
    text = ok("pins", "show", "alice", "--admin", url).stdout
    assert "instance  b (up)" in text

    listed = json.loads(ok("pins", "list", "--admin", url, "--json").stdout)
    assert sorted((p["user"], p["instance"]) for p in listed["pins"]) == [("alice", "b"), ("bob", "a"), ("carol", "b")]
    only_b = json.loads(ok("pins", "list", "--instance", "b", "--admin", url, "--json").stdout)
    assert sorted(p["user"] for p in only_b["pins"]) == ["alice", "carol"]
    table_text = ok("pins", "list", "--admin", url).stdout.splitlines()
    assert table_text[0].split() == ["USER", "INSTANCE", "EXPIRES", "IN"]
    assert len(table_text) == 4
    assert len({line.index("INSTANCE") if i == 0 else None for i, line in enumerate(table_text)} - {None}) == 1
    limited = ok("pins", "list", "--limit", "1", "--admin", url)
    assert len(limited.stdout.splitlines()) == 2 and "--limit" in limited.stderr

    stats = json.loads(ok("pins", "stats", "--admin", url, "--json").stdout)
    assert {i["id"]: i["pins"] for i in stats["instances"]} == {"a": 1, "b": 2, "c": 0}
    assert stats["total"] == 3 and stats["mean"] == 1.0 and stats["max"] == 2 and stats["balance"] == 2.0
    stats_text = ok("pins", "stats", "--admin", url).stdout
    assert "balance (max/mean) 2.00" in stats_text and "#" * 30 in stats_text

    assert ok("pins", "drop", "alice", "--admin", url).stdout.strip() == "dropped the pin of alice"
    assert json.loads(ok("pins", "drop", "bob", "--admin", url, "--json").stdout) == {"dropped": True}
    result = cli("pins", "drop", "alice", "--admin", url)
    assert result.exit_code == 1 and "no pin for user alice" in one_error_line(result)


def test_pins_show_unknown_user(admin_server: AdminListener) -> None:
    result = cli("pins", "show", "nobody", "--admin", admin_server.url)
    assert result.exit_code == 1
    assert one_error_line(result) == "error: no pin for user nobody"
    assert result.stdout == ""


def test_pins_set_unknown_instance(admin_server: AdminListener) -> None:
    result = cli("pins", "set", "alice", "zz", "--admin", admin_server.url)
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "cannot pin alice to zz" in line and "instance" in line


def test_user_keys_are_path_escaped(admin_server: AdminListener) -> None:
    ok("pins", "set", "a user@example.com?x=1", "c", "--admin", admin_server.url)
    doc = json.loads(ok("pins", "show", "a user@example.com?x=1", "--admin", admin_server.url, "--json").stdout)
    assert doc["user"] == "a user@example.com?x=1" and doc["instance"] == "c"


# --- instances and reap --------------------------------------------------------------------------


def test_instances_list_drain_undrain(admin_server: AdminListener) -> None:
    url = admin_server.url
    ok("pins", "set", "alice", "a", "--admin", url)
    doc = json.loads(ok("instances", "list", "--admin", url, "--json").stdout)
    assert [(i["id"], i["state"], i["weight"], i["pins"]) for i in doc["instances"]] == [
        ("a", "up", 1, 1), ("b", "up", 1, 0), ("c", "up", 1, 0)]
    lines = ok("instances", "list", "--admin", url).stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "WEIGHT", "PINS", "URL"]
    assert lines[1].split() == ["a", "up", "1", "1", "http://127.0.0.1:1"]

    assert ok("instances", "drain", "b", "--admin", url).stdout.strip() == "b: draining"
    listed = json.loads(ok("instances", "list", "--admin", url, "--json").stdout)["instances"]
    states = {i["id"]: i["state"] for i in listed}
    assert states == {"a": "up", "b": "draining", "c": "up"}
    assert json.loads(ok("instances", "undrain", "b", "--admin", url, "--json").stdout) == {"id": "b", "state": "up"}

    result = cli("instances", "drain", "zz", "--admin", url)
    assert result.exit_code == 1 and "unknown instance zz" in one_error_line(result)


def test_reap_dry_run_then_reap(admin_server: AdminListener, lt: LoopThread) -> None:
    from affinity_proxy.routing.model import InstanceId

    url = admin_server.url
    ok("pins", "set", "carol", "c", "--admin", url)
    ok("pins", "set", "dave", "a", "--admin", url)
    assert ok("reap", "--dry-run", "--admin", url).stdout.strip() == "dry run: nothing to reap"

    lt.call(lambda: admin_server.ctx.membership.set_health(InstanceId("c"), False))
    doc = json.loads(ok("reap", "--dry-run", "--json", "--admin", url).stdout)
    assert doc == {"dry_run": True, "reaped": {"c": ["carol"]}, "total": 1}
    text = ok("reap", "--dry-run", "--admin", url).stdout
    assert "would drop 1 orphaned pin" in text and "c: 1 (carol)" in text
    ok("pins", "show", "carol", "--admin", url)  # a dry run changes nothing

    assert "dropped 1 orphaned pin" in ok("reap", "--admin", url).stdout
    assert cli("pins", "show", "carol", "--admin", url).exit_code == 1
    ok("pins", "show", "dave", "--admin", url)


# --- reaching the admin API ----------------------------------------------------------------------


def test_admin_unreachable() -> None:
    port = _free_port()
    for command in (["pins", "list"], ["pins", "stats"], ["instances", "list"], ["reap", "--dry-run"]):
        result = cli(*command, "--admin", f"http://127.0.0.1:{port}")
        assert result.exit_code == 1
        line = one_error_line(result)
        assert "unreachable" in line and str(port) in line


def test_admin_url_from_config(admin_server: AdminListener, tmp_path: Path) -> None:
    ok("pins", "set", "erin", "a", "--admin", admin_server.url)
    path = write(tmp_path / "wild.yaml", config_yaml(DEAD, admin_listen=f"0.0.0.0:{admin_server.port}"))
    doc = json.loads(ok("pins", "show", "erin", "--config", str(path), "--json").stdout)
    assert doc["instance"] == "a"
    assert ok("pins", "show", "erin", "--json", env={"AFFINITY_CONFIG": str(path)}).exit_code == 0
    (tmp_path / "config").mkdir()
    write(tmp_path / "config" / "proxy.yaml", path.read_text())
    assert ok("pins", "show", "erin", "--json").exit_code == 0  # ./config/proxy.yaml (cwd is tmp_path)


def test_bad_config_for_store_command_exits_2(tmp_path: Path) -> None:
    result = cli("pins", "list", "--config", str(tmp_path / "missing.yaml"))
    assert result.exit_code == 2
    one_error_line(result)


def test_token_required(token_server: tuple[AdminListener, Path]) -> None:
    server, path = token_server
    result = cli("pins", "list", "--admin", server.url)
    assert result.exit_code == 1
    assert "unauthorized" in one_error_line(result)
    assert ADMIN_TOKEN not in result.output

    ok("pins", "set", "frank", "b", "--admin", server.url, "--token", ADMIN_TOKEN)
    assert json.loads(ok("pins", "list", "--admin", server.url, "--json",
                         env={"AFFINITY_ADMIN_TOKEN": ADMIN_TOKEN}).stdout)["pins"][0]["user"] == "frank"
    result = ok("instances", "list", "--admin", server.url, "--config", str(path))  # token from the config
    assert ADMIN_TOKEN not in result.output
    wrong = cli("pins", "list", "--admin", server.url, "--token", "wrong")
    assert wrong.exit_code == 1 and "unauthorized" in one_error_line(wrong) and "wrong" not in wrong.output


def test_subprocess_entry_point_one_line_error() -> None:
    import affinity_proxy

    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(affinity_proxy.__file__).parents[1]),
                                                      env.get("PYTHONPATH")]))
    port = _free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "affinity_proxy", "pins", "list", "--admin", f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert proc.stdout == ""


# --- check ---------------------------------------------------------------------------------------


@pytest.fixture
def proxy(lt: LoopThread, tmp_path: Path) -> Iterator[Any]:
    """A full ProxyServer (main + admin listeners) in front of three live backends."""
    from affinity_proxy.config import load_config
    from affinity_proxy.serve.app import ProxyServer

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def start_backends() -> list[tuple[web.AppRunner, int]]:
        out = []
        for _ in range(3):
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", hello)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            out.append((runner, runner.addresses[0][1]))
        return out

    backends = lt.run(start_backends())

    async def stop_backends() -> None:
        for runner, _ in backends:
            await runner.cleanup()

    try:
        instances = [(name, f"http://127.0.0.1:{port}") for name, (_, port) in zip("abc", backends, strict=True)]
        config = load_config(write(tmp_path / "proxy.yaml", config_yaml(instances)), environ={})

        async def start() -> ProxyServer:
            server = ProxyServer(config)
            await server.start()
            return server

        server = lt.run(start())
        try:
            yield server
        finally:
            lt.run(server.stop())
    finally:
        lt.run(stop_backends())


def test_check_explains_a_pinned_user(proxy: Any) -> None:
    admin = f"http://127.0.0.1:{proxy.admin_port}"
    ok("pins", "set", "alice", "b", "--admin", admin)
    first = ok("check", admin + "/session-check", "--user", "alice").stdout.splitlines()[0]
    assert first.startswith("user alice: pinned to b (stored pin, expires in ")
    assert "; cookie absent; decision: forward to b because pin" in first

    doc = json.loads(ok("check", admin + "/session-check/", "--user", "alice", "--json").stdout)
    assert doc["user_key"] == "alice" and doc["pin"]["instance"] == "b"
    assert doc["decision"]["action"] == "forward" and doc["decision"]["reason"] == "pin"


def test_check_of_another_user_on_the_main_listener_points_to_the_admin_listener(proxy: Any) -> None:
    """session_check.lookup defaults to admin: the public endpoint explains the caller's own request."""
    result = cli("check", f"http://127.0.0.1:{proxy.main_port}", "--user", "alice")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "explains only the caller's own request" in line
    assert "affinity-proxy check http://127.0.0.1:9091/session-check --user alice" in line


def test_check_sends_the_token_to_the_admin_listener_only(lt: LoopThread, tmp_path: Path) -> None:
    """A guarded admin listener needs --token (or $AFFINITY_ADMIN_TOKEN); a main-listener URL never gets it."""
    from affinity_proxy.config import load_config
    from affinity_proxy.serve.app import ProxyServer

    config = load_config(write(tmp_path / "t.yaml", config_yaml(DEAD, token=ADMIN_TOKEN)), environ={})

    async def start() -> ProxyServer:
        server = ProxyServer(config)
        await server.start()
        return server

    server = lt.run(start())
    try:
        endpoint = f"http://127.0.0.1:{server.admin_port}/session-check"
        refused = cli("check", endpoint, "--user", "alice")
        assert refused.exit_code == 1 and ADMIN_TOKEN not in refused.output
        assert ok("check", endpoint, "--user", "alice", "--token", ADMIN_TOKEN).stdout.startswith("user alice: not")
        assert ok("check", endpoint, "--user", "bob", env={"AFFINITY_ADMIN_TOKEN": ADMIN_TOKEN}).exit_code == 0
        from affinity_proxy.cli.main import is_admin_session_check

        assert is_admin_session_check(endpoint)
        assert not is_admin_session_check(f"http://127.0.0.1:{server.main_port}/_affinity/session-check")
    finally:
        lt.run(server.stop())


def test_check_unpinned_and_anonymous(proxy: Any) -> None:
    admin = f"http://127.0.0.1:{proxy.admin_port}/session-check"
    doc = json.loads(ok("check", admin, "--user", "zed", "--json").stdout)
    text = ok("check", admin, "--user", "zed").stdout
    assert text.startswith(f"user zed: not pinned (hash chooses {doc['hash_instance']})")
    assert "instances: a up (0 pins)" in text
    anon = ok("check", f"http://127.0.0.1:{proxy.main_port}").stdout
    assert anon.startswith("anonymous request")
    assert "instances: a up, b up, c up" in anon  # the public answer carries no pin counts


def test_check_with_an_invalid_cookie(proxy: Any) -> None:
    main_url = f"http://127.0.0.1:{proxy.main_port}"
    text = ok("check", main_url, "--cookie", "fly-instance-id=forged").stdout
    assert "cookie invalid (" in text.splitlines()[0]


def test_check_against_the_admin_session_check(admin_server: AdminListener) -> None:
    """A URL that already ends in /session-check (the admin listener's) is used as is."""
    ok("pins", "set", "alice", "c", "--admin", admin_server.url)
    text = ok("check", f"{admin_server.url}/session-check", "--user", "alice").stdout
    first = text.splitlines()[0]
    assert first.startswith("user alice: pinned to c (stored pin, expires in ")
    assert "; cookie absent; decision: forward to c because pin" in first
    assert "instances: a up (0 pins), b up (0 pins), c up (1 pin)" in text


def test_check_unreachable() -> None:
    result = cli("check", f"http://127.0.0.1:{_free_port()}", "--user", "alice")
    assert result.exit_code == 1
    assert "unreachable" in one_error_line(result)
    assert cli("check", "nota-url").exit_code == 2


# --- formatting ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "never"), (-1, "expired"), (0, "0s"), (45, "45s"), (60, "1m"), (10800, "3h"), (10799, "2h59m"),
    (5400, "1h30m"), (90061, "1d1h"), (86400, "1d"),
])
def test_duration(seconds: int | None, text: str) -> None:
    assert duration(seconds) == text


def test_table_aligns_columns() -> None:
    lines = table(("ID", "PINS"), [("a", 1), ("long-name", 1234)], right=(1,)).splitlines()
    assert lines == ["ID         PINS", "a             1", "long-name  1234"]


def test_pin_stats_empty() -> None:
    stats = pin_stats([{"id": "a", "state": "up", "weight": 1, "pins": 0}])
    assert stats["total"] == 0 and stats["balance"] is None and stats["weighted_balance"] is None


def test_pin_stats_weighted() -> None:
    stats = pin_stats([{"id": "a", "state": "up", "weight": 1, "pins": 10},
                       {"id": "b", "state": "up", "weight": 2, "pins": 20},
                       {"id": "c", "state": "draining", "weight": 0, "pins": 0}])
    assert stats["total"] == 30 and stats["mean"] == 10.0 and stats["balance"] == 2.0
    assert stats["weighted_balance"] == 1.0
