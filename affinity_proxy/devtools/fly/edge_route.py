"""Where the local Fly edge sends a request next: the machine table and its routing rules.

No network I/O: ``EdgeRouter`` keeps the machines (id, URL, state, app, process group,
``hard_limit`` and load) and turns the client's routing headers (``fly-force-instance-id``,
``fly-prefer-instance-id``) and each ``fly-replay`` answer into the next ``Hop`` or an
``EdgeError`` (docs/fly-protocol.md §1-2). The async side lives in ``fly.edge``. Imports the stdlib and
``routing`` only.

Modelled, with the docs/fly-protocol.md source of each (DOCS = Fly's docs as docs/fly-protocol.md cites them):

- process groups: only Machines of the ``[http_service]``'s group (``http_group``; fly.toml
  ``processes = ["web"]``, docs/fly-protocol.md §5) get load-balanced client traffic. GUESS (docs silent): a
  ``fly-replay`` naming a Machine of another group is treated like a Machine that is not found.
- ``hard_limit`` (docs/fly-protocol.md §5 ``[http_service.concurrency]``): load balancing skips a Machine at its
  limit; ``prefer_instance=`` to it goes to another Machine with
  ``fly-preferred-instance-unavailable`` (docs/fly-protocol.md §1). ``instance=`` to it: the docs are silent, so
  ``hard_limit_instance`` picks the reading: ``wait`` (queue until a slot frees, bounded by the
  replay's ``timeout``; then the fallback, or PR03) or ``no_candidate`` (at once: the fallback
  with ``reason=no_candidate``, or PR04).
- other apps (docs/fly-protocol.md §1 ``app``): Machines carry an app; client traffic goes to the edge's own
  ``app``; ``fly-replay: app=<other>`` load balances over that app's Machines (its ``state``
  comes back in ``fly-replay-src``), ``instance=`` must belong to the app named.
- fallbacks (docs/fly-protocol.md §1 ``fallback``): the request goes back with ``fly-replay-failed``; whether
  it also carries ``fly-replay-src`` is not documented (docs/fly-protocol.md §1-2 promise it only on replayed
  requests), so ``fallback_replay_src`` picks the reading (default: without).
- replay-cache hits (docs/fly-protocol.md §1 "Replay caching"; what is cached is ``fly.edge_cache``'s):
  ``cached`` delivers straight to the cached target with ``fly-replay-cache-status: hit`` and
  without ``fly-replay-src`` ("fly-replay-src is NOT set on requests replayed from the cache").
  A cached target that is gone: the docs are silent, so ``cache_gone_target`` picks the reading:
  ``replay`` (the cached replay acts as the replay would: ``prefer_instance`` goes to another
  Machine with ``fly-preferred-instance-unavailable``, ``instance`` ends in PR02) or ``evict``
  (the entry is dropped and the request takes the uncached path, origin included).
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, Protocol

from affinity_proxy.routing.model import is_valid_instance_id
from affinity_proxy.routing.replay import (
    CACHE_HIT,
    FORCE_INSTANCE_HEADER,
    PREFER_INSTANCE_HEADER,
    PREFERRED_UNAVAILABLE_HEADER,
    REPLAY_CACHE_STATUS_HEADER,
    REPLAY_FAILED_HEADER,
    REPLAY_SRC_HEADER,
    ReplayInstruction,
    parse_replay_instruction,
)

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web
    from multidict import CIMultiDict
    from yarl import URL

    from affinity_proxy.devtools.fly.edge_cache import ReplayCache

MachineState = Literal["started", "stopped", "destroyed"]
HardLimitReading = Literal["wait", "no_candidate"]
GoneTargetReading = Literal["replay", "evict"]
MACHINE_STATES: frozenset[str] = frozenset({"started", "stopped", "destroyed"})
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_request_id(region: str) -> str:
    """``<ULID>-<region>``, the observed ``Fly-Request-Id`` shape (docs/fly-protocol.md §2)."""
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    chars = [_CROCKFORD[(value >> shift) & 31] for shift in range(125, -5, -5)]
    return "".join(chars) + "-" + region


@dataclass
class Machine:
    """One Machine. ``load``: requests the edge is delivering to it now; ``busy``: extra load a
    test sets to stand for other traffic. At ``hard_limit`` (None: no limit) it takes no more."""

    id: str
    url: str
    state: MachineState = "started"
    app: str = ""
    group: str = "app"
    hard_limit: int | None = None
    load: int = 0
    busy: int = 0
    cordoned: bool = False  # no load-balanced traffic (a bluegreen deploy switched away from it)

    @property
    def full(self) -> bool:
        return self.hard_limit is not None and self.load + self.busy >= self.hard_limit


@dataclass(frozen=True, slots=True)
class EdgeError:
    """An error the edge answers itself (Fly's PAxx/PRxx/PMxx proxy errors)."""

    status: int
    code: str
    message: str

    @property
    def text(self) -> str:
        return f"{self.code} {self.message}"


@dataclass(frozen=True, slots=True)
class Hop:
    """Deliver the request to ``machine`` with ``headers`` added. ``replayer``/``instruction`` are set
    when the hop comes from a fly-replay; ``is_fallback`` when it is a fallback (which may not replay)."""

    machine: Machine
    headers: Mapping[str, str] = field(default_factory=dict)
    replayer: Machine | None = None
    instruction: ReplayInstruction | None = None
    is_fallback: bool = False
    waits: bool = False  # instance= to a Machine at its hard_limit under the ``wait`` reading
    balanced: bool = False  # load balanced: another machine may take it if this one is unreachable
    started: float = 0.0  # time.monotonic() when the replay was asked for
    cached: bool = False  # delivered by a replay-cache hit (no origin asked)

    @property
    def timeout(self) -> float | None:
        return self.instruction.timeout if self.instruction is not None and not self.is_fallback else None


PA01 = EdgeError(502, "PA01", "Request body too large to replay")
PA02 = EdgeError(502, "PA02", "Excess fly-replay headers")
PA03 = EdgeError(502, "PA03", "Invalid fly-replay header")
PA03_FALLBACK = EdgeError(502, "PA03", "Invalid fly-replay: a fallback request cannot issue another fly-replay")
PA04 = EdgeError(502, "PA04", "Target app not found")
PR02 = EdgeError(502, "PR02", "Machine not found")
PR02_FORCED = EdgeError(503, "PR02", "Machine not found")
PR03 = EdgeError(502, "PR03", "Could not connect to a machine after retries")
PR04 = EdgeError(503, "PR04", "No candidate machines available")
PM01 = EdgeError(502, "PM01", "Machine failed to start")


class EdgeRouter:
    """The edge's view of the app's machines and its target choices. Single event loop; no locks."""

    def __init__(
        self,
        machines: Mapping[str, str],
        *,
        app: str,
        region: str,
        now_us: Callable[[], int] = lambda: time.time_ns() // 1000,
        http_group: str | None = None,
        hard_limit_instance: HardLimitReading = "wait",
        fallback_replay_src: bool = False,
        cache_gone_target: GoneTargetReading = "replay",
    ) -> None:
        self.machines: dict[str, Machine] = {mid: Machine(mid, url, app=app) for mid, url in machines.items()}
        self.cache_gone_target = cache_gone_target
        self.app = app
        self.region = region
        self.http_group = http_group
        self.hard_limit_instance = hard_limit_instance
        self.fallback_replay_src = fallback_replay_src
        self._now_us = now_us
        self._turn = itertools.count()

    def serves(self, machine: Machine, app: str | None = None) -> bool:
        """The Machine belongs to ``app`` (default: the edge's) and, for the edge's own app, to the
        http service's process group."""
        app = app or self.app
        if (machine.app or self.app) != app:
            return False
        return app != self.app or self.http_group is None or machine.group == self.http_group

    def known(self, machine_id: str | None, app: str | None = None) -> Machine | None:
        """The machine unless it is unknown, destroyed, or not a Machine of ``app``'s http service."""
        machine = self.machines.get(machine_id or "")
        if machine is None or machine.state == "destroyed" or not self.serves(machine, app):
            return None
        return machine

    def pick(self, exclude: Collection[str] = (), app: str | None = None) -> Machine | None:
        """Round robin over ``app``'s started machines below their hard_limit; a stopped one
        (autostart) only when none is started (docs/fly-protocol.md §5 load balancing and autostart)."""
        for wanted in ("started", "stopped"):
            pool = [m for m in self.machines.values()
                    if m.state == wanted and m.id not in exclude and not m.full and not m.cordoned
                    and self.serves(m, app)]
            if pool:
                return pool[next(self._turn) % len(pool)]
        return None

    def initial(self, headers: Mapping[str, str]) -> Hop | EdgeError:
        """The first machine for a client request: forced, preferred, or load balanced."""
        forced = headers.get(FORCE_INSTANCE_HEADER)
        if forced is not None:
            machine = self.known(forced.strip())
            return Hop(machine) if machine is not None else PR02_FORCED
        preferred = headers.get(PREFER_INSTANCE_HEADER)
        if preferred is not None:
            preferred = preferred.strip()
            machine = self.known(preferred)
            if machine is not None and not machine.full:
                return Hop(machine)
            other = self.pick(exclude={preferred})
            if other is None:
                return PR04
            extra = {PREFERRED_UNAVAILABLE_HEADER: preferred} if is_valid_instance_id(preferred) else {}
            return Hop(other, extra, balanced=True)
        machine = self.pick()
        return Hop(machine, balanced=True) if machine is not None else PR04

    def cached(self, value: str) -> Hop | EdgeError | None:
        """The hop for a replay-cache hit on ``value`` (a stored ``fly-replay``): straight to its
        target, ``fly-replay-cache-status: hit``, no ``fly-replay-src``. None: the ``evict``
        reading applies (the target is gone): the caller drops the entry and takes the uncached path."""
        try:
            instr = parse_replay_instruction(value)
        except ValueError:
            return None
        app = instr.app or self.app
        headers = {REPLAY_CACHE_STATUS_HEADER: CACHE_HIT}
        wanted = instr.instance or instr.prefer_instance
        if wanted is not None:
            machine = self.known(wanted, app)
            if machine is not None and (instr.instance is not None or not machine.full):
                return Hop(machine, headers, cached=True, waits=machine.full)
            if self.cache_gone_target == "evict" and machine is None:
                return None
            if instr.instance is not None:
                return PR02
            other = self.pick(exclude={wanted}, app=app)
            if other is None:
                return PR04
            headers[PREFERRED_UNAVAILABLE_HEADER] = wanted
            return Hop(other, headers, cached=True, balanced=True)
        machine = self.pick(app=app)
        return Hop(machine, headers, cached=True, balanced=True) if machine is not None else PR04

    def retry_elsewhere(self, hop: Hop, failed: Collection[str]) -> Hop | EdgeError:
        """After a connection failure: a load-balanced first hop moves on; a targeted one fails
        (or falls back when its replay asked for a fallback)."""
        if hop.balanced and not hop.is_fallback:
            machine = self.pick(exclude=failed, app=hop.machine.app or self.app)
            if machine is not None:
                return replace(hop, machine=machine)
        instr = hop.instruction
        if instr is not None and instr.fallback is not None and hop.replayer is not None and not hop.is_fallback:
            return self._fallback(hop.replayer, instr, "retries_exhausted", hop.started)
        return PR03

    def timed_out(self, hop: Hop) -> Hop | EdgeError:
        """The replay's ``timeout`` passed before a connection was made."""
        if hop.instruction is not None and hop.instruction.fallback is not None and hop.replayer is not None:
            return self._fallback(hop.replayer, hop.instruction, "timeout", hop.started)
        return PR03

    def replay(self, replayer: Machine, value: str, started: float) -> Hop | EdgeError:
        """The hop for a ``fly-replay: <value>`` answered by ``replayer``."""
        try:
            instr = parse_replay_instruction(value)
        except ValueError:
            return PA03
        app = instr.app or replayer.app or self.app
        if not any((m.app or self.app) == app for m in self.machines.values()):
            return self._no_candidate(replayer, instr, PA04, started)
        if instr.region and not ({"any", self.region} & set(instr.region)):
            return self._no_candidate(replayer, instr, PR04, started)
        exclude = {replayer.id} if instr.elsewhere else set()
        headers = {REPLAY_SRC_HEADER: self._replay_src(replayer, instr)}
        waits = False
        if instr.instance is not None:
            machine = self.known(instr.instance, app)
            if machine is None:
                return self._no_candidate(replayer, instr, PR02, started)
            if machine.full:
                if self.hard_limit_instance == "no_candidate":
                    return self._no_candidate(replayer, instr, PR04, started)
                waits = True
        elif instr.prefer_instance is not None:
            machine = self.known(instr.prefer_instance, app)
            if machine is None or machine.full:  # not found, or at its hard_limit (docs/fly-protocol.md §1)
                machine = self.pick(exclude=exclude | {instr.prefer_instance}, app=app)
                headers[PREFERRED_UNAVAILABLE_HEADER] = instr.prefer_instance
        else:
            machine = self.pick(exclude=exclude, app=app)
        if machine is None:
            return self._no_candidate(replayer, instr, PR04, started)
        balanced = instr.instance is None and machine.id != instr.prefer_instance
        return Hop(machine, headers, replayer=replayer, instruction=instr, balanced=balanced, started=started,
                   waits=waits)

    def _replay_src(self, replayer: Machine, instr: ReplayInstruction) -> str:
        return f"instance={replayer.id};region={self.region};t={self._now_us()};state={instr.state or ''}"

    def _no_candidate(
        self, replayer: Machine, instr: ReplayInstruction, error: EdgeError, started: float
    ) -> Hop | EdgeError:
        if instr.fallback is None:
            return error
        return self._fallback(replayer, instr, "no_candidate", started)

    def _fallback(self, replayer: Machine, instr: ReplayInstruction, reason: str, started: float) -> Hop | EdgeError:
        """Send the request back to the replayer (``force_self``) or to it or any machine
        (``prefer_self``) with ``fly-replay-failed``; the fallback may not replay again."""
        origin_app = replayer.app or self.app
        machine = self.known(replayer.id, origin_app)
        if machine is None and instr.fallback == "prefer_self":
            machine = self.pick(app=origin_app)
        if machine is None:
            return PR02
        target = instr.instance or instr.prefer_instance
        fields = [f"instance={target}"] if target else []
        fields += [f"app={instr.app or self.app}", f"region={self.region}", f"replay_source={replayer.id}"]
        elapsed = max(0, round((time.monotonic() - started) * 1000)) if started else 0
        fields += [f"reason={reason}", f"elapsed_ms={elapsed}"]
        headers = {REPLAY_FAILED_HEADER: ";".join(fields)}
        if self.fallback_replay_src:
            headers[REPLAY_SRC_HEADER] = self._replay_src(replayer, instr)
        return Hop(machine, headers, replayer=replayer, instruction=instr, is_fallback=True, started=started)


class Edge(Protocol):
    """What the HTTP and WebSocket relays (``edge_http``, ``edge_ws``) use of ``edge.FlyEdge``.

    A protocol here, below all three, so the relays do not import the edge that imports them."""

    router: EdgeRouter
    cache: ReplayCache
    hop_counts: Counter[int]
    cache_outcomes: Counter[str]
    max_replay_body: int
    sockets: set[web.WebSocketResponse]
    replays: int
    hits: Counter[str]
    served: Counter[str]
    replay_counts: Counter[int]

    @property
    def client(self) -> aiohttp.ClientSession: ...

    def cache_now(self) -> float: ...

    def enter(self, machine: Machine) -> None: ...

    def leave(self, machine: Machine) -> None: ...

    async def wait_for_slot(self, hop: Hop) -> Hop | EdgeError | None: ...

    def edge_headers(self, request: web.Request, request_id: str) -> CIMultiDict[str]: ...

    async def prepare_hop(self, hop: Hop) -> EdgeError | None: ...

    def after_connect_failure(self, hop: Hop, exc: aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError,
                              failed: set[str]) -> Hop | EdgeError: ...

    def next_after_replay(self, hop: Hop, value: str, replays: int, replayable: bool) -> Hop | EdgeError: ...

    def error_response(self, error: EdgeError, request_id: str) -> web.Response: ...

    def machine_url(self, machine: Machine, request: web.Request) -> URL: ...
