"""A demo app instance: answers every request with its instance id, for demos and tests.

Each instance is one aiohttp ``Application`` whose state lives in the app (``BACKEND_STATE``), so
several instances run side by side in one process. Bodies are streamed both ways (uploads are
hashed as they arrive, downloads are generated), so it can sit behind the proxy in memory tests.
It is test tooling: ``/_control/*`` lets a caller break it on purpose. Never expose it publicly.

Routes: ``GET /healthz``, ``POST /_control/health?ok=0|1``, ``GET /_control/headers`` (every
request header as pairs), ``GET /_control/respond?status=N&h=Name:Value&body=text``,
``POST /upload``, ``GET /stream?bytes=N[&length=1][&die_after=M]``, ``GET /slow?delay=S``,
``GET /set-cookie``, ``GET /ws`` (WebSocket echo), and anything else -> the JSON echo.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from affinity_proxy.proxy.headers import REQUEST_ID_HEADER

__all__ = [
    "BACKEND_STATE",
    "PATTERN_CHUNK",
    "WS_PROTOCOLS",
    "BackendState",
    "build_backend_app",
    "pattern_bytes",
    "start_backend",
]

#: The 64 KiB block ``/stream`` repeats (the last block is cut short), so clients can hash it.
PATTERN_CHUNK: bytes = bytes(range(256)) * 256
#: Subprotocols ``/ws`` accepts; it picks the first one the client offers.
WS_PROTOCOLS: tuple[str, ...] = ("echo.v1", "echo.v2")
_ECHO_HEADERS = ("host", "cookie", REQUEST_ID_HEADER.lower())


@dataclass(slots=True)
class BackendState:
    """Mutable per-instance state; tests read it through ``runner.app[BACKEND_STATE]``."""

    instance_id: str
    healthy: bool = True
    count: int = 0
    #: ``/upload`` requests that reached the handler (counted before the body is read).
    uploads_started: int = 0
    #: (code, reason) of every WebSocket the client closed, in order.
    ws_closes: list[tuple[int | None, str]] = field(default_factory=list)
    #: "complete" or "aborted" for every ``/stream`` response, in order.
    stream_results: list[str] = field(default_factory=list)


BACKEND_STATE = web.AppKey("backend_state", BackendState)


def pattern_bytes(total: int) -> list[bytes]:
    """The chunks ``/stream?bytes=total`` sends (for small ``total``; tests hash large ones)."""
    full, rest = divmod(total, len(PATTERN_CHUNK))
    return [PATTERN_CHUNK] * full + ([PATTERN_CHUNK[:rest]] if rest else [])


def _state(request: web.Request) -> BackendState:
    return request.app[BACKEND_STATE]


def _int(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer\n") from None


async def healthz(request: web.Request) -> web.Response:
    if _state(request).healthy:
        return web.Response(text="ok")
    return web.Response(status=503, text="unhealthy")


async def control_health(request: web.Request) -> web.Response:
    state = _state(request)
    state.healthy = request.query.get("ok", "1") not in ("0", "false", "no")
    return web.json_response({"instance": state.instance_id, "healthy": state.healthy})


async def control_headers(request: web.Request) -> web.Response:
    """Every header the instance received, in order, repeats kept (to check what the proxy sent)."""
    return web.json_response({"instance": _state(request).instance_id, "headers": list(request.headers.items())})


async def control_respond(request: web.Request) -> web.Response:
    """Answer with the status, headers (``h=Name:Value``, repeatable) and body given in the query."""
    status = _int(request, "status", 200)
    response = web.Response(status=status, text=request.query.get("body") if status not in (204, 304) else None)
    for spec in request.query.getall("h", []):
        name, _, value = spec.partition(":")
        response.headers.add(name.strip(), value.strip())
    return response


async def echo(request: web.Request) -> web.Response:
    """The JSON echo: who served it, what it saw, and how many requests this instance served."""
    state = _state(request)
    state.count += 1
    seen = {k.lower(): v for k, v in request.headers.items() if k.lower() in _ECHO_HEADERS}
    seen.update({k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-forwarded-")})
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    body = {
        "instance": state.instance_id,
        "path": request.path,
        "raw_path": request.raw_path,
        "query": request.query_string,
        "method": request.method,
        "headers": seen,
        "count": state.count,
        "peer_port": peer[1] if peer else None,
    }
    return web.json_response(body, headers={"X-Backend-Instance": state.instance_id})


async def upload(request: web.Request) -> web.Response:
    """Hash the body as it streams in; report its size and SHA-256 (never holds the whole body)."""
    _state(request).uploads_started += 1
    digest = hashlib.sha256()
    total = 0
    try:
        async for chunk in request.content.iter_chunked(64 * 1024):
            digest.update(chunk)
            total += len(chunk)
    except ConnectionError:  # the sender vanished mid-body: nobody is left to answer
        return web.Response(status=400, text=f"body incomplete after {total} bytes\n")
    return web.json_response(
        {
            "instance": _state(request).instance_id,
            "bytes": total,
            "sha256": digest.hexdigest(),
            "content_length": request.headers.get("Content-Length"),
            "chunked": "chunked" in request.headers.get("Transfer-Encoding", "").lower(),
        },
        headers={"X-Backend-Instance": _state(request).instance_id},
    )


async def stream(request: web.Request) -> web.StreamResponse:
    """Send ``bytes`` of the pattern in 64 KiB chunks, chunked unless ``length=1``.

    ``die_after=M`` closes the connection after about M bytes, to simulate an instance crash.
    """
    state = _state(request)
    total = _int(request, "bytes", 1024 * 1024)
    die_after = _int(request, "die_after", -1)
    response = web.StreamResponse(headers={"X-Backend-Instance": state.instance_id})
    response.content_type = "application/octet-stream"
    if request.query.get("length") == "1":
        response.content_length = total
    await response.prepare(request)
    if request.method == "HEAD":  # aiohttp would send whatever we write, even for HEAD
        return response
    sent = 0
    try:
        while sent < total:
            if 0 <= die_after <= sent:
                state.stream_results.append("died")
                if request.transport is not None:
                    request.transport.close()
                return response
            block = PATTERN_CHUNK[: min(len(PATTERN_CHUNK), total - sent)]
            await response.write(block)
            sent += len(block)
        await response.write_eof()
    except ConnectionError:  # the reader went away: record it, nothing else to do
        state.stream_results.append("aborted")
        return response
    state.stream_results.append("complete")
    return response


async def slow(request: web.Request) -> web.Response:
    try:
        delay = float(request.query.get("delay", "1"))
    except ValueError:
        raise web.HTTPBadRequest(text="delay must be a number\n") from None
    await asyncio.sleep(delay)
    return await echo(request)


async def set_cookie(request: web.Request) -> web.Response:
    response = web.json_response({"instance": _state(request).instance_id})
    response.set_cookie("app_session", "s1", path="/")
    response.set_cookie("app_theme", "dark", path="/", httponly=True)
    return response


async def websocket(request: web.Request) -> web.StreamResponse:
    """Echo; ``whoami`` -> instance id; ``close:<code>`` -> close with that code and reason ``bye``;
    ``drop`` -> abort the TCP connection without a closing handshake."""
    state = _state(request)
    ws = web.WebSocketResponse(protocols=WS_PROTOCOLS)
    if not ws.can_prepare(request).ok:
        return await echo(request)
    await ws.prepare(request)
    while True:
        msg = await ws.receive()
        if msg.type is WSMsgType.TEXT:
            if msg.data == "whoami":
                await ws.send_str(state.instance_id)
            elif msg.data == "drop":  # vanish without a closing handshake, like a crashed instance
                state.ws_closes.append((None, "dropped"))
                if request.transport is not None:
                    request.transport.abort()
                break
            elif msg.data.startswith("close:"):
                await ws.close(code=int(msg.data[6:]), message=b"bye")
                break
            else:
                await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            state.ws_closes.append((msg.data, msg.extra or ""))
            break
        elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            state.ws_closes.append((ws.close_code, ""))
            break
    return ws


def build_backend_app(instance_id: str) -> web.Application:
    """A fresh demo instance app named ``instance_id``. No I/O until it is run."""
    app = web.Application()
    app[BACKEND_STATE] = BackendState(instance_id)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/_control/health", control_health)
    app.router.add_get("/_control/headers", control_headers)
    app.router.add_route("*", "/_control/respond", control_respond)
    app.router.add_post("/upload", upload)
    app.router.add_put("/upload", upload)
    app.router.add_get("/stream", stream)
    app.router.add_get("/slow", slow)
    app.router.add_get("/set-cookie", set_cookie)
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def start_backend(
    instance_id: str, host: str = "127.0.0.1", port: int = 0, *, shutdown_timeout: float = 2.0
) -> tuple[web.AppRunner, int]:
    """Run a demo instance on ``host:port`` (0 = any free port); return its runner and real port.

    The caller owns the runner and must ``await runner.cleanup()``. ``shutdown_timeout`` bounds
    how long cleanup waits for requests still in flight (such as ``/slow``).
    """
    runner = web.AppRunner(build_backend_app(instance_id), access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[-1][1]
    return runner, int(bound)


def main(argv: list[str] | None = None) -> None:
    """``python -m affinity_proxy.devtools.demo.backend --id a --port 3000``: one demo instance, standalone
    (used by examples/docker-compose.yml and examples/fly as a stand-in for a real app)."""
    import argparse

    parser = argparse.ArgumentParser(description="affinity-proxy demo app instance")
    parser.add_argument("--id", required=True, help="instance id reported in every answer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    web.run_app(build_backend_app(args.id), host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()
