"""PrivateNet: how a fly-mode node reaches another Machine over Fly's private network (6PN).

Why it exists (facts from Fly's docs, copied to docs/fly-private-network.md):

- 6PN is IPv6 only: ``<id>.vm.<app>.internal`` has AAAA records (``fdaa::/16``) and nothing else,
  served by Fly's resolver at ``fdaa::3`` (the one ``/etc/resolv.conf`` names on a Machine).
- Those AAAA records list only *started* Machines: a stopped or suspended Machine's name does not
  resolve, and only Fly's proxy starts Machines by itself (a replay does; a private-network
  connection does not).

So a private forward (a body Fly cannot replay) resolves ``.internal`` names itself, AAAA only,
at ``fly.dns_server`` (on Fly the same resolver the system uses; in tests and the local Fly
stand-in a DNS server on loopback), and when the name of a Machine does not resolve it **wakes the
Machine through the Machines API** (``POST {fly.api_url}/v1/apps/{app}/machines/{id}/start`` with
``fly.api_token``), then waits, at most ``fly.wake_timeout``, until the name resolves and the port
takes a connection. Concurrent requests for one Machine share one wake; the start call is made at
most once a second per Machine (the API allows 1 request/s per action and Machine, bursts of 3).

Answers are cached for the record's TTL, at most ``MAX_TTL`` s, and dropped on a connect failure
(a Machine that stopped since keeps its cached address until then). ``PrivateNameError`` is an
``OSError``, so both engines treat it as a connect failure (nothing was sent). Imports dnspython,
aiohttp and ``membership.fly_dns``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from affinity_proxy._tasks import TaskSet
from affinity_proxy.config import FlyConfig
from affinity_proxy.membership.fly_dns import EDNS_PAYLOAD, split_server

DEFAULT_API_URL = "http://_api.internal:4280"

log = logging.getLogger("affinity_proxy.private_net")

T = TypeVar("T")

#: Longest time an answer is reused (Fly's internal DNS answers with a TTL of 5 s).
MAX_TTL = 5.0
#: Fewest seconds between two start calls for one Machine (the Machines API's rate limit).
START_INTERVAL = 1.0
_MAX_CACHED = 4096
_MACHINE_NAME = re.compile(r"^(?P<id>[a-z0-9]+)\.vm\.(?P<app>[a-z0-9-]+)\.internal\.?$", re.IGNORECASE)
_FIRST_POLL, _MAX_POLL = 0.05, 0.5


class PrivateNameError(OSError):
    """A private name could not be turned into a reachable address (no AAAA record, resolver
    failure, wake refused or timed out). An ``OSError``: to the caller it is a connect failure."""


class NotStarted(PrivateNameError):
    """The name has no AAAA record: the Machine is not started (or does not exist)."""


def machines_base(api_url: str) -> str:
    """``{api_url}/v1`` (``api_url`` may already end in ``/v1``, like ``https://api.machines.dev/v1``)."""
    base = api_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def is_private_name(host: str) -> bool:
    """A name in Fly's private DNS zone (``*.internal``), resolved here rather than by the system."""
    return host.rstrip(".").lower().endswith(".internal")


def machine_of(host: str) -> tuple[str, str] | None:
    """``(machine id, app)`` of ``<id>.vm.<app>.internal``, else None."""
    found = _MACHINE_NAME.fullmatch(host)
    return (found["id"], found["app"]) if found else None


class PrivateNet:
    """Resolves ``*.internal`` names (AAAA only) and wakes stopped Machines; see the module docstring.

    ``fly`` returns the current ``fly`` config section (read per wake, so a reload of
    ``fly.api_url``, ``fly.api_token`` or ``fly.wake_timeout`` applies); ``dns_server`` is fixed.
    ``session`` returns the HTTP session used for the Machines API (the process's upstream client,
    whose resolver is this object, so ``_api.internal`` resolves here too). Without ``api_token``
    a stopped Machine cannot be woken: the forward fails as a connect failure and a warning says
    why. One per event loop.
    """

    def __init__(
        self,
        fly: Callable[[], FlyConfig],
        *,
        session: Callable[[], aiohttp.ClientSession] | None = None,
        dns_timeout: float = 2.0,
    ) -> None:
        self._fly = fly
        self.host, self.port = split_server(fly().dns_server, 53)
        self._session = session
        self._dns_timeout = dns_timeout
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.lifetime = dns_timeout
        self._resolver.timeout = dns_timeout / 2
        self._resolver.use_edns(0, 0, EDNS_PAYLOAD)
        self._resolver.cache = None
        self._server_ip: str | None = None
        self._cache: dict[str, tuple[float, list[str]]] = {}
        self._wakes: dict[str, asyncio.Task[PrivateNameError | None]] = {}
        self._tasks = TaskSet()
        self._last_start: dict[str, float] = {}
        self._warned_token = False
        #: Machines woken (start call accepted, or already starting); for metrics and tests.
        self.wakes = 0

    # ------------------------------------------------------------------ resolution

    async def addresses(self, host: str) -> list[str]:
        """The IPv6 addresses of ``host`` (cached for the TTL). ``NotStarted`` when it has none."""
        key = host.rstrip(".").lower()
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        addrs, ttl = await self._query(key)
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[key] = (now + min(ttl, MAX_TTL), addrs)
        return addrs

    def forget(self, host: str) -> None:
        """Drop a cached answer (its address refused a connection)."""
        self._cache.pop(host.rstrip(".").lower(), None)

    async def _query(self, name: str) -> tuple[list[str], float]:
        self._resolver.nameservers = [dns.nameserver.Do53Nameserver(await self._nameserver(), self.port)]
        try:
            async with asyncio.timeout(self._dns_timeout):  # dnspython may back off past its lifetime
                answer = await self._resolver.resolve(name + ".", dns.rdatatype.AAAA, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise NotStarted(f"{name} does not resolve (NXDOMAIN at {self._server()})") from None
        except (TimeoutError, dns.resolver.LifetimeTimeout):
            raise PrivateNameError(f"AAAA {name} at {self._server()}: no answer within {self._dns_timeout}s") from None
        except (dns.exception.DNSException, OSError) as exc:
            raise PrivateNameError(f"AAAA {name} at {self._server()} failed: {exc!r}") from None
        if answer.rrset is None or not len(answer.rrset):
            raise NotStarted(f"{name} has no AAAA record at {self._server()} (a stopped Machine has none)")
        return [rdata.address for rdata in answer.rrset], float(answer.rrset.ttl)

    async def _nameserver(self) -> str:
        if self._server_ip is None:
            try:
                ipaddress.ip_address(self.host)
                self._server_ip = self.host
            except ValueError:
                try:
                    infos = await asyncio.get_running_loop().getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
                except OSError as exc:
                    raise PrivateNameError(f"cannot resolve the DNS server name {self.host!r}: {exc}") from exc
                self._server_ip = str(infos[0][4][0])
        return self._server_ip

    def _server(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    # ------------------------------------------------------------------ connecting (and waking)

    async def open(self, host: str, port: int, connect: Callable[[str], Awaitable[T]], connect_timeout: float) -> T:
        """``connect(address)`` to ``host``: resolve (waking a stopped Machine, at most
        ``wake_timeout``), connect (at most ``connect_timeout``); after a refused or failed
        connect the name is looked up afresh and connected to once more (a cached address of a
        Machine that stopped since); a Machine that had to be woken gets refused connects retried
        until the wake deadline (it may not listen yet).
        Raises ``OSError`` (``PrivateNameError`` for resolution and waking) or ``TimeoutError``."""
        deadline = time.monotonic() + self._fly().wake_timeout
        addrs, woke = await self._reachable(host, deadline)
        if not woke:
            try:
                async with asyncio.timeout(connect_timeout):
                    return await connect(addrs[0])
            except (OSError, TimeoutError) as first:
                self.forget(host)
                log.info("private network: %s at %s failed (%s); looking it up again", host, addrs[0], first)
            addrs, woke = await self._reachable(host, deadline)
        if woke:  # just started: its server may not listen yet
            return await self._connect_until(addrs, port, connect, connect_timeout, deadline)
        async with asyncio.timeout(connect_timeout):
            return await connect(addrs[0])

    async def _connect_until(self, addrs: list[str], port: int, connect: Callable[[str], Awaitable[T]],
                             connect_timeout: float, deadline: float) -> T:
        """A Machine that has just started may not listen yet: retry refused connects until the deadline."""
        delay = _FIRST_POLL
        while True:
            try:
                async with asyncio.timeout(connect_timeout):
                    return await connect(addrs[0])
            except ConnectionRefusedError:
                if time.monotonic() + delay >= deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_POLL)

    async def _reachable(self, host: str, deadline: float) -> tuple[list[str], bool]:
        """The addresses of ``host``, and whether it had to be woken first."""
        try:
            return await self.addresses(host), False
        except NotStarted:
            target = machine_of(host)
            if target is None:
                raise
        machine, app = target
        task = self._wakes.get(machine)
        if task is None or task.done():
            task = self._wakes[machine] = self._tasks.spawn(self._wake(machine, app, host, deadline), name="wake")
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                failed = await asyncio.shield(task)  # a request that goes away does not cancel the others' wake
        except TimeoutError:
            failed = self._late(machine)
        if failed is not None:
            raise type(failed)(str(failed))  # one exception object per waiter
        return await self.addresses(host), True

    def _late(self, machine: str) -> PrivateNameError:
        return PrivateNameError(f"machine {machine} did not start within {self._fly().wake_timeout}s")

    async def close(self) -> None:
        """Cancel wakes in progress (shutdown)."""
        await self._tasks.close()

    async def _wake(self, machine: str, app: str, host: str, deadline: float) -> PrivateNameError | None:
        """Start ``machine`` (unless a start was asked for less than a second ago) and wait until its
        name resolves; the error every waiter gets, or None."""
        now = time.monotonic()
        try:
            if now - self._last_start.get(machine, -START_INTERVAL) >= START_INTERVAL:
                self._last_start[machine] = now
                await self._start(machine, app)
            delay = _FIRST_POLL
            while True:
                try:
                    await self.addresses(host)
                    return None
                except NotStarted:
                    if time.monotonic() + delay >= deadline:
                        return self._late(machine)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_POLL)
        except PrivateNameError as exc:
            return exc

    async def _start(self, machine: str, app: str) -> None:
        """``POST /v1/apps/{app}/machines/{id}/start``. 429 (someone else is starting it) and a
        refusal because it is starting or started already are fine: the name is polled anyway."""
        fly = self._fly()
        token = fly.api_token
        if not token or self._session is None:
            if not self._warned_token:
                self._warned_token = True
                log.warning("machine %s is not started and cannot be woken for a private-network forward: "
                            "set fly.api_token (FLY_API_TOKEN) so the Machines API can start it", machine)
            raise NotStarted(f"machine {machine} is not started and fly.api_token is not set to start it")
        url = f"{machines_base(fly.api_url or DEFAULT_API_URL)}/apps/{app}/machines/{machine}/start"
        authorization = token if token.startswith(("FlyV1 ", "Bearer ")) else f"Bearer {token}"
        try:
            async with self._session().post(url, headers={"Authorization": authorization}) as resp:
                body = (await resp.read())[:200].decode("utf-8", "replace").replace(token, "***")
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise PrivateNameError(f"Machines API start of {machine} failed: {type(exc).__name__}") from None
        if status < 300:
            self.wakes += 1
            log.info("private network: started machine %s to forward a request to it", machine)
        elif status in (409, 412, 429):  # already starting/started, or another node just asked
            log.info("private network: start of machine %s answered %d (%s); waiting for it", machine, status, body)
        else:
            raise PrivateNameError(f"Machines API start of {machine} answered {status}: {body}")


class PrivateNetResolver(aiohttp.abc.AbstractResolver):
    """aiohttp resolver: ``*.internal`` names through ``PrivateNet`` (AAAA only), others through
    aiohttp's default resolver. A stopped Machine's name does not resolve here; the aiohttp engine
    wakes it with ``PrivateNet.open`` before it forwards."""

    def __init__(self, net: PrivateNet) -> None:
        self.net = net
        self._default = aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[aiohttp.abc.ResolveResult]:
        if not is_private_name(host):
            return await self._default.resolve(host, port, family)
        return [
            {"hostname": host, "host": address, "port": port, "family": socket.AF_INET6, "proto": 0,
             "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV}
            for address in await self.net.addresses(host)
        ]

    async def close(self) -> None:
        await self._default.close()


async def probe(address: str, port: int) -> None:
    """Open and close one TCP connection (``PrivateNet.open``'s ``connect`` for the aiohttp engine,
    whose connector then connects for real)."""
    _reader, writer = await asyncio.open_connection(address, port)
    writer.close()
    try:
        await writer.wait_closed()
    except OSError as exc:
        log.debug("closing a probe connection to [%s]:%d: %s", address, port, exc)
