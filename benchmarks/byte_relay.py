"""A minimal Python byte relay: the ceiling any Python proxy can reach on this machine (issue #16).

Every client connection gets one upstream connection and the bytes are copied both ways as they
arrive: no HTTP parsing, no routing, no header added, no cookie checked. asyncio Protocols on
uvloop when installed (as ``affinity-proxy serve`` runs), so what it costs per request is the event
loop and the kernel, nothing of Python's own. Not a proxy anyone should run (no affinity, no
limits, no timeouts): the benchmark shows every other target as a fraction of it.

    python -m benchmarks.byte_relay --listen 127.0.0.1:8082 --upstream 127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import cast


class Side(asyncio.Protocol):
    """One end of a relayed connection; ``peer`` is the other end once both are connected.

    Back-pressure goes across: when this end's write buffer fills, the peer stops reading."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.pending: list[bytes] = []  # client bytes that arrived before the upstream connected
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None and self.peer.transport is not None and self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
        return True  # keep the other direction open until the peer closes too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()  # flushes what is buffered first

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def link(self, peer: Side) -> None:
        """Join two connected ends and forward what this end received meanwhile."""
        self.peer, peer.peer = peer, self
        assert peer.transport is not None
        if self.pending:
            peer.transport.write(b"".join(self.pending))
            self.pending.clear()
        if self.eof and peer.transport.can_write_eof():
            peer.transport.write_eof()
        if self.lost:
            peer.transport.close()


class Client(Side):
    """The client end: opens its upstream connection as soon as it is accepted."""

    def __init__(self, host: str, port: int, tasks: set[asyncio.Task[None]]) -> None:
        super().__init__()
        self.host, self.port, self.tasks = host, port, tasks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        task = asyncio.get_running_loop().create_task(self._connect())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self) -> None:
        assert self.transport is not None
        try:
            _, upstream = await asyncio.get_running_loop().create_connection(Side, self.host, self.port)
        except OSError as exc:
            print(f"byte-relay: upstream {self.host}:{self.port}: {exc}", file=sys.stderr)
            self.transport.abort()
            return
        self.link(upstream)


async def serve(listen_host: str, listen_port: int, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    server = await loop.create_server(lambda: Client(host, port, tasks), listen_host, listen_port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.removeprefix("http://").rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, type=_host_port, help="host:port")
    parser.add_argument("--upstream", required=True, type=_host_port, help="host:port")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    loop_factory = None
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            print("byte-relay: uvloop not installed, running on asyncio's default loop", file=sys.stderr)
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(*args.listen, *args.upstream))


if __name__ == "__main__":
    main()
