"""Raw-socket HTTP/1.1 helpers for the robustness tests: send exact bytes, read exact responses.

No HTTP library sits between the test and the proxy, so malformed and hostile requests reach the
proxy byte for byte. ``read_response`` understands Content-Length, chunked and close-delimited
bodies and 1xx interim responses; every read is bounded by a within so a hang fails the test.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict

READ_TIMEOUT = 15.0


class Hang(AssertionError):
    """The peer neither answered nor closed within the within."""


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: CIMultiDict[str]
    body: bytes
    interim: list[int] = field(default_factory=list)  # 1xx statuses seen before this response

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def closes(self) -> bool:
        return self.headers.get("Connection", "").lower() == "close" or self.version == "HTTP/1.0"


async def _readuntil(reader: asyncio.StreamReader, sep: bytes, within: float) -> bytes:
    try:
        return await asyncio.wait_for(reader.readuntil(sep), within)
    except TimeoutError as exc:
        raise Hang(f"no {sep!r} within {within}s") from exc


async def _readexactly(reader: asyncio.StreamReader, n: int, within: float) -> bytes:
    try:
        return await asyncio.wait_for(reader.readexactly(n), within)
    except TimeoutError as exc:
        raise Hang(f"fewer than {n} bytes within {within}s") from exc


async def read_head(
    reader: asyncio.StreamReader, within: float = READ_TIMEOUT,
) -> tuple[str, int, str, CIMultiDict[str]]:
    head = await _readuntil(reader, b"\r\n\r\n", within)
    lines = head[:-4].decode("latin-1").split("\r\n")
    version, status, *reason = lines[0].split(" ", 2)
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    return version, int(status), (reason[0] if reason else ""), headers


async def read_response(reader: asyncio.StreamReader, *, method: str = "GET",
                        within: float = READ_TIMEOUT) -> RawResponse:
    """The next complete response on ``reader`` (1xx interim responses are collected and skipped).
    Raises ``Hang`` when it does not arrive in time, ``asyncio.IncompleteReadError`` on EOF."""
    interim: list[int] = []
    while True:
        version, status, reason, headers = await read_head(reader, within)
        if 100 <= status < 200 and status != 101:
            interim.append(status)
            continue
        break
    body = b""
    if method == "HEAD" or status in (101, 204, 304):
        pass
    elif "chunked" in headers.get("Transfer-Encoding", "").lower():
        parts = []
        while True:
            size_line = await _readuntil(reader, b"\r\n", within)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await _readuntil(reader, b"\r\n", within)) != b"\r\n":
                    pass
                break
            parts.append(await _readexactly(reader, size, within))
            await _readexactly(reader, 2, within)
        body = b"".join(parts)
    elif "Content-Length" in headers:
        body = await _readexactly(reader, int(headers["Content-Length"]), within)
    else:
        try:
            body = await asyncio.wait_for(reader.read(), within)
        except TimeoutError as exc:
            raise Hang("close-delimited body did not end") from exc
    return RawResponse(version, status, reason, headers, body, interim)


async def wait_closed(reader: asyncio.StreamReader, within: float = READ_TIMEOUT) -> bytes:
    """Read until the peer closes (EOF or reset); returns what arrived. Raises ``Hang``."""
    data = b""
    try:
        async with asyncio.timeout(within):
            while True:
                try:
                    chunk = await reader.read(65536)
                except ConnectionError:
                    return data
                if not chunk:
                    return data
                data += chunk
    except TimeoutError as exc:
        raise Hang(f"connection still open after {within}s") from exc


async def close(writer: asyncio.StreamWriter) -> None:
    """Close our side and wait for the transport to go (no ResourceWarning), ignoring resets."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), READ_TIMEOUT)
    except (ConnectionError, TimeoutError):
        pass


async def exchange(port: int, data: bytes, *, method: str = "GET", within: float = READ_TIMEOUT) -> RawResponse:
    """Open a connection, send ``data``, read one response, close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_response(reader, method=method, within=within)
    finally:
        await close(writer)


def request(method: str, path: str, headers: list[tuple[str, str]] | None = None, body: bytes = b"",
            version: str = "HTTP/1.1", host: str | None = "proxy.test") -> bytes:
    """A well-formed request's bytes (Content-Length added when there is a body)."""
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if body and not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers or []):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*parts: bytes) -> bytes:
    """``parts`` as a chunked body, terminated."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"
