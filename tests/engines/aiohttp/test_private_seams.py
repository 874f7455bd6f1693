"""The aiohttp internals ``engines/aiohttp/server.py`` reads, pinned so an aiohttp upgrade that
changes them fails here, loudly and by name, instead of as a hung request body.

aiohttp offers no public way for a protocol to learn that its parser gave up on the stream (the
C parser drops the body it was filling and queues a private ``_ErrInfo``; ``handle_error`` only
runs once the queue reaches it, after the current handler, which by then waits for ever on the
body), nor to read its flow-control state. ``GuardedRequestHandler`` therefore reads
``RequestHandler._messages`` and ``BaseProtocol._reading_paused``/``_buffer_paused``; the tests
below check that those still exist and still mean what the guards assume, and that the guard
works end to end on a real socket.
"""

from __future__ import annotations

import asyncio
import inspect

import aiohttp
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestHandler

from affinity_proxy.config import LimitsConfig
from affinity_proxy.engines.aiohttp.server import ProxyAppRunner

_UPGRADE = (f"aiohttp {aiohttp.__version__} changed a private member GuardedRequestHandler reads; re-check "
            "_parse_failed, _end_unparsable_bodies and _check_read_stall in engines/aiohttp/server.py")


def test_the_private_members_the_guards_read_still_exist() -> None:
    assert "_messages" in RequestHandler.__slots__, _UPGRADE
    assert {"_reading_paused", "_buffer_paused"} <= set(BaseProtocol.__slots__), _UPGRADE
    source = inspect.getsource(RequestHandler.data_received)
    # a parse error is queued beside the parsed requests, as something other than a RawRequestMessage
    assert "self._messages.append((msg, payload))" in source and "_ErrInfo(" in source, _UPGRADE


async def test_a_body_broken_after_its_head_ends_with_an_error_not_a_hang() -> None:
    """The head reaches the handler, then the chunked body turns malformed: the handler's read
    fails at once (aiohttp alone would leave it waiting until the client timeout)."""
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handler(request: web.Request) -> web.Response:
        try:
            await request.read()
        except BadHttpMessage:
            outcome.set_result("error")
            return web.Response(status=400)
        outcome.set_result("complete")
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/", handler)
    runner = ProxyAppRunner(app, limits=LimitsConfig(client_timeout=120.0))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # let the head reach the handler first (the order does not change the answer)
        writer.write(b"zz\r\nmore\r\n0\r\n\r\n")
        await writer.drain()
        assert await asyncio.wait_for(outcome, 30) == "error", _UPGRADE
        status = await asyncio.wait_for(reader.readline(), 30)
        assert status.startswith(b"HTTP/1.1 400"), status
    finally:
        writer.close()
        await runner.cleanup()
