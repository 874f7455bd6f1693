"""FlyNetwork: the local stand-in for Fly's private network (6PN), its DNS and the Machines API start call.

What it models, with the source of each behaviour (facts copied into docs/fly-private-network.md;
docs/fly-protocol.md is the project's collected Fly documentation notes, "DOCS" the superfly/docs repository):

- **6PN is IPv6 only** (docs/fly-protocol.md §4, DOCS networking/private-networking): ``<id>.vm.<app>.internal``
  has AAAA records only. Here every Machine's name resolves to ``::1`` (all Machines share the
  loopback), an ``A`` query gets an empty answer, so a node whose listener takes IPv4 only cannot
  be reached over the private network, exactly as on Fly.
- **Only started Machines resolve** (docs/fly-protocol.md §4: "All AAAA answers include only started
  Machines"): a stopped Machine's name is NXDOMAIN until it is started. ``vms.<app>.internal``
  (TXT) lists started Machines, ``all.vms.<app>.internal`` all of them (docs/fly-protocol.md §4, TXT format
  ``"<id> <region>,..."``, confirmed only by third-party code).
- **The resolver**: Fly's is at ``fdaa::3``; here a UDP+TCP DNS server on ``[::1]:<port>``
  (``dns_server``), answering with a TTL of 5 s (the TTL in the docs' ``dig`` example).
- **Machines API** (docs/fly-protocol.md §4; DOCS machines/api/machines-resource, working-with-machines-api):
  ``_api.internal`` resolves (AAAA ``::1``) to a small API on ``[::1]``: ``POST
  /v1/apps/{app}/machines/{id}/start`` with ``Authorization: Bearer <token>`` (401 without it,
  404 for an unknown app or Machine), rate limited per Machine and action to 1 request/s with
  bursts of 3 (429 beyond). It answers at once and the Machine boots in the background, so a
  caller must wait until the name resolves (GUESS: whether Fly's call returns before the Machine
  is started is not documented; waiting for DNS is right either way). Starting a started Machine
  answers 200 (GUESS). ``GET /v1/apps/{app}/machines`` lists the Machines (id, state, region,
  ``private_ip``).
- Booting and stopping a Machine is the owner's (``on_start``/``on_stop``, e.g. the demo cluster
  starts or stops that Machine's node and app).

Test/demo tool: one event loop, one app. ``queries`` records every DNS question (name, type).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.AAAA
import dns.rrset
from aiohttp import web

__all__ = ["FlyNetwork"]

log = logging.getLogger("affinity_proxy.fly.network")

LOOPBACK6 = "::1"
DNS_TTL = 5
_API_RATE, _API_BURST = 1.0, 3.0
_UDP_LIMIT = 512

MachineHook = Callable[[str], Awaitable[None]]


@dataclass
class _Bucket:
    tokens: float = _API_BURST
    at: float = field(default_factory=time.monotonic)

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(_API_BURST, self.tokens + (now - self.at) * _API_RATE)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class FlyNetwork:
    """Fly's private network for one app; see the module docstring. ``start()`` binds the DNS server
    and the Machines API on ``::1``; ``dns_server`` and ``api_url`` are then what a node's
    ``fly.dns_server`` and ``fly.api_url`` should say.

    ``machines`` maps a Machine id to its state (``started``/``stopped``) and ``regions`` to its
    region. ``start_machine`` (also the API's start call) runs ``on_start(id)`` once and then marks
    it started; ``stop_machine`` marks it stopped (its name stops resolving at once) and runs
    ``on_stop(id)``. Counters: ``start_calls`` (API start requests accepted), ``rate_limited``.
    """

    def __init__(self, app: str, *, token: str, region: str = "lcl",
                 on_start: MachineHook | None = None, on_stop: MachineHook | None = None) -> None:
        self.app = app
        self.token = token
        self.region = region
        self.on_start = on_start
        self.on_stop = on_stop
        self.machines: dict[str, str] = {}
        self.regions: dict[str, str] = {}
        self.queries: list[tuple[str, str]] = []
        self.start_calls = 0
        self.rate_limited = 0
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._booting: dict[str, asyncio.Task[None]] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._api: web.AppRunner | None = None
        self.dns_port = 0
        self.api_port = 0

    # ------------------------------------------------------------------ addresses

    @property
    def dns_server(self) -> str:
        return f"[{LOOPBACK6}]:{self.dns_port}"

    @property
    def api_url(self) -> str:
        return f"http://_api.internal:{self.api_port}"

    def machine_name(self, machine_id: str) -> str:
        return f"{machine_id}.vm.{self.app}.internal"

    # ------------------------------------------------------------------ machines

    def add_machine(self, machine_id: str, state: str = "started", region: str | None = None) -> None:
        self.machines[machine_id] = state
        self.regions[machine_id] = region or self.region

    async def start_machine(self, machine_id: str) -> None:
        """Boot a stopped Machine (one boot for concurrent callers); a started one is left alone."""
        if self.machines.get(machine_id) != "stopped":
            return
        task = self._booting.get(machine_id)
        if task is None or task.done():
            task = self._booting[machine_id] = asyncio.get_running_loop().create_task(self._boot(machine_id))
        await asyncio.shield(task)

    async def _boot(self, machine_id: str) -> None:
        if self.on_start is not None:
            await self.on_start(machine_id)
        self.machines[machine_id] = "started"
        log.info("machine %s started", machine_id)

    async def stop_machine(self, machine_id: str) -> None:
        self.machines[machine_id] = "stopped"
        if self.on_stop is not None:
            await self.on_stop(machine_id)

    # ------------------------------------------------------------------ DNS

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """The response to one DNS query (None: unparsable, stay silent)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        self.queries.append((name, dns.rdatatype.to_text(question.rdtype)))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        known, aaaa, txt = self._records(name)
        if not known:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.AAAA and aaaa:
            rrset = dns.rrset.RRset(question.name, dns.rdataclass.IN, dns.rdatatype.AAAA)
            rrset.add(dns.rdtypes.IN.AAAA.AAAA(dns.rdataclass.IN, dns.rdatatype.AAAA, LOOPBACK6), DNS_TTL)
            response.answer.append(rrset)
        elif question.rdtype == dns.rdatatype.TXT and txt is not None:
            rrset = dns.rrset.RRset(question.name, dns.rdataclass.IN, dns.rdatatype.TXT)
            rrset.add(dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [txt.encode()]), DNS_TTL)
            response.answer.append(rrset)
        # any other type (A included: 6PN has no IPv4) -> NOERROR with no data
        if transport == "tcp":
            return response.to_wire(max_size=65535)
        limit = max(query.payload, _UDP_LIMIT) if query.edns >= 0 else _UDP_LIMIT
        return response.to_wire(max_size=limit, prefer_truncation=True)

    def _records(self, name: str) -> tuple[bool, bool, str | None]:
        """(name exists, has AAAA, TXT text) for ``name``."""
        if name == "_api.internal":
            return True, True, None
        started = [m for m, s in self.machines.items() if s == "started"]
        if name == f"vms.{self.app}.internal":
            return True, False, ",".join(f"{m} {self.regions[m]}" for m in started)
        if name == f"all.vms.{self.app}.internal":
            return True, False, ",".join(f"{m} {self.regions[m]}" for m in self.machines)
        for machine_id in started:  # only started Machines resolve (docs/fly-protocol.md §4)
            if name == self.machine_name(machine_id):
                return True, True, None
        return False, False, None

    # ------------------------------------------------------------------ Machines API

    def _api_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/apps/{app}/machines/{id}/start", self._api_start)
        app.router.add_get("/v1/apps/{app}/machines", self._api_list)
        return app

    def _api_check(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        if request.match_info["app"] != self.app:
            return web.json_response({"error": "app not found"}, status=404)
        return None

    async def _api_start(self, request: web.Request) -> web.Response:
        refused = self._api_check(request)
        if refused is not None:
            return refused
        machine_id = request.match_info["id"]
        previous = self.machines.get(machine_id)
        if previous is None:
            return web.json_response({"error": "machine not found"}, status=404)
        if not self._buckets.setdefault((machine_id, "start"), _Bucket()).take():
            self.rate_limited += 1
            return web.json_response({"error": "rate limit exceeded"}, status=429)
        self.start_calls += 1
        if previous == "stopped":  # boots in the background: the caller waits for the name to resolve
            task = self._booting.get(machine_id)
            if task is None or task.done():
                self._booting[machine_id] = asyncio.get_running_loop().create_task(self._boot(machine_id))
        return web.json_response({"previous_state": previous, "migrated": False, "new_host": ""})

    async def _api_list(self, request: web.Request) -> web.Response:
        refused = self._api_check(request)
        if refused is not None:
            return refused
        return web.json_response([
            {"id": m, "name": m, "state": s, "region": self.regions[m], "private_ip": LOOPBACK6,
             "config": {"metadata": {}}}
            for m, s in self.machines.items()
        ])

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # UDP gets a free port; TCP must get the same one (rarely taken)
            udp, _proto = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(LOOPBACK6, 0))
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, LOOPBACK6, port)
            except OSError:
                udp.close()
                continue
            self._udp, self.dns_port = udp, port
            break
        else:
            raise RuntimeError("no port free for both UDP and TCP on ::1")
        self._api = web.AppRunner(self._api_app(), access_log=None)
        await self._api.setup()
        site = web.TCPSite(self._api, LOOPBACK6, 0)
        await site.start()
        self.api_port = int(self._api.addresses[0][1])

    async def stop(self) -> None:
        for task in self._booting.values():
            task.cancel()
        for task in self._booting.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._booting.clear()
        if self._api is not None:
            await self._api.cleanup()
            self._api = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = self.answer(await reader.readexactly(length), "tcp")
                if reply is not None:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, network: FlyNetwork) -> None:
        self.network = network
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.network.answer(data, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)
