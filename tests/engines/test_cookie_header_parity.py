"""Both engines read the same cookies from a ``Cookie`` header: the aiohttp engine through aiohttp's
public ``Request.cookies``, the fast engine through ``routing.cookie_header``. A real aiohttp server
on 127.0.0.1 reports ``request.cookies`` for each header sent; our parser must give the same
mapping (so the same affinity cookie value) for the hand-written cases and a seeded random corpus."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from affinity_proxy.routing.cookie_header import parse_cookie_header
from tests.routing.test_cookie_header import CASES

#: Pieces of headers, edge cases included (quotes, escapes, ``;``, spaces, commas, dates, bad names).
_PIECES = [*'ab=; "\\,{}[]$07!~', "\t", "sid", "affinity", '"x;y"', "\\073", "Mon, 01-Jan-2024 00:00:00 GMT"]


def _corpus() -> list[str]:
    rnd = random.Random(13)
    made = ["".join(rnd.choice(_PIECES) for _ in range(rnd.randint(1, 16))) for _ in range(300)]
    sendable = [h for h, _ in CASES if h.isprintable() and h.isascii()]
    # the affinity cookie between others, repeated, quoted, after a malformed pair
    sendable += ["x=1; affinity=v1.a.b; y=2", "affinity=one; affinity=two", 'affinity="v1.a;b"',
                 'bad"=1; affinity=v1', "affinity=v1 ; affinity", "a=\"open; affinity=v2"]
    # a header value cannot start or end with whitespace on the wire (HTTP strips it)
    return sendable + [h.strip() for h in made if h.strip()]


@pytest.fixture
async def cookie_echo() -> AsyncIterator[str]:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response(dict(request.cookies))

    app = web.Application()
    app.router.add_get("/", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


async def test_same_cookies_as_aiohttp_request_cookies(cookie_echo: str) -> None:
    differ = {}
    async with aiohttp.ClientSession() as session:
        for header in _corpus():
            async with session.get(cookie_echo, headers={"Cookie": header}) as resp:
                assert resp.status == 200, header
                seen = await resp.json()
            if parse_cookie_header(header) != seen:
                differ[header] = (parse_cookie_header(header), seen)
    assert differ == {}
