"""FlyEdge: a local stand-in for Fly.io's edge proxy in front of several machines (docs/fly-protocol.md §1-2).

It spreads requests round robin over the started machines, honours ``fly-force-instance-id`` and
``fly-prefer-instance-id``, and acts on ``fly-replay`` answers the way Fly documents: the answer is
discarded and the ORIGINAL request (method, raw path and query, headers, body) is replayed to the
target with ``fly-replay-src``, at most ``max_replays`` times (then ``PA02 Excess fly-replay
headers``), only for bodies of at most ``max_replay_body`` bytes (request bodies are buffered up to
that size; larger ones are streamed through and cannot be replayed), with ``prefer_instance``,
``timeout`` and ``fallback`` semantics (target choice in ``fly.edge_route``, the HTTP path in
``fly.edge_http``). WebSocket upgrades are relayed and replayed the same way (``fly.edge_ws``).
Machines can be marked stopped (woken through ``on_wake`` when targeted) or destroyed (unknown),
and cordoned (no load-balanced traffic: the switch of a bluegreen deploy, ``cordon``).
Counters are attributes and ``GET /_edge/stats``; ``hop_counts`` records how many Machines each
relayed request was delivered to.

The replay cache (docs/fly-protocol.md §1 "Replay caching", §5): ``replay_cache`` takes the fly.toml
``[[http_service.http_options.replay_cache]]`` rules (``edge_cache.CacheRule``); answers carrying
``fly-replay-cache: /path/*`` are cached too. What is stored and looked up is ``fly.edge_cache``'s,
how a hit is delivered ``fly.edge_route``'s (``cache_gone_target`` picks the reading for a cached
target that is gone); ``cache_outcomes`` counts relayed requests by how they got there (``hit``,
``hit_replayed``, ``replayed``, ``direct``).

Machines belong to an app and a process group and may have a ``hard_limit`` (see
``fly.edge_route`` for what is modelled and where docs/fly-protocol.md says so): client traffic goes to the
edge's ``app``, only to its ``http_group``; ``fly-replay: app=<other>`` reaches another app's
Machines (a router app replaying into ours).

Stand-in choices where Fly's behaviour is UNCONFIRMED: any status may carry ``fly-replay``; client
``fly-replay-src``/``fly-replay-failed``/``fly-preferred-instance-unavailable`` headers are stripped
(``strip_client_fly_headers``); ``fly-force-instance-id`` wakes a stopped machine; a fallback
carries ``fly-replay-src`` only with ``fallback_replay_src`` (default: not, as Fly does not promise
it); ``instance=`` to a Machine at its hard_limit waits or fails at once (``hard_limit_instance``);
WebSockets do not count towards a Machine's load. Test/demo tool: one event loop, no TLS, no
JSON-body replays.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from affinity_proxy.devtools.fly.edge_cache import CacheRule, ReplayCache
from affinity_proxy.devtools.fly.edge_http import serve_http
from affinity_proxy.devtools.fly.edge_route import (
    MACHINE_STATES,
    PA01,
    PA02,
    PA03_FALLBACK,
    PM01,
    EdgeError,
    EdgeRouter,
    GoneTargetReading,
    HardLimitReading,
    Hop,
    Machine,
    MachineState,
    new_request_id,
)
from affinity_proxy.devtools.fly.edge_ws import is_upgrade, relay_websocket
from affinity_proxy.proxy.headers import FLY_CLIENT_IP_HEADER, FLY_REQUEST_ID_HEADER, upstream_request_headers
from affinity_proxy.routing.replay import (
    MAX_REPLAY_BODY,
    MAX_REPLAYS,
    PREFERRED_UNAVAILABLE_HEADER,
    REPLAY_FAILED_HEADER,
    REPLAY_SRC_HEADER,
)

__all__ = ["FlyEdge"]

log = logging.getLogger("affinity_proxy.fly.edge")

# Headers only Fly's edge sets: a client's copies are dropped (see strip_client_fly_headers for the rest).
_EDGE_SET = (FLY_CLIENT_IP_HEADER.lower(), "fly-region", FLY_REQUEST_ID_HEADER.lower(), "fly-forwarded-port",
             "x-forwarded-ssl", "via", "expect")
_SPOOFABLE = (REPLAY_SRC_HEADER, REPLAY_FAILED_HEADER, PREFERRED_UNAVAILABLE_HEADER)

WakeCallback = Callable[[str], Awaitable[None]]


class FlyEdge:
    """A local Fly edge for ``machines`` (machine id -> base URL of that machine's node).

    ``start()`` binds and returns the port; ``stop()`` closes open WebSockets and the listener.
    Counters: ``requests`` (client requests), ``replays`` (fly-replay answers acted on),
    ``errors`` (edge-made error answers; ``error_codes`` by code), ``hits`` (requests delivered per
    machine, replaying ones included), ``served`` (final answers per machine), ``wakes``,
    ``replay_counts`` (how many requests needed N replays). Not thread-safe: one event loop.
    """

    def __init__(
        self,
        machines: Mapping[str, str],
        *,
        app: str = "demo",
        region: str = "lcl",
        max_replays: int = MAX_REPLAYS,
        max_replay_body: int = MAX_REPLAY_BODY,
        client: aiohttp.ClientSession | None = None,
        on_wake: WakeCallback | None = None,
        strip_client_fly_headers: bool = True,
        connect_timeout: float = 5.0,
        http_group: str | None = None,
        hard_limit_instance: HardLimitReading = "wait",
        fallback_replay_src: bool = False,
        hard_limit_wait: float = 30.0,
        api_rate: float | None = None,
        api_burst: float = 3.0,
        api_retry_after: int | None = 1,
        replay_cache: Sequence[CacheRule] = (),
        cache_gone_target: GoneTargetReading = "replay",
        cache_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = EdgeRouter(machines, app=app, region=region, http_group=http_group,
                                 hard_limit_instance=hard_limit_instance, fallback_replay_src=fallback_replay_src,
                                 cache_gone_target=cache_gone_target)
        self.cache = ReplayCache(tuple(replay_cache))
        self._cache_clock = cache_clock
        self.hop_counts: Counter[int] = Counter()
        self.cache_outcomes: Counter[str] = Counter()
        self.hard_limit_wait = hard_limit_wait
        self._load_changed = asyncio.Event()
        self.app = app
        self.region = region
        self.max_replays = max_replays
        self.max_replay_body = max_replay_body
        self.on_wake = on_wake
        self.strip_client_fly_headers = strip_client_fly_headers
        self.connect_timeout = connect_timeout
        self._client = client
        self._own_client = client is None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.sockets: set[web.WebSocketResponse] = set()
        self._wake_locks: dict[str, asyncio.Lock] = {}
        self.requests = 0
        self.replays = 0
        self.errors = 0
        self.wakes = 0
        self.hits: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.error_codes: Counter[str] = Counter()
        self.replay_counts: Counter[int] = Counter()
        self.api_calls = 0  # Machines API list calls answered (200 or not)
        self.api_limited = 0  # of them answered 429
        self.api_rate, self.api_burst, self.api_retry_after = api_rate, api_burst, api_retry_after
        self._api_tokens, self._api_at = api_burst, time.monotonic()

    # ------------------------------------------------------------------ lifecycle and machines

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("FlyEdge is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def client(self) -> aiohttp.ClientSession:
        if self._client is None:
            raise RuntimeError("FlyEdge is not started")
        return self._client

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 = any free port) and return the bound port."""
        if self._client is None:
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=5.0),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout),
            )
        app = web.Application(client_max_size=0)
        app.router.add_get("/_edge/stats", self._stats_handler)
        app.router.add_get("/_edge/machines", self._machines_handler)
        app.router.add_post("/_edge/machines/{id}/state", self._machine_state_handler)
        app.router.add_get("/v1/apps/{app}/machines", self._machines_api_handler)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_shutdown.append(self._close_sockets)
        self._runner = web.AppRunner(app, shutdown_timeout=2.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Close client WebSockets (1001), the listener and the session the edge created. Idempotent."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._own_client and self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> FlyEdge:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _close_sockets(self, _app: web.Application) -> None:
        for ws in list(self.sockets):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"edge shutting down")

    def add_machine(self, machine_id: str, url: str, state: MachineState = "started", *, app: str | None = None,
                    group: str = "app", hard_limit: int | None = None) -> None:
        """Add (or replace) a machine, e.g. the new machines of a bluegreen deploy, a worker
        (``group``) or a Machine of another app (``app``, e.g. a router app)."""
        self.router.machines[machine_id] = Machine(machine_id, url, state, app=app or self.app, group=group,
                                                   hard_limit=hard_limit)

    def cache_now(self) -> float:
        """The replay cache's clock (``cache_clock``; a test may pass its own to expire entries)."""
        return self._cache_clock()

    def cordon(self, machine_id: str, cordoned: bool = True) -> None:
        """Take the Machine out of load balancing (or back in): what a bluegreen deploy does to the
        old Machines once the new ones are healthy, before destroying them (docs/fly-protocol.md §5
        ``bluegreen``; the Machines API ``cordon``, §4). GUESS: replays naming it still reach it.
        KeyError for an unknown id."""
        self.router.machines[machine_id].cordoned = cordoned

    def set_machine_group(self, machine_id: str, group: str) -> None:
        """The Machine's process group (fly.toml ``[processes]``). KeyError for an unknown id."""
        self.router.machines[machine_id].group = group

    def set_machine_load(self, machine_id: str, *, hard_limit: int | None = None, busy: int = 0) -> None:
        """``hard_limit`` (None: none) and ``busy``, load standing for other traffic, so a test can
        put a Machine at its hard limit and take it off again. KeyError for an unknown id."""
        machine = self.router.machines[machine_id]
        machine.hard_limit, machine.busy = hard_limit, busy
        self._notify_load()

    def enter(self, machine: Machine) -> None:
        """A request is being delivered to ``machine`` (counts towards its hard_limit)."""
        machine.load += 1

    def leave(self, machine: Machine) -> None:
        machine.load = max(0, machine.load - 1)
        self._notify_load()

    def _notify_load(self) -> None:
        self._load_changed.set()
        self._load_changed = asyncio.Event()

    async def wait_for_slot(self, hop: Hop) -> Hop | EdgeError | None:
        """``instance=`` to a Machine at its hard_limit under the ``wait`` reading: wait until it
        has a free slot, at most the replay's ``timeout`` (then its fallback) or ``hard_limit_wait``
        (then PR03). None: deliver now."""
        machine = hop.machine
        if not hop.waits or not machine.full:
            return None
        try:
            async with asyncio.timeout(hop.timeout or self.hard_limit_wait):
                while machine.full:
                    await self._load_changed.wait()
        except TimeoutError:
            return self.router.timed_out(hop)
        return None

    def set_machine_state(self, machine_id: str, state: MachineState) -> None:
        """``started``, ``stopped`` (woken via ``on_wake`` when a replay or a force header targets
        it) or ``destroyed`` (unknown from now on). KeyError for an unknown id."""
        if state not in MACHINE_STATES:
            raise ValueError(f"machine state must be one of {sorted(MACHINE_STATES)}, got {state!r}")
        self.router.machines[machine_id].state = state

    def machine_state(self, machine_id: str) -> MachineState | None:
        machine = self.router.machines.get(machine_id)
        return machine.state if machine is not None else None

    def stats(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "region": self.region,
            "requests": self.requests,
            "replays": self.replays,
            "errors": self.errors,
            "wakes": self.wakes,
            "hits": dict(self.hits),
            "served": dict(self.served),
            "error_codes": dict(self.error_codes),
            "replay_counts": {str(k): v for k, v in sorted(self.replay_counts.items())},
            "api_calls": self.api_calls,
            "api_limited": self.api_limited,
            "hop_counts": {str(k): v for k, v in sorted(self.hop_counts.items())},
            "replay_cache": {"entries": len(self.cache), **self.cache.counts, "outcomes": dict(self.cache_outcomes)},
            "machines": {m.id: {"url": m.url, "state": m.state, "app": m.app, "group": m.group,
                                "hard_limit": m.hard_limit, "load": m.load + m.busy}
                         for m in self.router.machines.values()},
            "websockets": len(self.sockets),
        }

    async def _stats_handler(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _machines_handler(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats()["machines"])

    async def _machines_api_handler(self, request: web.Request) -> web.Response:
        """A slice of the Machines API list call (docs/fly-protocol.md §4, DOCS machines/api): ``id``, ``state``,
        ``region``, ``config.metadata.fly_process_group``; ``?metadata.fly_process_group=`` filters.
        Any bearer token is accepted; destroyed Machines are left out (as without
        ``include_deleted``). Served on the edge's port, so ``fly.api_url`` can point here."""
        if not request.headers.get("Authorization", "").strip():
            return web.json_response({"error": "unauthorized"}, status=401)
        self.api_calls += 1
        if not self._api_take():
            self.api_limited += 1
            headers = {"Retry-After": str(self.api_retry_after)} if self.api_retry_after is not None else {}
            return web.json_response({"error": "rate limit exceeded"}, status=429, headers=headers)
        app = request.match_info["app"]
        group = request.query.get("metadata.fly_process_group")
        machines = [m for m in self.router.machines.values() if (m.app or self.app) == app and m.state != "destroyed"]
        if not machines:
            return web.json_response({"error": "app not found"}, status=404)
        return web.json_response([
            {"id": m.id, "state": m.state, "region": self.region,
             "config": {"metadata": {"fly_process_group": m.group}}}
            for m in machines if group is None or m.group == group
        ])

    def _api_take(self) -> bool:
        """A token of the list call's bucket (``api_rate`` per second, bursts of ``api_burst``);
        always True without ``api_rate``. GUESS: Fly documents 1 request/s with bursts of 3 per
        action and Machine (docs/fly-private-network.md), not a figure for the list call, nor
        whether a 429 carries ``Retry-After`` (``api_retry_after`` None leaves it out)."""
        if self.api_rate is None:
            return True
        now = time.monotonic()
        self._api_tokens = min(self.api_burst, self._api_tokens + (now - self._api_at) * self.api_rate)
        self._api_at = now
        if self._api_tokens < 1:
            return False
        self._api_tokens -= 1
        return True

    async def _machine_state_handler(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            self.set_machine_state(request.match_info["id"], body["state"])
        except KeyError:
            return web.json_response({"error": "unknown machine or missing state"}, status=404)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.stats()["machines"][request.match_info["id"]])

    # ------------------------------------------------------------------ shared by HTTP and WebSocket

    def edge_headers(self, request: web.Request, request_id: str) -> CIMultiDict[str]:
        """What the machine receives: the client's end-to-end headers plus Fly's own (docs/fly-protocol.md §2)."""
        drop = _EDGE_SET + (_SPOOFABLE if self.strip_client_fly_headers else ())
        headers = upstream_request_headers(
            request.headers, client_ip=request.remote, scheme=request.scheme, host=None, drop=drop
        )
        if request.remote:
            headers[FLY_CLIENT_IP_HEADER] = request.remote
        headers["Fly-Region"] = self.region
        headers[FLY_REQUEST_ID_HEADER] = request_id
        headers["X-Forwarded-SSL"] = "on" if request.scheme == "https" else "off"
        if self.port is not None:
            headers["Fly-Forwarded-Port"] = str(self.port)
        headers["Via"] = "1.1 fly.io"
        return headers

    async def prepare_hop(self, hop: Hop) -> EdgeError | None:
        """Wake the hop's machine when it is stopped (``on_wake``), as Fly's proxy starts machines."""
        machine = hop.machine
        if machine.state != "stopped":
            return None
        async with self._wake_locks.setdefault(machine.id, asyncio.Lock()):  # one wake for concurrent requests
            if machine.state != "stopped":
                return None
            try:
                if self.on_wake is not None:
                    await self.on_wake(machine.id)
            except Exception:
                log.exception("waking machine %s failed", machine.id)
                return PM01
            machine.state = "started"
            self.wakes += 1
        return None

    def after_connect_failure(self, hop: Hop, exc: aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError,
                              failed: set[str]) -> Hop | EdgeError:
        """Where to go when ``hop.machine`` could not be reached: a replay's own ``timeout`` ran out
        (its fallback rules apply), or another Machine (Fly retries connect failures elsewhere)."""
        failed.add(hop.machine.id)
        if isinstance(exc, aiohttp.ConnectionTimeoutError) and hop.timeout:
            return self.router.timed_out(hop)
        return self.router.retry_elsewhere(hop, failed)

    def next_after_replay(self, hop: Hop, value: str, replays: int, replayable: bool) -> Hop | EdgeError:
        """Act on a ``fly-replay`` answer from ``hop.machine`` (the ``replays``-th for this request)."""
        if hop.is_fallback:
            return PA03_FALLBACK
        if not replayable:
            return PA01
        if replays > self.max_replays:
            return PA02
        return self.router.replay(hop.machine, value, time.monotonic())

    def error_response(self, error: EdgeError, request_id: str) -> web.Response:
        self.errors += 1
        self.error_codes[error.code] += 1
        log.info("edge error %s for %s", error.text, request_id)
        return web.Response(
            status=error.status,
            text=error.text + "\n",
            headers={FLY_REQUEST_ID_HEADER: request_id, "Fly-Error": error.code},
        )

    def machine_url(self, machine: Machine, request: web.Request) -> URL:
        target = request.raw_path if request.raw_path.startswith("/") else request.rel_url.raw_path_qs
        return URL(machine.url.rstrip("/") + target, encoded=True)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        request_id = new_request_id(self.region)
        if is_upgrade(request):
            return await relay_websocket(self, request, request_id)
        return await serve_http(self, request, request_id)
