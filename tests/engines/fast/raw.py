"""A raw HTTP/1.1 client for the fast engine's wire tests: send exact bytes, read every response.

Deliberately minimal and independent of the proxy's code: it frames responses by status,
Content-Length, chunked encoding or connection close, and never tolerates what a strict client
would reject.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    interim: list[int] = field(default_factory=list)  # 1xx statuses seen before this response

    def get(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def getall(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RawExchange:
    responses: list[RawResponse]
    closed: bool  # the server closed the connection
    rest: bytes = b""


def _parse_head(block: bytes) -> tuple[str, int, str, list[tuple[str, str]]]:
    lines = block.decode("latin-1").split("\r\n")
    version, status, *reason = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    return version, int(status), reason[0] if reason else "", headers


def parse_responses(data: bytes, head_requests: set[int] | None = None,
                    closed: bool = True) -> tuple[list[RawResponse], bytes]:
    """Every complete response in ``data``; ``head_requests``: indexes answering HEAD requests."""
    head_requests = head_requests or set()
    out: list[RawResponse] = []
    interim: list[int] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        version, status, reason, headers = _parse_head(data[pos:end])
        pos = end + 4
        if 100 <= status < 200:
            interim.append(status)
            continue
        lower = {k.lower(): v for k, v in headers}
        if len(out) in head_requests or status in (204, 304):
            body = b""
        elif "transfer-encoding" in lower:
            assert lower["transfer-encoding"].lower() == "chunked", lower
            decoded = _dechunk(data, pos)
            if decoded is None:
                break
            body, pos = decoded
        elif "content-length" in lower:
            size = int(lower["content-length"])
            if len(data) - pos < size:
                break
            body = data[pos:pos + size]
            pos += size
        elif closed:  # no framing: the body ends with the connection
            body = data[pos:]
            pos = len(data)
        else:
            break
        out.append(RawResponse(version, status, reason, headers, body, interim))
        interim = []
    return out, data[pos:]


def _dechunk(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """The chunked body starting at ``pos`` and where it ends, or None while incomplete."""
    chunks = []
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(data[pos:line_end].split(b";")[0], 16)
        pos = line_end + 2
        if size == 0:
            if data[pos:pos + 2] != b"\r\n":
                return None
            return b"".join(chunks), pos + 2
        if len(data) < pos + size + 2:
            return None
        chunks.append(data[pos:pos + size])
        assert data[pos + size:pos + size + 2] == b"\r\n"
        pos += size + 2


async def exchange(port: int, data: bytes | list[bytes], *, expect: int | None = None,
                   head_requests: set[int] | None = None, limit: float = 10.0,
                   pause: float = 0.0) -> RawExchange:
    """Send ``data`` (pieces written separately, ``pause`` seconds apart), then read until the
    server closes or ``expect`` responses arrived (at most ``limit`` seconds); then close our side."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    closed = False
    try:
        for piece in [data] if isinstance(data, bytes) else data:
            writer.write(piece)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        async with asyncio.timeout(limit):
            while True:
                if expect is not None:
                    done, _ = parse_responses(received, head_requests, closed=False) if received else ([], b"")
                    if len(done) >= expect:
                        break
                chunk = await reader.read(65536)
                if not chunk:
                    closed = True
                    break
                received += chunk
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    responses, rest = parse_responses(received, head_requests, closed=closed)
    return RawExchange(responses, closed, rest)


class Client:
    """One keep-alive connection; ``send`` writes one request and reads exactly its answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.received = b""

    @classmethod
    async def open(cls, port: int, local: str | None = None) -> Client:
        """A connection to ``port``; ``local``: the address to connect from (127.0.0.2: another peer)."""
        return cls(*await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0) if local else None))

    async def send(self, data: bytes, *, head: bool = False) -> RawResponse:
        self.writer.write(data)
        async with asyncio.timeout(10):
            while True:
                done, rest = parse_responses(self.received, {0} if head else set(), closed=False)
                if done:
                    self.received = rest
                    return done[0]
                chunk = await self.reader.read(65536)
                assert chunk, "the proxy closed the connection"
                self.received += chunk

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass
