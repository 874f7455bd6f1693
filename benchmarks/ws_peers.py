"""The two ends of the WebSocket benchmark (issue #16): an echo instance and a ping-pong client.

Both are raw asyncio Protocols on uvloop (when installed) that speak just enough RFC 6455 for
the benchmark (small unfragmented binary frames, no extensions), so that the core they share
costs as little as possible per round trip and the proxy in between is what is measured.

- ``EchoServer``: answers the upgrade, then sends every data frame back unmasked.
- ``run_clients``: N connections, each sending one 64-byte masked binary frame at a time whose
  first 8 bytes are the connection's sequence number, and checking that the echo is that very
  frame (a dropped, duplicated or reordered message is counted, never skipped).

    python -m benchmarks.ws_peers --listen 127.0.0.1:9100     # the echo instance
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import cast

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MESSAGE_BYTES = 64


def accept_key(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def frame(opcode: int, payload: bytes, mask_key: bytes | None) -> bytes:
    """One FIN frame with a payload under 64 KiB, masked when ``mask_key`` is given."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask_key is not None else 0
    head += bytes([bit | n]) if n < 126 else bytes([bit | 126]) + n.to_bytes(2, "big")
    if mask_key is None:
        return head + payload
    return head + mask_key + _mask(payload, mask_key)


class EchoServer(asyncio.Protocol):
    """One instance-side connection: the upgrade, then every data frame echoed unmasked."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            del self.buf[:end + 4]
            if "upgrade: websocket" not in head.lower():  # a health check: plain 200, keep-alive
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                continue
            key = next((line.split(":", 1)[1].strip() for line in head.split("\r\n")[1:]
                        if line.lower().startswith("sec-websocket-key:")), "")
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                 b"Sec-WebSocket-Accept: " + accept_key(key.encode()) + b"\r\n\r\n")
            self.upgraded = True
        out = []
        while len(self.buf) >= 2:
            b0, b1 = self.buf[0], self.buf[1]
            n, pos = b1 & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    break
                n, pos = int.from_bytes(self.buf[2:4], "big"), 4
            elif n == 127:
                if len(self.buf) < 10:
                    break
                n, pos = int.from_bytes(self.buf[2:10], "big"), 10
            key = b""
            if b1 & 0x80:
                key = bytes(self.buf[pos:pos + 4])
                pos += 4
            if len(self.buf) < pos + n:
                break
            payload = bytes(self.buf[pos:pos + n])
            del self.buf[:pos + n]
            if key:
                payload = _mask(payload, key)
            opcode = b0 & 0x0F
            if opcode == 0x8:  # CLOSE: answer it and hang up
                out.append(frame(0x8, payload[:2], None))
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            if opcode == 0x9:
                out.append(frame(0xA, payload, None))
            elif opcode in (0x1, 0x2, 0x0):
                out.append(frame(opcode, payload, None))
        if out:
            self.transport.write(b"".join(out))


@dataclass
class ClientStats:
    """What every client connection saw: round trips, and echoes that were not the frame sent."""

    round_trips: int = 0
    wrong: int = 0
    errors: list[str] = field(default_factory=list)


class PingPong(asyncio.Protocol):
    """One client connection: one 64-byte message in flight, the next sent when its echo is checked."""

    def __init__(self, stats: ClientStats, path: str, host: str, interval: float = 0.0) -> None:
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.interval = interval  # seconds between sends (0: the next as soon as the echo is in)
        self.due = 0.0
        self.path = path
        self.host = host
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.idle: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # stopped, last echo in
        self.seq = 0
        self.running = False
        self.key = base64.b64encode(os.urandom(16))
        self.mask_key = os.urandom(4)
        self.filler = os.urandom(MESSAGE_BYTES - 8)
        self.expected = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {self.key.decode()}\r\n\r\n".encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.running:
            self.stats.errors.append(f"connection lost while running: {exc!r}")
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError(f"lost before the upgrade: {exc!r}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send_next(self) -> None:
        assert self.transport is not None
        self.seq += 1
        payload = self.seq.to_bytes(8, "big") + self.filler
        self.expected = payload
        self.transport.write(frame(0x2, payload, self.mask_key))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded.done():
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            del self.buf[:end + 4]
            if not head.startswith(b"HTTP/1.1 101") or accept_key(self.key) not in head:
                self.upgraded.set_exception(ConnectionError(f"no upgrade: {head[:300]!r}"))
                return
            self.upgraded.set_result(None)
        while len(self.buf) >= 2:
            n = self.buf[1] & 0x7F
            if n >= 126 or self.buf[1] & 0x80:
                self.stats.errors.append(f"unexpected frame header {bytes(self.buf[:2]).hex()}")
                self.buf.clear()
                return
            if len(self.buf) < 2 + n:
                return
            opcode, payload = self.buf[0] & 0x0F, bytes(self.buf[2:2 + n])
            del self.buf[:2 + n]
            if opcode != 0x2:
                if opcode == 0x8:
                    if self.running:
                        self.stats.errors.append(f"closed by the peer: {payload!r}")
                    assert self.transport is not None
                    self.transport.close()
                continue
            if payload != self.expected:
                self.stats.wrong += 1
            else:
                self.stats.round_trips += 1
            self.expected = b""
            if not self.running and not self.idle.done():
                self.idle.set_result(None)
            if self.running:
                if not self.interval:
                    self.send_next()
                    continue
                now, due = self.loop.time(), self.due
                self.due = max(due, now) + self.interval
                if due > now:
                    self.loop.call_at(due, self._send_if_running)
                else:
                    self.send_next()

    def _send_if_running(self) -> None:
        if self.running and self.transport is not None and not self.transport.is_closing():
            self.send_next()


async def run_clients(host: str, port: int, connections: int, warmup: float, duration: float,
                      measure: object, rate: float = 0.0) -> tuple[ClientStats, float, object, object]:
    """Connect ``connections`` clients, ping-pong for ``warmup`` s, then ``duration`` s measured
    (``rate`` round trips/s in all, paced per connection; 0: as fast as the echoes come back):
    ``measure()`` is called at the start and the end of the measured window (CPU counters).
    Returns the stats of the measured window, its length, and both ``measure()`` results."""
    loop = asyncio.get_running_loop()
    stats = ClientStats()
    conns: list[PingPong] = []
    for i in range(connections):
        _, proto = await loop.create_connection(
            lambda i=i: PingPong(stats, f"/ws?c={i}", f"{host}:{port}", connections / rate if rate else 0.0),
            host, port)
        conns.append(proto)
    await asyncio.wait_for(asyncio.gather(*(c.upgraded for c in conns)), 10)
    start = loop.time()
    for i, c in enumerate(conns):
        c.running = True
        c.due = start + c.interval * (1 + i / connections)  # staggered
        c.send_next()
    await asyncio.sleep(warmup)
    assert callable(measure)
    before, rt0, wrong0, t0 = measure(), stats.round_trips, stats.wrong, time.perf_counter()
    await asyncio.sleep(duration)
    after, rt1, wrong1, t1 = measure(), stats.round_trips, stats.wrong, time.perf_counter()
    for c in conns:
        c.running = False
    for c in conns:
        if not c.expected and not c.idle.done():
            c.idle.set_result(None)
    await asyncio.wait([c.idle for c in conns], timeout=10)  # the last echoes come back (the machine may be busy)
    for c in conns:
        if c.expected:
            stats.errors.append(f"connection {conns.index(c)}: message {c.seq} never echoed")
        assert c.transport is not None
        c.transport.write(frame(0x8, (1000).to_bytes(2, "big"), c.mask_key))
    await asyncio.wait([c.closed for c in conns], timeout=5)
    for c in conns:
        if c.transport is not None and not c.closed.done():
            c.transport.close()
    window = ClientStats(rt1 - rt0, wrong1 - wrong0, stats.errors)
    return window, t1 - t0, before, after


def _serve(listen: str) -> None:
    host, port = listen.rsplit(":", 1)
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(EchoServer, host, int(port), backlog=1024))
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
    loop.add_signal_handler(signal.SIGINT, lambda: stop.done() or stop.set_result(None))
    loop.run_until_complete(stop)
    server.close()
    loop.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ws_peers", description="WebSocket echo instance")
    p.add_argument("--listen", required=True, help="host:port")
    args = p.parse_args(argv)
    _serve(args.listen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
