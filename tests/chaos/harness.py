"""Chaos under load: steady HTTP and WebSocket traffic against real proxy nodes while faults are injected.

Everything is real and on 127.0.0.1: demo backends (aiohttp), ``ProxyServer`` nodes sharing one real
``redis-server``, and aiohttp clients. The pieces:

- ``ChaosCluster``: backends ``a``, ``b``, ``c``, a private redis-server and N proxy nodes.
- ``Traffic``: client loops, each bounded by a stop event and a hard deadline:
  cookie clients (keep their affinity cookie), user-key clients (``X-User-Id``), anonymous clients
  (a fresh session every request) and long-lived WebSocket clients (``whoami`` every few 100 ms,
  reconnecting with their cookie jar when the socket dies). Every request is a ``Record``: when it
  was sent and finished, client, class, the instance it was pinned to before, the instance that
  answered, status/error, and whether the client changed instance (re-pin).
- Faults (``FAULTS``): ``kill`` (the instance dies: its port closes and every open connection,
  WebSockets included, is cut at once; then it restarts on the same port), ``redis`` (stop
  redis-server, restart it), ``hang`` (stop the instance and listen on its port with a server that
  accepts and never answers, then restore it), ``flap`` (the instance's health check alternates
  failing and passing while it keeps serving).
- ``run_fault`` runs warm-up, fault, restore and an after period and returns a ``FaultReport``:
  requests sent, failed (split by whether the client's instance was the faulted one), re-pinned,
  time to detect, time to recover, and the violations of the chaos requirements:

  1. no failure for a request whose (pinned) instance stayed alive;
  2. failures of the faulted instance only for requests in flight at the fault or sent before every
     node had detected it (kill/hang); none at all for flap and Redis faults;
  3. no client pinned to a live instance changes instance;
  4. during a Redis outage cookie clients see zero errors.

Run the long version with ``python -m tests.chaos --long`` (writes tests/chaos/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie

import aiohttp

from affinity_proxy.config import CookieConfig, HealthConfig, LimitsConfig, StoreConfig
from affinity_proxy.serve.app import ProxyServer
from tests.support.backends import Backends, make_config
from tests.support.redis_server import RedisServer

COOKIE = "fly-instance-id"
INSTANCES = ("a", "b", "c")
CLASSES = ("cookie", "user", "anon", "ws")
#: Every wait in here is bounded by one of these.
REQUEST_TIMEOUT = 10.0
WS_RECEIVE_TIMEOUT = 5.0
UPSTREAM_TIMEOUT = 1.0
#: Cookies older than this are checked against the stored pin: short, so that cookie clients take
#: that path (a store call) during every fault, the Redis outage included.
COOKIE_REVALIDATE_AFTER = 2.0
#: How much longer than ``Profile.after`` traffic may run while waiting for every client to recover.
RECOVERY_GRACE = 10.0


@dataclass(frozen=True, slots=True)
class Profile:
    """How much traffic, and for how long each phase of a fault lasts (seconds)."""

    name: str
    cookie: int = 6
    user: int = 6
    anon: int = 3
    ws: int = 3
    interval: float = 0.03  # pause between two requests of one HTTP client
    ws_interval: float = 0.2  # pause between two whoami of one WebSocket client
    warmup: float = 1.0
    fault: float = 4.0
    after: float = 2.0
    flap_period: float = 0.8  # seconds failing, then seconds passing, repeated during the fault
    nodes: int = 2

    @property
    def clients(self) -> int:
        return self.cookie + self.user + self.anon + self.ws


SHORT = Profile("short")
LONG = Profile("long", cookie=16, user=16, anon=6, ws=8, interval=0.05, ws_interval=0.25,
               warmup=5.0, fault=60.0, after=10.0)


@dataclass(slots=True)
class Record:
    sent: float  # seconds since the traffic started
    done: float
    client: str
    kind: str  # cookie | user | anon | ws
    pinned: str | None  # the instance the client was on before this request (None: anonymous/unknown)
    instance: str | None  # who answered (None on failure)
    status: int | None
    error: str | None
    repinned: bool
    opened: float | None = None  # WebSocket messages: when their socket was opened

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency(self) -> float:
        return self.done - self.sent


class ChaosCluster:
    """Backends a, b, c + a private redis-server + ``nodes`` proxy nodes sharing it."""

    def __init__(self, nodes: int = 2, *, redis: RedisServer | None = None, health_interval: float = 0.3) -> None:
        self.node_count = nodes
        self.backends = Backends()
        self._own_redis = redis is None
        self.redis = redis or RedisServer()
        self.nodes: list[ProxyServer] = []
        self.health_interval = health_interval

    async def __aenter__(self) -> ChaosCluster:
        try:
            if not self.redis.running:
                await asyncio.to_thread(self.redis.start)
            for name in INSTANCES:
                await self.backends.start(name)
            config = make_config(
                self.backends,
                store=StoreConfig(url=self.redis.url, timeout=0.25),
                cookie=CookieConfig(secret="chaos-secret-" + "x" * 20, revalidate_after=COOKIE_REVALIDATE_AFTER),
                health=HealthConfig(interval=self.health_interval, timeout=0.3, unhealthy_after=1, healthy_after=1),
                limits=LimitsConfig(upstream_timeout=UPSTREAM_TIMEOUT, upstream_connect_timeout=1.0),
            )
            for _ in range(self.node_count):
                server = ProxyServer(config)
                await server.start()
                self.nodes.append(server)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for server in self.nodes:
            await server.stop()
        self.nodes.clear()
        await self.backends.close()
        if self._own_redis:
            await asyncio.to_thread(self.redis.close)

    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{s.main_port}" for s in self.nodes]

    def state(self, node: int, instance: str) -> str:
        return self.nodes[node].ctx.membership.current().state_of(instance).value

    def backend_url(self, instance: str) -> str:
        return f"http://127.0.0.1:{self.backends.ports[instance]}"


def _cookie_from(resp: aiohttp.ClientResponse) -> str | None:
    for header in resp.headers.getall("Set-Cookie", []):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        if COOKIE in jar:
            return jar[COOKIE].value
    return None


class Traffic:
    """Steady traffic from every client class against the cluster's nodes (round robin per client)."""

    def __init__(self, urls: list[str], profile: Profile, *, deadline: float) -> None:
        self.urls = urls
        self.profile = profile
        self.records: list[Record] = []
        self.pins: dict[str, str | None] = {}  # client -> instance it is on now
        self.kinds: dict[str, str] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._t0 = time.monotonic()
        self._deadline = deadline  # absolute monotonic time after which every loop ends anyway
        self._session: aiohttp.ClientSession | None = None
        self._ws_sessions: list[aiohttp.ClientSession] = []

    def now(self) -> float:
        return time.monotonic() - self._t0

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        )
        p = self.profile
        cookies: dict[str, str] = {}
        for i in range(p.cookie):  # first visit: the proxy places the client and sets its cookie
            name = f"cookie{i}"
            async with self._session.get(self.urls[i % len(self.urls)] + "/") as resp:
                assert resp.status == 200, resp.status
                cookies[name] = _cookie_from(resp) or ""
                self.pins[name] = (await resp.json())["instance"]
        for i in range(p.user):
            name = f"user{i}"
            async with self._session.get(self.urls[i % len(self.urls)] + "/", headers={"X-User-Id": name}) as resp:
                assert resp.status == 200, resp.status
                self.pins[name] = (await resp.json())["instance"]
        loops = [self._cookie_loop(n, c) for n, c in cookies.items()]
        loops += [self._user_loop(f"user{i}", i) for i in range(p.user)]
        loops += [self._anon_loop(f"anon{i}", i) for i in range(p.anon)]
        loops += [self._ws_loop(f"ws{i}", i) for i in range(p.ws)]
        for name in cookies:
            self.kinds[name] = "cookie"
        for i in range(p.user):
            self.kinds[f"user{i}"] = "user"
        for i in range(p.anon):
            self.kinds[f"anon{i}"] = "anon"
        for i in range(p.ws):
            self.kinds[f"ws{i}"] = "ws"
        self._tasks = [asyncio.ensure_future(loop) for loop in loops]

    async def stop(self) -> None:
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(*self._tasks), timeout=REQUEST_TIMEOUT + WS_RECEIVE_TIMEOUT + 5)
        finally:
            for session in [*self._ws_sessions, self._session]:
                if session is not None:
                    await session.close()

    async def ws_ready(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - polling deadline
        """Wait until every WebSocket client has had one answer (so it is pinned)."""
        deadline = time.monotonic() + timeout
        while any(self.pins.get(f"ws{i}") is None for i in range(self.profile.ws)):
            if time.monotonic() > deadline:
                raise AssertionError(f"WebSocket clients not connected: {self.pins}")
            await asyncio.sleep(0.02)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    async def _http(self, name: str, kind: str, url: str, headers: dict[str, str]) -> str | None:
        """One GET, recorded; returns the affinity cookie the response set, if any."""
        assert self._session is not None
        pinned = self.pins.get(name)
        sent = self.now()
        status = instance = error = None
        new_cookie = None
        try:
            async with self._session.get(url, headers=headers) as resp:
                status = resp.status
                body = await resp.read()
                if resp.status == 200:
                    instance = resp.headers.get("X-Fly-Instance")
                    new_cookie = _cookie_from(resp)
                else:
                    error = f"{resp.status} {body[:80].decode(errors='replace')}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            error = type(exc).__name__
        repinned = bool(kind != "anon" and instance and pinned and instance != pinned)
        self.records.append(Record(sent, self.now(), name, kind, pinned, instance, status, error, repinned))
        if instance is not None and kind != "anon":
            self.pins[name] = instance
        return new_cookie

    async def _cookie_loop(self, name: str, cookie: str) -> None:
        n = 0
        while self._running():
            url = self.urls[n % len(self.urls)] + f"/c?n={n}"
            fresh = await self._http(name, "cookie", url, {"Cookie": f"{COOKIE}={cookie}"})
            if fresh:
                cookie = fresh
            n += 1
            await self._pause(self.profile.interval)

    async def _user_loop(self, name: str, i: int) -> None:
        n = 0
        while self._running():
            await self._http(name, "user", self.urls[(i + n) % len(self.urls)] + f"/u?n={n}", {"X-User-Id": name})
            n += 1
            await self._pause(self.profile.interval)

    async def _anon_loop(self, name: str, i: int) -> None:
        n = 0
        while self._running():
            await self._http(name, "anon", self.urls[(i + n) % len(self.urls)] + f"/a?n={n}", {})
            n += 1
            await self._pause(self.profile.interval)

    async def _ws_loop(self, name: str, i: int) -> None:
        """A browser-like WebSocket client: its own cookie jar, reconnects when the socket dies."""
        session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))
        self._ws_sessions.append(session)
        n = 0
        while self._running():
            url = self.urls[(i + n) % len(self.urls)] + "/ws"
            n += 1
            sent = self.now()
            try:
                ws = await session.ws_connect(url, heartbeat=None)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                self._ws_record(name, sent, None, f"connect {type(exc).__name__}: {exc}"[:120])
                await self._pause(0.1)
                continue
            opened = sent
            try:
                while self._running():
                    sent = self.now()
                    await ws.send_str("whoami")
                    msg = await ws.receive(timeout=WS_RECEIVE_TIMEOUT)
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        self._ws_record(name, sent, None, f"ws {msg.type.name} {ws.close_code}", opened)
                        break
                    self._ws_record(name, sent, msg.data, None, opened)
                    await self._pause(self.profile.ws_interval)
            except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError) as exc:
                self._ws_record(name, sent, None, f"ws {type(exc).__name__}", opened)
            finally:
                await ws.close()
            await self._pause(0.05)

    def _ws_record(self, name: str, sent: float, instance: str | None, error: str | None,
                   opened: float | None = None) -> None:
        pinned = self.pins.get(name)
        repinned = bool(instance and pinned and instance != pinned)
        self.records.append(Record(sent, self.now(), name, "ws", pinned, instance, None, error, repinned, opened))
        if instance is not None:
            self.pins[name] = instance


@dataclass(slots=True)
class FaultReport:
    fault: str
    profile: str
    target: str | None  # the faulted instance (None for Redis)
    clients: int
    t_fault: float
    t_restore: float
    t_end: float
    sent: int = 0
    failed: int = 0
    failed_inflight: int = 0  # faulted instance, in flight at the fault
    failed_detecting: int = 0  # faulted instance, sent after the fault before every node had detected it
    failed_live: int = 0  # everything else: a violation
    repinned: int = 0
    repinned_live: int = 0  # clients pinned to a live instance that moved: a violation
    affected: int = 0  # clients pinned to the target at the fault
    detect: float | None = None  # seconds from the fault until every node had noticed it
    recover: float | None = None  # seconds from the fault until every class succeeds again and
    #                               every affected client was served elsewhere
    back: float | None = None  # seconds from the restore until every node routes to it again
    by_class: dict[str, Counter[str]] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    note: str = ""

    ROW_HEADER = ("| fault | profile | clients | sent | failed | in flight | detecting | live failed | re-pinned "
                  "| live moved | detect s | recover s | back s | p50 ms | p99 ms | max ms |")

    @staticmethod
    def _s(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def row(self) -> str:
        lat = self.latency
        return (f"| {self.fault} | {self.profile} | {self.clients} | {self.sent} | {self.failed} | "
                f"{self.failed_inflight} | {self.failed_detecting} | {self.failed_live} | {self.repinned} | "
                f"{self.repinned_live} | {self._s(self.detect)} | {self._s(self.recover)} | {self._s(self.back)} | "
                f"{lat.get('p50', 0) * 1000:.0f} | {lat.get('p99', 0) * 1000:.0f} | {lat.get('max', 0) * 1000:.0f} |")

    def details(self) -> str:
        parts = [f"{k}: " + ", ".join(f"{n}={v}" for n, v in sorted(c.items())) for k, c in self.by_class.items()]
        text = f"{self.fault} (target {self.target}): affected clients {self.affected}; " + "; ".join(parts)
        if self.note:
            text += f"\n  {self.note}"
        if self.samples:
            text += "\n  failures (first few): " + " | ".join(self.samples)
        if self.violations:
            text += "\n  VIOLATIONS: " + " | ".join(self.violations)
        return text


def table(reports: list[FaultReport]) -> str:
    sep = "|" + "---|" * FaultReport.ROW_HEADER.count(" | ") + "---|"
    return "\n".join([FaultReport.ROW_HEADER, sep, *(r.row() for r in reports)])


def analyse(fault: str, profile: Profile, records: list[Record], *, target: str | None, t_fault: float,
            t_detect: float | None, t_restore: float, t_back: float | None, t_end: float,
            pins_at_fault: dict[str, str | None], failures_allowed: bool,
            movers: tuple[str, ...] = ("cookie", "user", "ws")) -> FaultReport:
    """Classify every record of one fault run and check the requirements."""
    rep = FaultReport(fault, profile.name, target, profile.clients, t_fault, t_restore, t_end)
    rep.sent = len(records)
    rep.detect = None if t_detect is None else t_detect - t_fault
    rep.back = None if t_back is None else t_back - t_restore
    by_class: dict[str, Counter[str]] = {k: Counter() for k in CLASSES}
    # the window in which requests to the faulted instance may fail: sent before every node knew
    detect_end = t_detect if t_detect is not None else t_restore
    for r in records:
        c = by_class[r.kind]
        c["sent"] += 1
        if r.repinned:
            rep.repinned += 1
            c["repinned"] += 1
            if r.pinned != target and r.kind != "anon":
                rep.repinned_live += 1
                rep.violations.append(f"{r.client} moved {r.pinned}->{r.instance} at {r.done - t_fault:+.2f}s")
        if r.ok:
            continue
        rep.failed += 1
        c["failed"] += 1
        # an anonymous request has no instance before it is placed; its 502/504 (the proxy tried an
        # instance and it failed) can only come from the faulted one, anything else counts as live
        anon_upstream = r.kind == "anon" and (r.error or "")[:4] in ("502 ", "504 ")
        on_target = target is not None and (r.pinned == target or anon_upstream)
        if len(rep.samples) < 6:
            rep.samples.append(f"{r.client} pinned={r.pinned} sent={r.sent - t_fault:+.2f}s "
                               f"done={r.done - t_fault:+.2f}s {r.error}")
        # in flight: sent before the fault, or a message on a WebSocket opened before the fault
        # (an open socket is work in flight on its instance: it cannot move until it is closed)
        started = r.opened if r.opened is not None else r.sent
        if failures_allowed and on_target and r.done >= t_fault and started < t_fault:
            rep.failed_inflight += 1
        elif failures_allowed and on_target and t_fault <= r.sent <= detect_end:
            rep.failed_detecting += 1
        else:
            rep.failed_live += 1
            rep.violations.append(f"{r.client} ({r.kind}, pinned={r.pinned}) failed, sent "
                                  f"{r.sent - t_fault:+.2f}s after the fault: {r.error}")
    if fault == "redis" and by_class["cookie"]["failed"]:
        rep.violations.append(f"cookie clients saw {by_class['cookie']['failed']} errors during the Redis outage")
    rep.by_class = by_class
    affected = _affected(pins_at_fault, target, movers)
    rep.affected = len(affected)
    rep.recover = _recovery(records, target, t_fault, t_restore, affected)
    lat = sorted(r.latency for r in records if r.ok)
    if lat:
        rep.latency = {"p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                       "max": lat[-1]}
    rep.violations = rep.violations[:20]
    return rep


def _affected(pins_at_fault: dict[str, str | None], target: str | None,
              movers: tuple[str, ...]) -> dict[str, str | None]:
    """The clients of the ``movers`` classes that were pinned to the faulted instance at the fault."""
    return {c: pin for c, pin in pins_at_fault.items()
            if target is not None and pin == target and any(c.startswith(k) for k in movers)}


def _recovery(records: list[Record], target: str | None, t_fault: float, t_restore: float,
              pins_at_fault: dict[str, str | None]) -> float:
    """First time after the fault when every class succeeds again (after its last failure) and
    every client that was on the target has moved: served by another instance.

    One exception: a client that started nothing during the outage (its only traffic was on a
    WebSocket opened before the fault, which a hung instance holds open until the restore) never
    had to move; if it reconnects after the restore, the restored instance may rightly serve it
    again, so any success sent after the restore counts. Infinite: not recovered (yet)."""
    times = [t_fault]
    for kind in CLASSES:
        mine = [r for r in records if r.kind == kind and r.done >= t_fault]
        failures = [r.done for r in mine if not r.ok]
        if failures:
            last = max(failures)
            later = [r.done for r in mine if r.ok and r.done > last]
            times.append(min(later) if later else float("inf"))
    if target is not None:
        for client, pin in pins_at_fault.items():
            if pin != target:
                continue
            mine = [r for r in records if r.client == client and r.done >= t_fault]
            started_in_outage = any(t_fault <= (r.opened if r.opened is not None else r.sent) < t_restore
                                    for r in mine)
            moved = [r.done for r in mine if r.ok
                     and (r.instance != target or (not started_in_outage and r.sent >= t_restore))]
            times.append(min(moved) if moved else float("inf"))
    return max(times) - t_fault


# ---- faults -------------------------------------------------------------------------------------


class HangServer:
    """Listens on a port, accepts every connection and never answers (until ``close``)."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.accepted = 0

    async def start(self, port: int) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            self._writers.append(writer)  # read nothing, answer nothing

        deadline = time.monotonic() + 5
        while True:  # the port was just released by the backend; bounded retries on EADDRINUSE
            try:
                self._server = await asyncio.start_server(handle, "127.0.0.1", port)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), timeout=5)
            self._server = None


@dataclass(slots=True)
class FaultPlan:
    """What ``run_fault`` calls: inject (during traffic) and restore; ``detected``/``back`` are
    polled to time detection and return to service."""

    target: str | None
    inject: Callable[[], Awaitable[None]]
    restore: Callable[[], Awaitable[None]]
    detected: Callable[[], bool]
    back: Callable[[], bool]
    failures_allowed: bool
    during: Callable[[], Awaitable[None]] | None = None  # runs for the fault duration (flap)
    #: client classes whose clients on the target must end up elsewhere (flap: open WebSockets
    #: to a live instance rightly stay where they are)
    movers: tuple[str, ...] = ("cookie", "user", "ws")
    note: Callable[[], str] = lambda: ""  # extra facts for the report (flap count, hung connections)


def kill_plan(cluster: ChaosCluster, target: str = "b") -> FaultPlan:
    port = cluster.backends.ports[target]

    async def inject() -> None:
        await cluster.backends.kill(target)  # port closed, every open connection cut at once

    async def restore() -> None:
        await cluster.backends.start(target, port=port)

    return FaultPlan(target, inject, restore,
                     detected=lambda: all(cluster.state(n, target) == "down" for n in range(len(cluster.nodes))),
                     back=lambda: all(cluster.state(n, target) == "up" for n in range(len(cluster.nodes))),
                     failures_allowed=True)


def hang_plan(cluster: ChaosCluster, target: str = "b") -> FaultPlan:
    port = cluster.backends.ports[target]
    hang = HangServer()
    cleanups: list[asyncio.Future[None]] = []

    async def inject() -> None:
        # stop listening first and hang on the port at once; the old backend finishes (or closes)
        # what it had in flight in the background, like a process that froze mid-way
        runner = cluster.backends.runners.pop(target)
        for site in list(runner.sites):
            await site.stop()
        await hang.start(port)
        cleanups.append(asyncio.ensure_future(runner.cleanup()))

    async def restore() -> None:
        await hang.close()
        await asyncio.gather(*cleanups)
        await cluster.backends.start(target, port=port)

    plan = kill_plan(cluster, target)
    return FaultPlan(target, inject, restore, plan.detected, plan.back, failures_allowed=True,
                     note=lambda: f"hung connections accepted (requests and health probes): {hang.accepted}")


def redis_plan(cluster: ChaosCluster) -> FaultPlan:
    async def inject() -> None:
        await asyncio.to_thread(cluster.redis.stop)

    async def restore() -> None:
        await asyncio.to_thread(cluster.redis.start)

    return FaultPlan(None, inject, restore,
                     detected=lambda: all(not n.ctx.store_ok for n in cluster.nodes),
                     back=lambda: all(n.ctx.store_ok for n in cluster.nodes),
                     failures_allowed=False)


def flap_plan(cluster: ChaosCluster, profile: Profile, target: str = "b") -> FaultPlan:
    """The target's health check fails, passes, fails... while it keeps serving every request."""
    stop = asyncio.Event()
    flaps = Counter[str]()

    async def set_health(session: aiohttp.ClientSession, ok: int) -> None:
        url = cluster.backend_url(target) + f"/_control/health?ok={ok}"
        async with session.post(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            assert resp.status == 200, resp.status
        flaps[f"ok={ok}"] += 1

    async def inject() -> None:
        async with aiohttp.ClientSession() as session:
            await set_health(session, 0)

    async def during() -> None:
        deadline = time.monotonic() + profile.fault
        async with aiohttp.ClientSession() as session:
            ok = 0
            for _ in range(10_000):  # bounded: ends at the deadline long before this
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=profile.flap_period)
                if stop.is_set() or time.monotonic() >= deadline:
                    break
                ok = 1 - ok
                await set_health(session, ok)

    async def restore() -> None:
        stop.set()
        async with aiohttp.ClientSession() as session:
            await set_health(session, 1)

    plan = kill_plan(cluster, target)
    return FaultPlan(target, inject, restore, plan.detected, plan.back, failures_allowed=False, during=during,
                     movers=("cookie", "user"),
                     note=lambda: f"health switched: {flaps['ok=0']}x failing, {flaps['ok=1']}x passing")


async def _watch(predicate: Callable[[], bool], now: Callable[[], float], until: float,
                 every: float = 0.01) -> float | None:
    """Poll ``predicate`` every ``every`` seconds until it holds (return the time) or ``until`` passes."""
    while time.monotonic() < until:
        if predicate():
            return now()
        await asyncio.sleep(every)
    return None


FAULTS = ("kill", "redis", "hang", "flap")


def make_plan(fault: str, cluster: ChaosCluster, profile: Profile, pins: dict[str, str | None]) -> FaultPlan:
    """The plan for ``fault``; instance faults target the instance most clients are pinned to."""
    if fault == "redis":
        return redis_plan(cluster)
    counts = Counter(pin for pin in pins.values() if pin is not None)
    target = max(INSTANCES, key=lambda i: (counts[i], i == "b"))
    if fault == "kill":
        return kill_plan(cluster, target)
    if fault == "hang":
        return hang_plan(cluster, target)
    return flap_plan(cluster, profile, target)


async def run_fault(fault: str, profile: Profile, *, redis: RedisServer | None = None,
                    log: Callable[[str], None] = print) -> FaultReport:
    """Start a cluster and traffic, inject ``fault`` (kill | redis | hang | flap), restore, analyse."""
    async with ChaosCluster(profile.nodes, redis=redis) as cluster:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        total = profile.warmup + profile.fault + profile.after
        traffic = Traffic(cluster.urls(), profile, deadline=time.monotonic() + total + RECOVERY_GRACE + 60)
        try:
            await traffic.start()
            await traffic.ws_ready()
            await asyncio.sleep(profile.warmup)
            pins_at_fault = dict(traffic.pins)
            plan = make_plan(fault, cluster, profile, pins_at_fault)
            t_fault = traffic.now()
            fault_end = time.monotonic() + profile.fault
            watcher = asyncio.ensure_future(_watch(plan.detected, traffic.now, fault_end))
            await plan.inject()
            if plan.during is not None:
                await plan.during()
            await asyncio.sleep(max(0.0, fault_end - time.monotonic()))
            t_detect = await watcher
            t_restore = traffic.now()
            await plan.restore()
            t_back = await _watch(plan.back, traffic.now, time.monotonic() + profile.after)
            await asyncio.sleep(max(0.0, profile.after - (traffic.now() - t_restore)))
            # on a loaded machine the last clients may need longer than ``after`` to be served
            # again: keep the traffic running until they have (bounded), instead of judging early
            affected = _affected(pins_at_fault, plan.target, plan.movers)
            await _watch(lambda: _recovery(traffic.records, plan.target, t_fault, t_restore, affected) != float("inf"),
                         traffic.now, time.monotonic() + RECOVERY_GRACE, every=0.1)
        finally:
            await traffic.stop()
        t_end = traffic.now()
    log(f"pins at the fault: {dict(Counter(pins_at_fault.values()))}; target {plan.target}")
    log("pins at the end: " + ", ".join(f"{c}:{pins_at_fault.get(c)}->{p}" for c, p in sorted(traffic.pins.items())
                                          if p != pins_at_fault.get(c)))
    report = analyse(fault, profile, traffic.records, target=plan.target, t_fault=t_fault, t_detect=t_detect,
                     t_restore=t_restore, t_back=t_back, t_end=t_end, pins_at_fault=pins_at_fault,
                     failures_allowed=plan.failures_allowed, movers=plan.movers)
    report.note = plan.note()
    log(table([report]))
    log(report.details())
    return report


