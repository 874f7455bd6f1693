"""FlyMachinesApiSource: the app's Machines and their states from the Fly Machines API.

``GET {api_url}/v1/apps/{app}/machines`` with ``Authorization: Bearer <token>`` (a token that
already names its scheme, like the ``FlyV1 fm2_...`` tokens of ``fly tokens create deploy``, is sent
as it is). From inside a Machine the API is at ``http://_api.internal:4280``; from outside at
``https://api.machines.dev``. It says more than DNS (``failed``, ``replacing``...) at the price of a
token and an API rate limit, so poll it no more than every few seconds.

States (docs/fly-protocol.md section 4, DOCS machines/machine-states) map to ``InstanceState`` as follows:

======================================================  ==========  ==================================
Machine state                                           Instance    why
======================================================  ==========  ==================================
started                                                 UP          running
updating, replacing, restarting                         UP          comes straight back, same id
                                                                    (rolling deploys update in place)
created, creating, starting, stopping, stopped,         STOPPED     deployed but not running: pins
suspending, suspended                                               kept, a replay wakes it
failed, launch_failed                                   DOWN        cannot serve; pins reaped after
                                                                    the reaper's grace period
destroying, destroyed, replaced, migrated               (omitted)   never comes back: ``gone``
any other state                                         STOPPED     kept, not chosen for new users
                                                                    (warned once per state name)
======================================================  ==========  ==================================

Rate limits: with a ``shared`` state (the pin store's Redis) one node of the app polls per
``interval``: a node polls only while it holds the lock ``machines-api:<app>:<group>`` (taken
for ``interval`` seconds and left to expire, so polls are at least ``interval`` apart across the
app, whichever node makes them, and a crashed poller is replaced within one interval) and shares
the answer (the Machines' id, state and region) under the same name for 3 intervals; the other
nodes read it. A ``429`` answer backs off every node: for ``Retry-After`` seconds when given (at
most ``MAX_BACKOFF``), else exponentially from ``interval`` (doubling per 429 in a row, at most
``MAX_BACKOFF``), with up to 20 % random jitter added, shared as ``machines-api:...:backoff``.
While the shared state is unreachable a node polls by itself (still backing off on 429), so
membership keeps following the API through a Redis outage.

The token is never logged, never put in an error message (it is scrubbed from response bodies
quoted there) and not shown by ``repr``. Imports aiohttp, ``routing.model``, ``pins.store`` (its
error type) and ``membership.sources`` / ``membership.shared``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import aiohttp

from affinity_proxy.membership.shared import SharedState
from affinity_proxy.membership.sources import DiscoveryError, MachineAddressing
from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.routing.model import Instance, InstanceState, is_valid_instance_id

log = logging.getLogger("affinity_proxy.discovery.api")

DEFAULT_API_URL = "http://_api.internal:4280"
GONE_STATES = frozenset({"destroying", "destroyed", "replaced", "migrated"})
STATE_MAP: Mapping[str, InstanceState] = MappingProxyType({
    "started": InstanceState.UP,
    "updating": InstanceState.UP,
    "replacing": InstanceState.UP,
    "restarting": InstanceState.UP,
    "created": InstanceState.STOPPED,
    "creating": InstanceState.STOPPED,
    "starting": InstanceState.STOPPED,
    "stopping": InstanceState.STOPPED,
    "stopped": InstanceState.STOPPED,
    "suspending": InstanceState.STOPPED,
    "suspended": InstanceState.STOPPED,
    "failed": InstanceState.DOWN,
    "launch_failed": InstanceState.DOWN,
})
_BODY_QUOTE_LIMIT = 200
#: Longest back-off after 429 (seconds), whatever ``Retry-After`` says.
MAX_BACKOFF = 300.0
#: How many poll intervals a shared answer stays readable (a poller that died is replaced sooner).
SHARED_INTERVALS = 3


def machine_state(state: str) -> InstanceState | None:
    """The ``InstanceState`` of a Machine state per the module table; None when it is gone for good.
    Unknown states are STOPPED. Pure."""
    if state in GONE_STATES:
        return None
    return STATE_MAP.get(state, InstanceState.STOPPED)


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the delta-seconds form, capped at ``MAX_BACKOFF``); None when
    absent or in another form (an HTTP date). Pure."""
    text = value.strip() if isinstance(value, str) else ""
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        return None
    return min(float(text), MAX_BACKOFF)


def backoff_delay(streak: int, interval: float, hint: float | None, jitter: float) -> float:
    """Seconds to wait after the ``streak``-th 429 in a row: ``hint`` (``Retry-After``) when given,
    else ``interval`` doubled per 429 after the first, at most ``MAX_BACKOFF``; then ``jitter``
    (0..1) adds up to 20 %. Pure."""
    base = hint if hint is not None else min(MAX_BACKOFF, max(interval, 1.0) * 2 ** min(max(streak, 1) - 1, 16))
    return base * (1 + 0.2 * min(max(jitter, 0.0), 1.0))


def machines_url(api_url: str, app: str) -> str:
    """The list URL. ``api_url`` may be the bare host (``http://_api.internal:4280``) or already end
    in ``/v1`` (``https://api.machines.dev/v1``)."""
    base = api_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return f"{base}/apps/{app}/machines"


class FlyMachinesApiSource:
    """``MembershipSource`` over the Machines API; see the module docstring for the state table.

    ``fetch`` makes at most one GET bounded by ``timeout`` seconds through ``session`` (owned by
    the caller, who closes it); with ``shared`` only when this node is the app's poller for this
    round, else it reads the poller's shared answer (module docstring). With ``process_group``
    only that group's Machines are listed (the API's ``metadata.fly_process_group`` filter).
    Raises ``DiscoveryError`` on a connection error, a timeout, a non-2xx answer, a body that is
    not a JSON array, while backing off after 429, and when no shared answer exists yet; entries
    without a valid ``id`` are skipped (debug log). Call from one task at a time.
    """

    def __init__(
        self,
        app: str,
        *,
        api_url: str = DEFAULT_API_URL,
        token: str,
        local_machine_id: str,
        private_url: str,
        private_port: int,
        local_upstream: str,
        session: aiohttp.ClientSession,
        timeout: float = 5.0,
        process_group: str | None = None,
        shared: SharedState | None = None,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not token or not token.strip():
            raise ValueError("the Machines API needs a token (FLY_API_TOKEN)")
        self.app = app
        self.url = machines_url(api_url, app)
        self.timeout = timeout
        self.process_group = process_group
        self.addressing = MachineAddressing(app, local_machine_id, local_upstream, private_url, private_port)
        self._session = session
        self._token = token.strip()
        scheme_given = self._token.startswith(("FlyV1 ", "Bearer "))
        self._authorization = self._token if scheme_given else f"Bearer {self._token}"
        self._warned_states: set[str] = set()
        self._shared = shared
        self.interval = interval
        self.name = f"machines-api:{app}:{process_group or '*'}"  # lock and shared answer
        self._clock = clock
        self._jitter = jitter
        self._streak = 0  # 429 answers in a row
        self._not_before = 0.0  # this node's own back-off (clock)
        self.calls = 0  # list calls made by this node
        self.store_failing = False

    def __repr__(self) -> str:
        return f"FlyMachinesApiSource(app={self.app!r}, url={self.url!r}, token=<redacted>)"

    async def fetch(self) -> list[Instance]:
        if self._shared is None:
            return self._instances(await self._poll())
        try:
            machines = await self._fetch_shared(self._shared)
        except PinStoreUnavailable as exc:
            if not self.store_failing:
                log.warning("shared state unreachable; polling the Machines API from this node: %s", exc)
            self.store_failing = True
            return self._instances(await self._poll())
        if self.store_failing:
            log.info("shared state reachable again; one node of the app polls the Machines API")
        self.store_failing = False
        return self._instances(machines)

    async def _fetch_shared(self, shared: SharedState) -> list[Any]:
        """Poll when this node holds the round's lock (and nobody backs off), else read the shared
        answer. Raises ``DiscoveryError`` and ``PinStoreUnavailable``."""
        if await shared.get_value(self.name + ":backoff") is None and self._clock() >= self._not_before:
            if await shared.acquire_lock(self.name, self.interval) is not None:
                machines = await self._poll(shared)
                await shared.put_value(self.name, json.dumps(machines, separators=(",", ":")),
                                       SHARED_INTERVALS * self.interval)
                return machines
        raw = await shared.get_value(self.name)
        if raw is None:
            raise DiscoveryError(f"no Machines API answer shared yet ({self.name}); another node polls, or backs off")
        try:
            machines = json.loads(raw)
        except ValueError:
            raise DiscoveryError(f"the shared Machines API answer {self.name} is not JSON") from None
        if not isinstance(machines, list):
            raise DiscoveryError(f"the shared Machines API answer {self.name} is not a list")
        return machines

    async def _poll(self, shared: SharedState | None = None) -> list[Any]:
        """One list call (unless backing off): the Machines as ``{id, state, region}``. A 429
        starts or extends the back-off, shared through ``shared`` when given."""
        wait = self._not_before - self._clock()
        if wait > 0:
            raise DiscoveryError(f"Machines API: backing off after HTTP 429 for another {wait:.1f}s")
        try:
            machines = await self._get()
        except _RateLimited as limited:
            self._streak += 1
            delay = backoff_delay(self._streak, self.interval, limited.retry_after, self._jitter())
            self._not_before = self._clock() + delay
            if shared is not None:
                await shared.put_value(self.name + ":backoff", str(self._streak), delay)
            log.warning("Machines API rate limit (HTTP 429, %d in a row): no list call for %.1fs",
                        self._streak, delay)
            raise DiscoveryError(f"Machines API GET {self.url} answered HTTP 429; backing off {delay:.1f}s") from None
        self._streak = 0
        return [{"id": m.get("id"), "state": m.get("state"), "region": m.get("region")}
                for m in machines if isinstance(m, dict)]

    async def _get(self) -> list[Any]:
        """The list call itself. Raises ``_RateLimited`` for 429, ``DiscoveryError`` otherwise."""
        self.calls += 1
        params = {"metadata.fly_process_group": self.process_group} if self.process_group else None
        try:
            async with self._session.get(
                self.url,
                params=params,
                headers={"Authorization": self._authorization, "Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                status = resp.status
                hint = retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:  # aiohttp's timeouts are TimeoutError subclasses
            raise DiscoveryError(f"Machines API GET {self.url}: no answer within {self.timeout}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise DiscoveryError(f"Machines API GET {self.url} failed: {self._scrub(repr(exc))}") from None
        if status == 429:
            raise _RateLimited(hint)
        if not 200 <= status < 300:
            check = " (check FLY_API_TOKEN)" if status in (401, 403) else ""
            raise DiscoveryError(f"Machines API GET {self.url} answered HTTP {status}{check}: {self._quote(body)}")
        try:
            machines = json.loads(body)
        except ValueError:
            raise DiscoveryError(f"Machines API GET {self.url}: the answer is not JSON: {self._quote(body)}") from None
        if not isinstance(machines, list):
            raise DiscoveryError(
                f"Machines API GET {self.url}: expected a JSON array of machines, got {type(machines).__name__}"
            )
        return machines

    def _instances(self, machines: list[Any]) -> list[Instance]:
        out: list[Instance] = []
        seen: set[str] = set()
        for machine in machines:
            machine_id = machine.get("id") if isinstance(machine, dict) else None
            if not isinstance(machine_id, str) or not is_valid_instance_id(machine_id) or machine_id in seen:
                log.debug("skipping a Machines API entry without a valid, new id: %.100r", machine)
                continue
            raw_state = machine.get("state")
            state_name = raw_state if isinstance(raw_state, str) else ""
            state = machine_state(state_name)
            if state is None:
                continue
            if state_name not in STATE_MAP and state_name not in self._warned_states:
                self._warned_states.add(state_name)
                log.warning("unknown Machine state %r (machine %s); treating it as stopped", state_name, machine_id)
            region = machine.get("region")
            seen.add(machine_id)
            out.append(self.addressing.instance(machine_id, region if isinstance(region, str) else "", state))
        return out

    def _scrub(self, text: str) -> str:
        bare = self._token.split(" ", 1)[-1] if " " in self._token else self._token
        for secret in (self._token, bare):
            if secret:
                text = text.replace(secret, "<redacted>")
        return text

    def _quote(self, body: bytes) -> str:
        text = self._scrub(body.decode("utf-8", "replace")).strip()
        if len(text) > _BODY_QUOTE_LIMIT:
            text = text[:_BODY_QUOTE_LIMIT] + "..."
        return repr(text) if text else "(empty body)"



class _RateLimited(Exception):
    """The API answered 429; ``retry_after`` is its ``Retry-After`` in seconds, if any."""

    def __init__(self, retry_after: float | None) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after
