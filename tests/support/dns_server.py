"""A tiny real DNS server for tests: UDP and TCP on 127.0.0.1, one free port, TXT and AAAA records.

Built on dnspython's message parsing (``dns.message.from_wire``/``make_response``), so what the
client under test sees is real DNS on the wire: multi-string TXT data, NXDOMAIN, SERVFAIL, answers
too big for UDP (sent truncated, so the client must retry over TCP) and silence (a timeout).
Everything is changeable while it runs. Use ``async with DnsServer() as server`` (or ``start()``
/``stop()``); ``server.port`` is known once started.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field
from typing import cast

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

UDP_LIMIT_NO_EDNS = 512


def _key(name: str | dns.name.Name) -> dns.name.Name:
    return name if isinstance(name, dns.name.Name) else dns.name.from_text(name.rstrip(".") + ".")


@dataclass
class DnsServer:
    """TXT and AAAA authoritative stand-in. A name with records answers them (NOERROR with no data
    for a type it has none of); a name in ``servfail`` answers SERVFAIL; any other name is NXDOMAIN
    (or NOERROR with no data, see ``set_empty``).
    With ``silent`` set, queries are read (and recorded) and never answered."""

    host: str = "127.0.0.1"
    ttl: int = 5
    silent: bool = False
    drop: int = 0  # leave this many more queries unanswered (a lost packet), then answer again
    queries: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, "udp"|"tcp")
    _txt: dict[dns.name.Name, list[tuple[bytes, ...]]] = field(default_factory=dict)
    _aaaa: dict[dns.name.Name, list[str]] = field(default_factory=dict)
    _empty: set[dns.name.Name] = field(default_factory=set)
    _servfail: set[dns.name.Name] = field(default_factory=set)
    _silent: set[dns.name.Name] = field(default_factory=set)
    _udp: asyncio.DatagramTransport | None = None
    _tcp: asyncio.Server | None = None
    port: int = 0

    # -- records -------------------------------------------------------------------------------

    def set_txt(self, name: str, *records: str | bytes | tuple[str | bytes, ...]) -> None:
        """Serve these TXT records for ``name``; each is one string or a tuple of strings (one record
        made of several character-strings, as DNS splits long data)."""
        key = _key(name)
        self._servfail.discard(key)
        self._empty.discard(key)
        out: list[tuple[bytes, ...]] = []
        for record in records:
            parts = record if isinstance(record, tuple) else (record,)
            out.append(tuple(p.encode() if isinstance(p, str) else p for p in parts))
        self._txt[key] = out

    def set_aaaa(self, name: str, *addresses: str) -> None:
        """Serve these AAAA records for ``name`` (IPv6 addresses as text)."""
        key = _key(name)
        self._servfail.discard(key)
        self._empty.discard(key)
        self._aaaa[key] = list(addresses)

    def set_nxdomain(self, name: str) -> None:
        key = _key(name)
        self._txt.pop(key, None)
        self._aaaa.pop(key, None)
        self._empty.discard(key)
        self._servfail.discard(key)

    def set_empty(self, name: str) -> None:
        """The name exists but has no TXT data (NOERROR, empty answer)."""
        self.set_nxdomain(name)
        self._empty.add(_key(name))

    def set_servfail(self, name: str) -> None:
        self.set_nxdomain(name)
        self._servfail.add(_key(name))

    def set_silent(self, name: str, silent: bool = True) -> None:
        """Never answer queries for ``name`` (its records, if any, stay for when this is undone)."""
        (self._silent.add if silent else self._silent.discard)(_key(name))

    def query_count(self, name: str) -> int:
        key = _key(name).to_text()
        return sum(1 for q in self.queries if q[0] == key)

    # -- answering -----------------------------------------------------------------------------

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """The response to one query message, or None to stay silent (bad input or ``silent``)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        self.queries.append((question.name.to_text(), dns.rdatatype.to_text(question.rdtype), transport))
        if self.silent or question.name in self._silent:
            return None
        if self.drop > 0:
            self.drop -= 1
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        key = question.name
        if key in self._servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif key in self._txt or key in self._aaaa:
            if question.rdtype in (dns.rdatatype.TXT, dns.rdatatype.ANY) and self._txt.get(key):
                rrset = dns.rrset.RRset(key, dns.rdataclass.IN, dns.rdatatype.TXT)
                for strings in self._txt[key]:
                    rrset.add(dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings), self.ttl)
                response.answer.append(rrset)
            if question.rdtype in (dns.rdatatype.AAAA, dns.rdatatype.ANY) and self._aaaa.get(key):
                rrset = dns.rrset.RRset(key, dns.rdataclass.IN, dns.rdatatype.AAAA)
                for address in self._aaaa[key]:
                    rrset.add(dns.rdtypes.IN.AAAA.AAAA(dns.rdataclass.IN, dns.rdatatype.AAAA, address), self.ttl)
                response.answer.append(rrset)
        elif key not in self._empty:
            response.set_rcode(dns.rcode.NXDOMAIN)
        if transport == "tcp":
            return response.to_wire(max_size=65535)
        limit = max(query.payload, UDP_LIMIT_NO_EDNS) if query.edns >= 0 else UDP_LIMIT_NO_EDNS
        return response.to_wire(max_size=limit, prefer_truncation=True)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # UDP gets a free port; TCP must get the same one (rarely taken)
            udp, _proto = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), local_addr=(self.host, 0))
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError:
                udp.close()
                continue
            self._udp, self.port = udp, port
            return self
        raise RuntimeError("no port free for both UDP and TCP")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None

    async def __aenter__(self) -> DnsServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def address(self) -> str:
        """``host:port``, the form ``fly.dns_server`` accepts."""
        return f"{self.host}:{self.port}"

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = self.answer(await reader.readexactly(length), "tcp")
                if reply is None:
                    continue
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.server.answer(data, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)
