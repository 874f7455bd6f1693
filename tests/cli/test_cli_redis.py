"""The pin, instance and reap commands straight on a real Redis (``cli_redis.RedisBackend``).

No proxy runs unless a test starts one: the state nodes would write (heartbeats, drain marks, pins,
the reaper lock) is written with ``RedisPinStore``/``RedisSharedState`` on the same Redis. Commands
run through click's CliRunner on a worker thread (``asyncio.to_thread``) so this test's event loop
keeps serving, plus real subprocesses where the one-line stderr of the entry point matters.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner, Result

from affinity_proxy.cli.main import main
from affinity_proxy.cli.redis_backend import Configured, Snapshot
from affinity_proxy.config import StoreConfig
from affinity_proxy.membership.redis_shared import RedisSharedState
from affinity_proxy.membership.shared import HeartbeatInfo
from affinity_proxy.pins.redis import WINDOWS, RedisPinStore, pin_key
from affinity_proxy.routing.model import InstanceId, InstanceState
from tests.support.backends import Backends, make_config
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

CLEAN_ENV = {"AFFINITY_CONFIG": None, "AFFINITY_ADMIN_TOKEN": None}
COOKIE_SECRET = "cookie-SECRET-value-0123456789"
PASSWORD = "pw-S3CRET-redis"
DEAD = {"a": "http://127.0.0.1:1", "b": "http://127.0.0.1:2", "c": "http://127.0.0.1:3"}

GRID = 1 - 1 / WINDOWS  # the Redis store keeps expiries on a pin_ttl / WINDOWS grid, rounded down


def config_yaml(url: str, *, instances: dict[str, str] | None = None, grace: str = "60s", prefix: str | None = None,
                pin_ttl: str = "1h") -> str:
    lines = ["listen: 127.0.0.1:0", "admin_listen: 127.0.0.1:0", "instances:"]
    lines += [f"  - {{id: {i}, url: {json.dumps(u)}}}" for i, u in (instances or DEAD).items()]
    lines += ["cookie:", f"  secret: {COOKIE_SECRET}", "store:", f"  url: {json.dumps(url)}"]
    if prefix is not None:
        lines.append(f"  key_prefix: {json.dumps(prefix)}")
    lines += [f"pin_ttl: {pin_ttl}", "reaper:", f"  grace: {grace}", "  interval: 5s"]
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)


def write_config(tmp_path: Path, url: str, name: str = "proxy.yaml", **kwargs: Any) -> str:
    path = tmp_path / name
    path.write_text(config_yaml(url, **kwargs))
    return str(path)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=dict(CLEAN_ENV), catch_exceptions=False)


async def cli(*args: str) -> Result:
    """Run a command on a worker thread: its own ``asyncio.run`` does not touch this loop."""
    return await asyncio.to_thread(invoke, *args)


async def ok(*args: str) -> Result:
    result = await cli(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


async def ok_json(*args: str) -> Any:
    return json.loads((await ok(*args, "--json")).stdout)


def one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


class State:
    """What nodes would write: a pin store and shared state on the test's Redis."""

    def __init__(self, url: str, prefix: str = "affinity:") -> None:
        self.store = RedisPinStore(url, key_prefix=prefix, pin_ttl=3600, timeout=2.0)
        self.shared = RedisSharedState(self.store)

    async def report(self, node: str, states: dict[str, str], *, region: str = "", ttl: float = 30.0,
                     seen_at: float | None = None) -> None:
        now = time.time() if seen_at is None else seen_at
        await self.shared.publish_heartbeat(node, {
            InstanceId(i): HeartbeatInfo(s, f"http://{i}.internal:8080", region, node, now)  # type: ignore[arg-type]
            for i, s in states.items()}, ttl)

    async def pins(self) -> dict[str, str]:
        return {p.user_key: p.instance for p in await self.store.list(limit=10_000)}

    async def close(self) -> None:
        await self.store.close()


@pytest.fixture
async def state(redis_url: str) -> AsyncIterator[State]:
    s = State(redis_url)
    yield s
    await s.close()


@pytest.fixture
def conf(tmp_path: Path, redis_url: str) -> str:
    return write_config(tmp_path, redis_url)


# --- pins ----------------------------------------------------------------------------------------


async def test_pins_round_trip(conf: str, state: State) -> None:
    result = await ok("pins", "set", "alice", "b", "--config", conf)
    assert result.stdout.startswith("pinned alice to b (expires in ")
    doc = await ok_json("pins", "set", "bob", "a", "--config", conf)
    assert doc["user"] == "bob" and doc["instance"] == "a" and 3600 * GRID - 10 < doc["expires_in"] <= 3600
    await ok("pins", "set", "carol", "b", "--config", conf)

    shown = await ok_json("pins", "show", "alice", "--config", conf)
    assert shown["user"] == "alice" and shown["instance"] == "b" and shown["expires_in"] > 3600 * GRID - 10
    assert shown["state"] == "unknown"  # configured, but no node reports on it
    text = (await ok("pins", "show", "alice", "--config", conf)).stdout
    assert "instance  b (unknown)" in text and ("expires   in 59m" in text or "expires   in 58m" in text)  # GRID

    listed = await ok_json("pins", "list", "--config", conf)
    assert sorted((p["user"], p["instance"]) for p in listed["pins"]) == [("alice", "b"), ("bob", "a"), ("carol", "b")]
    assert set(listed["pins"][0]) == {"user", "instance", "expires_in"}
    only_b = await ok_json("pins", "list", "--instance", "b", "--config", conf)
    assert sorted(p["user"] for p in only_b["pins"]) == ["alice", "carol"]
    lines = (await ok("pins", "list", "--config", conf)).stdout.splitlines()
    assert lines[0].split() == ["USER", "INSTANCE", "EXPIRES", "IN"] and len(lines) == 4
    limited = await ok("pins", "list", "--limit", "1", "--config", conf)
    assert len(limited.stdout.splitlines()) == 2 and "--limit" in limited.stderr
    bad = await cli("pins", "list", "--instance", "no/such", "--config", conf)
    assert bad.exit_code == 1 and "not a valid instance id" in one_error_line(bad)

    stats = await ok_json("pins", "stats", "--config", conf)
    assert {i["id"]: i["pins"] for i in stats["instances"]} == {"a": 1, "b": 2, "c": 0}
    assert stats["total"] == 3 and stats["max"] == 2 and stats["balance"] == 2.0
    assert "balance (max/mean) 2.00" in (await ok("pins", "stats", "--config", conf)).stdout

    assert (await ok("pins", "drop", "alice", "--config", conf)).stdout.strip() == "dropped the pin of alice"
    assert await ok_json("pins", "drop", "bob", "--config", conf) == {"dropped": True}
    again = await cli("pins", "drop", "alice", "--config", conf)
    assert again.exit_code == 1 and one_error_line(again) == "error: no pin for user alice"
    missing = await cli("pins", "show", "nobody", "--config", conf)
    assert missing.exit_code == 1 and one_error_line(missing) == "error: no pin for user nobody"
    assert missing.stdout == ""
    assert await state.pins() == {"carol": "b"}


async def test_cli_pins_and_store_pins_are_the_same_pins(tmp_path: Path, redis_url: str) -> None:
    """Key prefix and TTL come from the config: a RedisPinStore with that prefix sees the CLI's pins
    and the CLI sees the store's; another prefix sees nothing."""
    conf = write_config(tmp_path, redis_url, prefix="team1:", pin_ttl="2h")
    mine, other = State(redis_url, "team1:"), State(redis_url)
    try:
        await ok("pins", "set", "user@example.com", "c", "--config", conf)
        pin = await mine.store.get("user@example.com")
        assert pin is not None and pin.instance == "c" and pin.expires_in is not None
        assert 7200 * GRID - 10 < pin.expires_in <= 7200
        assert await other.store.get("user@example.com") is None

        await mine.store.set("dave", InstanceId("a"))
        shown = await ok_json("pins", "show", "dave", "--config", conf)
        assert shown["instance"] == "a"
        await mine.store.set("dave", InstanceId("b"))  # a node re-pins: the CLI sees the new pin
        assert (await ok_json("pins", "show", "dave", "--config", conf))["instance"] == "b"
        assert (await mine.store.counts()) == {"b": 1, "c": 1}
    finally:
        await mine.close()
        await other.close()


async def test_pins_set_only_to_known_instances(conf: str, state: State) -> None:
    result = await cli("pins", "set", "alice", "zz", "--config", conf)
    assert result.exit_code == 1
    assert one_error_line(result) == "error: cannot pin alice to zz: instance: must name a known instance"
    assert await state.pins() == {}
    bad_user = await cli("pins", "set", "x" * 300, "a", "--config", conf)
    assert bad_user.exit_code == 1 and "printable characters" in one_error_line(bad_user)

    await state.report("n1", {"m-reported": "up"})  # known from a node's heartbeat
    await ok("pins", "set", "alice", "m-reported", "--config", conf)
    await state.store.set("legacy-user", InstanceId("m-pinned"))  # known because it has pins
    await ok("pins", "set", "bob", "m-pinned", "--config", conf)
    await state.shared.drain(InstanceId("m-drained"))  # a drain mark alone is not enough to pin to
    assert (await cli("pins", "set", "carol", "m-drained", "--config", conf)).exit_code == 1
    assert await state.pins() == {"alice": "m-reported", "bob": "m-pinned", "legacy-user": "m-pinned"}


async def test_unix_socket_store(tmp_path: Path, private_redis: RedisServer) -> None:
    conf = write_config(tmp_path, private_redis.unix_url)
    await ok("pins", "set", "alice", "a", "--config", conf)
    assert (await ok_json("pins", "show", "alice", "--config", conf))["instance"] == "a"
    with private_redis.client() as client:
        assert client.get(pin_key("affinity:", "alice")) == "a"


# --- instances -----------------------------------------------------------------------------------


async def test_drain_and_undrain_write_the_shared_set(conf: str, state: State) -> None:
    await state.report("n1", {"a": "up", "b": "up", "c": "up"})
    assert (await ok("instances", "drain", "b", "--config", conf)).stdout.strip() == "b: draining"
    assert await state.shared.drained() == {"b"}
    assert await ok_json("instances", "drain", "c", "--config", conf) == {"id": "c", "state": "draining"}
    assert await state.shared.drained() == {"b", "c"}
    # the nodes have not applied the undrain yet (their reports still say draining): shown as up
    await state.report("n1", {"b": "draining"})
    assert await ok_json("instances", "undrain", "b", "--config", conf) == {"id": "b", "state": "up"}
    assert await state.shared.drained() == {"c"}

    unknown = await cli("instances", "drain", "zz", "--config", conf)
    assert unknown.exit_code == 1 and one_error_line(unknown) == "error: unknown instance zz"
    assert (await cli("instances", "undrain", "zz", "--config", conf)).exit_code == 1
    assert await state.shared.drained() == {"c"}

    await state.shared.drain(InstanceId("old-machine"))  # a stale mark can always be lifted
    assert await ok_json("instances", "undrain", "old-machine", "--config", conf) == {
        "id": "old-machine", "state": "gone"}
    assert await state.shared.drained() == {"c"}


async def test_instances_list_merges_config_heartbeats_drain_and_pins(conf: str, state: State) -> None:
    await state.report("n1", {"a": "up", "m-fly": "up"}, region="ams")
    await state.report("n2", {"a": "down", "c": "down"})
    await state.shared.drain(InstanceId("b"))
    await state.store.set("u1", InstanceId("a"))
    await state.store.set("u2", InstanceId("a"))
    await state.store.set("u3", InstanceId("m-fly"))
    await state.store.set("u4", InstanceId("m-gone"))

    doc = await ok_json("instances", "list", "--config", conf)
    assert doc["reports_available"] is True
    rows = {i["id"]: i for i in doc["instances"]}
    assert [i["id"] for i in doc["instances"]] == ["a", "b", "c", "m-fly", "m-gone"]  # configured first
    assert {k: (v["state"], v["pins"]) for k, v in rows.items()} == {
        "a": ("up", 2),  # one node reaching it proves it alive
        "b": ("draining", 0),
        "c": ("down", 0),
        "m-fly": ("up", 1),
        "m-gone": ("gone", 1),  # only pins: nobody knows it (the reaper's business)
    }
    assert rows["a"]["url"] == DEAD["a"] and rows["a"]["weight"] == 1
    assert rows["m-fly"]["url"] == "http://m-fly.internal:8080" and rows["m-fly"]["region"] == "ams"
    assert [(r["node"], r["state"]) for r in rows["a"]["reports"]] == [("n1", "up"), ("n2", "down")]
    assert all(0 <= r["age_seconds"] < 30 for r in rows["a"]["reports"])
    assert rows["m-gone"]["reports"] == [] and rows["m-gone"]["url"] == ""
    assert set(rows["a"]) == {"id", "url", "state", "weight", "pins", "sessions", "local", "region", "reports"}

    lines = (await ok("instances", "list", "--config", conf)).stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "WEIGHT", "PINS", "URL"]
    assert lines[1].split() == ["a", "up", "1", "2", DEAD["a"]]
    assert lines[5].split() == ["m-gone", "gone", "1", "1", "-"]

    await state.shared.drain(InstanceId("c"))  # drained but down: down (as on the nodes)
    rows = {i["id"]: i for i in (await ok_json("instances", "list", "--config", conf))["instances"]}
    assert rows["c"]["state"] == "down"


async def test_instances_list_without_any_node(conf: str) -> None:
    doc = await ok_json("instances", "list", "--config", conf)
    assert [(i["id"], i["state"], i["pins"]) for i in doc["instances"]] == [
        ("a", "unknown", 0), ("b", "unknown", 0), ("c", "unknown", 0)]


# --- reap ----------------------------------------------------------------------------------------


async def _orphans(state: State) -> None:
    """Pins on configured a, reported m-x, drained-only m-d (kept) and unknown g1, g2 (reaped)."""
    await state.report("n1", {"a": "up", "m-x": "up"})
    await state.shared.drain(InstanceId("m-d"))
    for user, instance in [("k1", "a"), ("k2", "m-x"), ("k3", "m-d"), ("o1", "g1"), ("o2", "g1"), ("o3", "g1"),
                           ("o4", "g2"), ("o5", "g2")]:
        await state.store.set(user, InstanceId(instance))


async def test_reap_dry_run_then_reap(conf: str, state: State) -> None:
    assert (await ok("reap", "--dry-run", "--config", conf)).stdout.strip() == "dry run: nothing to reap"
    await _orphans(state)
    before = await state.pins()

    doc = await ok_json("reap", "--dry-run", "--config", conf)
    assert doc == {"dry_run": True, "reaped": {"g1": ["o1", "o2", "o3"], "g2": ["o4", "o5"]}, "total": 5}
    text = (await ok("reap", "--dry-run", "--config", conf)).stdout
    assert "dry run: would drop 5 orphaned pins" in text and "g1: 3 (o1, o2, o3)" in text
    assert await state.pins() == before  # a dry run changes nothing
    probe = await state.shared.acquire_lock("reaper", 5)
    assert probe is not None  # ... and took no lock
    assert await state.shared.release_lock("reaper", probe)

    doc = await ok_json("reap", "--config", conf)
    assert doc["dry_run"] is False and doc["total"] == 5
    assert {k: sorted(v) for k, v in doc["reaped"].items()} == {"g1": ["o1", "o2", "o3"], "g2": ["o4", "o5"]}
    assert await state.pins() == {"k1": "a", "k2": "m-x", "k3": "m-d"}
    assert await state.store.counts() == {"a": 1, "m-x": 1, "m-d": 1}
    assert (await ok("reap", "--config", conf)).stdout.strip() == "nothing to reap"
    token = await state.shared.acquire_lock("reaper", 5)  # the CLI released its lock
    assert token is not None
    await state.shared.release_lock("reaper", token)


async def test_reap_down_instances_only_without_grace(tmp_path: Path, redis_url: str, state: State) -> None:
    await state.report("n1", {"a": "up", "c": "down"})
    await state.store.set("u1", InstanceId("c"))
    await state.store.set("u2", InstanceId("a"))
    with_grace = write_config(tmp_path, redis_url, name="grace.yaml", grace="60s")
    assert (await ok_json("reap", "--dry-run", "--config", with_grace))["total"] == 0
    assert (await ok_json("reap", "--config", with_grace))["total"] == 0
    no_grace = write_config(tmp_path, redis_url, name="nograce.yaml", grace="0s")
    assert await ok_json("reap", "--config", no_grace) == {"dry_run": False, "reaped": {"c": ["u1"]}, "total": 1}
    assert await state.pins() == {"u2": "a"}


async def test_reap_refuses_while_another_reaper_holds_the_lock(conf: str, state: State) -> None:
    await _orphans(state)
    token = await state.shared.acquire_lock("reaper", 30)
    assert token is not None
    result = await cli("reap", "--config", conf)
    assert result.exit_code == 1 and result.stdout == ""
    assert "another reaper is running" in one_error_line(result)
    assert len(await state.pins()) == 8  # nothing was reaped
    assert (await ok_json("reap", "--dry-run", "--config", conf))["total"] == 5  # dry runs take no lock
    assert await state.shared.release_lock("reaper", token)  # the CLI did not touch the holder's lock

    assert (await ok_json("reap", "--config", conf))["total"] == 5


async def test_reap_runs_exactly_once_when_raced(conf: str, state: State) -> None:
    """Several CLI reapers at once: every orphan is reaped by exactly one of them (the others find
    the lock held or nothing left to do)."""
    await _orphans(state)

    async def reaper() -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "affinity_proxy", "reap", "--json", "--config", conf,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_subprocess_env())
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    results = await asyncio.gather(*(reaper() for _ in range(4)))
    reaped = [u for code, out, _ in results if code == 0 for users in json.loads(out)["reaped"].values()
              for u in users]
    assert sorted(reaped) == ["o1", "o2", "o3", "o4", "o5"]
    for code, out, err in results:
        assert code == 0 or (code == 1 and out == "" and err.startswith("error: another reaper is running")
                             and err.count("\n") == 1), err


# --- choosing the backend ------------------------------------------------------------------------


async def test_explicit_admin_url_wins_over_redis(conf: str, state: State) -> None:
    from tests.support.redis_server import free_port

    port = free_port()
    result = await cli("pins", "list", "--config", conf, "--admin", f"http://127.0.0.1:{port}")
    assert result.exit_code == 1
    assert "admin API" in one_error_line(result) and str(port) in result.stderr


def test_make_backend_chooses_redis_unless_admin_is_given(tmp_path: Path, redis_url: str) -> None:
    from affinity_proxy.cli.admin import AdminApiBackend, resolve_admin_target
    from affinity_proxy.cli.base import make_backend
    from affinity_proxy.cli.redis_backend import RedisBackend

    conf = write_config(tmp_path, redis_url)
    assert isinstance(make_backend(resolve_admin_target(conf, None, None)), RedisBackend)
    assert isinstance(make_backend(resolve_admin_target(conf, "http://127.0.0.1:9", None)), AdminApiBackend)
    memory = write_config(tmp_path, "memory://", name="memory.yaml")
    assert isinstance(make_backend(resolve_admin_target(memory, None, None)), AdminApiBackend)
    assert isinstance(make_backend(resolve_admin_target(None, None, None)), AdminApiBackend)  # no config at all
    rediss = write_config(tmp_path, f"rediss://:{PASSWORD}@example.invalid:6380/2", name="tls.yaml")
    backend = make_backend(resolve_admin_target(rediss, None, None))
    assert isinstance(backend, RedisBackend) and backend.where == "rediss://example.invalid:6380"
    assert PASSWORD not in repr(resolve_admin_target(rediss, None, None))


async def test_config_from_environment_reaches_redis(conf: str, state: State) -> None:
    await state.store.set("erin", InstanceId("a"))

    def run() -> Result:
        return CliRunner().invoke(main, ["pins", "show", "erin", "--json"], env={"AFFINITY_CONFIG": conf})

    result = await asyncio.to_thread(run)
    assert result.exit_code == 0 and json.loads(result.stdout)["instance"] == "a"


# --- Redis unavailable ---------------------------------------------------------------------------


@pytest.fixture
def locked_redis(private_redis: RedisServer) -> Iterator[RedisServer]:
    """The private Redis with ``requirepass``: URLs must carry the password."""
    with private_redis.client() as client:
        client.config_set("requirepass", PASSWORD)
    yield private_redis


STORE_COMMANDS = [["pins", "list"], ["pins", "show", "alice"], ["pins", "set", "alice", "a"], ["pins", "drop", "alice"],
                  ["pins", "stats"], ["instances", "list"], ["instances", "drain", "a"], ["instances", "undrain", "a"],
                  ["reap"], ["reap", "--dry-run"]]


async def test_redis_down_is_one_line_without_the_password(tmp_path: Path, locked_redis: RedisServer) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    conf = write_config(tmp_path, url)
    await ok("pins", "set", "alice", "a", "--config", conf)  # the password works
    assert (await ok_json("pins", "show", "alice", "--config", conf))["instance"] == "a"

    await asyncio.to_thread(locked_redis.stop)
    for command in STORE_COMMANDS:
        result = await cli(*command, "--config", conf)
        assert result.exit_code == 1, command
        line = one_error_line(result)
        assert line.startswith(f"error: redis at redis://127.0.0.1:{locked_redis.port} is unavailable ("), line
        assert PASSWORD not in result.output and result.stdout == ""


async def test_wrong_password_is_one_line_without_it(tmp_path: Path, locked_redis: RedisServer) -> None:
    wrong = "not-the-" + PASSWORD
    conf = write_config(tmp_path, f"redis://user:{wrong}@127.0.0.1:{locked_redis.port}/0")
    result = await cli("pins", "list", "--config", conf)
    assert result.exit_code == 1
    line = one_error_line(result)
    assert f"redis at redis://127.0.0.1:{locked_redis.port}" in line
    assert wrong not in result.output and PASSWORD not in result.output


def _subprocess_env() -> dict[str, str]:
    import affinity_proxy

    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(affinity_proxy.__file__).parents[1]),
                                                      env.get("PYTHONPATH")]))
    return env


def test_entry_point_redis_down_prints_exactly_one_line(tmp_path: Path, private_redis: RedisServer) -> None:
    """The real process: no log lines from the store's outage handling, just the error."""
    conf = write_config(tmp_path, f"redis://:{PASSWORD}@127.0.0.1:{private_redis.port}/0")
    private_redis.stop()
    for command in (["pins", "list"], ["instances", "list"], ["reap"]):
        proc = subprocess.run([sys.executable, "-m", "affinity_proxy", *command, "--config", conf],
                              capture_output=True, text=True, timeout=60, env=_subprocess_env())
        assert proc.returncode == 1
        assert proc.stderr == f"error: redis at redis://127.0.0.1:{private_redis.port} is unavailable " \
                              "(Connection refused)\n", proc.stderr
        assert proc.stdout == ""


def test_entry_point_round_trip(tmp_path: Path, redis_url: str) -> None:
    conf = write_config(tmp_path, redis_url)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "affinity_proxy", *args, "--config", conf],
                              capture_output=True, text=True, timeout=60, env=_subprocess_env())

    assert run("pins", "set", "zoe", "c").returncode == 0
    shown = run("pins", "show", "zoe", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["instance"] == "c" and shown.stderr == ""


# --- state rules (pure) --------------------------------------------------------------------------


def _snapshot(reports: dict[str, list[tuple[str, float]]], drained: set[str], counts: dict[str, int],
              now: float = 1000.0) -> Snapshot:
    configured = {i: Configured(i, u, 1) for i, u in DEAD.items()}
    hb = {InstanceId(i): [HeartbeatInfo(s, "", "", f"n{k}", t) for k, (s, t) in enumerate(items)]  # type: ignore[arg-type]
          for i, items in reports.items()}
    return Snapshot.build(configured, hb, {InstanceId(d) for d in drained},
                          {InstanceId(k): v for k, v in counts.items()}, now)


@pytest.mark.parametrize(("reports", "drained", "expected"), [
    ([], False, "unknown"),
    ([("up", 999.0)], False, "up"),
    ([("up", 999.0)], True, "draining"),
    ([("draining", 999.0)], False, "up"),
    ([], True, "draining"),
    ([("down", 999.0)], True, "down"),
    ([("stopped", 999.0)], True, "stopped"),
    ([("up", 900.0)], False, "down"),  # only a stale report
    ([("down", 999.0), ("up", 999.0)], False, "up"),
])
def test_state_of_a_configured_instance(reports: list[tuple[str, float]], drained: bool, expected: str) -> None:
    snap = _snapshot({"a": reports} if reports else {}, {"a"} if drained else set(), {})
    assert snap.state("a") == expected


def test_state_and_due_of_unconfigured_instances() -> None:
    snap = _snapshot({"m-up": [("up", 999.0)], "m-down": [("down", 999.0)], "m-stopped": [("stopped", 999.0)]},
                     {"m-drained", "m-mark"},
                     {"m-up": 1, "m-down": 2, "m-stopped": 1, "m-drained": 1, "m-gone": 3, "a": 1, "m-empty": 0})
    assert snap.state("m-gone") == "gone" and snap.state("m-drained") == "draining"
    assert snap.state("m-down") == "down" and snap.state("m-stopped") == "stopped"
    assert snap.due(60.0) == ["m-gone"]
    assert snap.due(0.0) == ["m-down", "m-gone"]  # stopped is never reaped
    assert snap.ids() == ["a", "b", "c", "m-down", "m-drained", "m-gone", "m-mark", "m-stopped", "m-up"]
    assert snap.pinnable("m-up") and snap.pinnable("m-gone") and snap.pinnable("b")
    assert not snap.pinnable("m-mark") and snap.known("m-mark")  # a bare drain mark: drain yes, pin no
    assert not snap.known("m-empty") and not snap.pinnable("m-empty")
    assert InstanceState.GONE.value == "gone"


# --- end to end: a real proxy obeys the CLI ------------------------------------------------------


async def test_proxy_obeys_pins_and_drains_set_by_the_cli(tmp_path: Path, redis_url: str,
                                                          backends: Backends) -> None:
    from affinity_proxy.serve.app import ProxyServer

    config = make_config(backends, store=StoreConfig(url=redis_url, timeout=0.25))
    server = ProxyServer(config)
    await server.start()
    conf = write_config(tmp_path, redis_url, instances={i: f"http://127.0.0.1:{p}" for i, p in backends.ports.items()})
    base = f"http://127.0.0.1:{server.main_port}"
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            async def served(user: str) -> str:
                async with http.get(base + "/", headers={"X-User-Id": user}) as resp:
                    assert resp.status == 200
                    return str((await resp.json())["instance"])

            first = await served("mallory")  # the proxy pins the user to its hash choice
            target = next(i for i in ("a", "b", "c") if i != first)
            await ok("pins", "set", "mallory", target, "--config", conf)
            assert [await served("mallory") for _ in range(5)] == [target] * 5

            await ok("pins", "set", "newbie", "c", "--config", conf)  # pinned before the first request
            assert await served("newbie") == "c"
            assert (await ok_json("pins", "show", "mallory", "--config", conf))["state"] == "up"

            # the node's heartbeats make the CLI see its instances as up
            rows = (await ok_json("instances", "list", "--config", conf))["instances"]
            assert {i["id"]: i["state"] for i in rows} == {"a": "up", "b": "up", "c": "up"}

            await ok("instances", "drain", "c", "--config", conf)
            await wait_until(lambda: server.ctx.membership.current().state_of("c") is InstanceState.DRAINING,
                             timeout=5, message="the node applies the CLI's drain mark")
            assert await served("newbie") == "c"  # pinned users stay
            fresh = {await served(f"fresh{i}") for i in range(30)}
            assert "c" not in fresh  # new users go elsewhere
            await ok("instances", "undrain", "c", "--config", conf)
            await wait_until(lambda: server.ctx.membership.current().state_of("c") is InstanceState.UP, timeout=5)
    finally:
        await server.stop()
