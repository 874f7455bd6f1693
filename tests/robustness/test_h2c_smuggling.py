"""h2c smuggling (BishopFox/h2csmuggler's technique), re-expressed as test cases on both engines.

h2csmuggler sends an HTTP/1.1 request with ``Upgrade: h2c``, ``HTTP2-Settings`` and
``Connection: Upgrade, HTTP2-Settings`` through a proxy. A proxy that passes the upgrade on and
relays the instance's ``101 Switching Protocols`` becomes a blind TCP tunnel: the client then
speaks HTTP/2 straight to the instance, past every rule of the proxy. The proxy must never let that
happen: ``Upgrade``/``HTTP2-Settings`` never reach the instance (only a WebSocket upgrade is relayed),
a 101 from an instance that switches anyway never reaches the client as a switch, and the client
connection stays HTTP/1.1 (a pipelined request after it is answered as HTTP/1.1).

The instance here is the worst case: a raw server that answers ``101`` to *every* request and then
treats the connection as HTTP/2 (it echoes what it reads as the "tunnel").
"""

from __future__ import annotations

import asyncio

import pytest

from affinity_proxy.config import InstanceConfig
from tests.robustness.rawhttp import close, read_response, request
from tests.support.backends import Backends, make_config
from tests.support.raw_instance import raw_instances

SETTINGS = "AAMAAABkAARAAAAAAAIAAAAA"  # h2csmuggler's default HTTP2-Settings payload
H2C_VARIANTS: dict[str, list[tuple[str, str]]] = {
    "standard": [("Upgrade", "h2c"), ("HTTP2-Settings", SETTINGS), ("Connection", "Upgrade, HTTP2-Settings")],
    "upgrade only in Connection": [("Upgrade", "h2c"), ("HTTP2-Settings", SETTINGS), ("Connection", "Upgrade")],
    "no Connection header": [("Upgrade", "h2c"), ("HTTP2-Settings", SETTINGS)],
    "mixed case": [("upgrade", "H2C"), ("http2-settings", SETTINGS), ("connection", "upgrade, http2-settings")],
    "h2c beside websocket": [("Upgrade", "h2c, websocket"), ("Connection", "Upgrade")],
}
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.mark.parametrize("variant", sorted(H2C_VARIANTS))
async def test_an_h2c_upgrade_never_opens_a_tunnel(engine: str, start_proxy, variant: str) -> None:
    seen: list[bytes] = []

    async def switching_instance(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answers 101 to anything, then echoes bytes: what a tunnel to an h2c server would carry."""
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head)
            if b"upgrade: h2c" in head.lower():
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                await writer.drain()
                while data := await reader.read(65536):
                    writer.write(b"TUNNEL:" + data)
                    await writer.drain()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with raw_instances() as start:
        port = await start(switching_instance)
        config = make_config(Backends(), engine=engine, instances=(InstanceConfig("h2", f"http://127.0.0.1:{port}"),))
        server = await start_proxy(config)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.main_port)
        try:
            writer.write(request("GET", "/h2c", H2C_VARIANTS[variant]))
            await writer.drain()
            first = await read_response(reader)
            assert first.status != 101, f"{variant}: the proxy relayed a protocol switch"
            # The connection is still HTTP/1.1 on the client side: the HTTP/2 preface is not carried
            # to the instance as tunnel bytes; it is a malformed HTTP/1.1 request (400) or the
            # connection ends.
            writer.write(PREFACE)
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(65536), timeout=10)
            assert b"TUNNEL:" not in rest, f"{variant}: bytes went through a tunnel"
            status_line = rest.split(b"\r\n", 1)[0]
            assert rest == b"" or status_line in (b"HTTP/1.1 400 Bad Request", b"HTTP/1.0 400 Bad Request"), (
                variant, rest[:200])
        finally:
            await close(writer)
    for head in seen:
        lowered = head.lower()
        assert b"upgrade: h2c" not in lowered and b"http2-settings" not in lowered, (variant, head)
