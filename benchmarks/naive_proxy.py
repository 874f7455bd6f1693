"""The naive aiohttp reverse proxy of issue #6: the baseline the fast data plane is measured against.

An aiohttp server and one shared ``ClientSession`` forwarding every request to one upstream,
streaming the bodies both ways, hop-by-hop headers removed. No routing, cookies, pins or metrics:
what "just write it with aiohttp" gives. uvloop is used when installed, as ``affinity-proxy serve``
does, so the comparison is between the request paths and not the event loops (``--no-uvloop``).

    python -m benchmarks.naive_proxy --listen 127.0.0.1:8081 --upstream http://127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Mapping

import aiohttp
from aiohttp import web

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-connection",
})  # fmt: skip
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def _strip(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Every header but the hop-by-hop ones (also those named in ``Connection``)."""
    items = list(headers.items())
    named: set[str] = set()
    for name, value in items:
        if name.lower() == "connection":
            named.update(t.strip().lower() for t in value.split(","))
    return [(k, v) for k, v in items if k.lower() not in HOP_BY_HOP and k.lower() not in named]


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_any():
        yield chunk


async def handle(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    url = request.app[UPSTREAM] + request.rel_url.raw_path_qs
    headers = _strip(request.headers)
    data = _body(request) if request.body_exists else None
    async with session.request(
        request.method, url, headers=headers, data=data, allow_redirects=False, auto_decompress=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in _strip(upstream.headers):
            if name.lower() != "content-length":
                response.headers.add(name, value)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def build_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                         skip_auto_headers=("User-Agent", "Accept-Encoding")) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(host: str, port: int, upstream: str) -> None:
    runner = web.AppRunner(build_app(upstream), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--upstream", required=True, help="http://host:port")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    loop_factory = None
    if not args.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(host, int(port), args.upstream))


if __name__ == "__main__":
    main()
