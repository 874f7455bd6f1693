"""relay_websocket: connect to the instance first, then accept the client and pump messages.

The instance is dialled before the client's handshake is answered, so a dead instance becomes an
``UpstreamError`` the caller can still turn into an HTTP error, a retry or a re-pin, instead of
an accepted socket that closes at once. After that the relay moves whole messages (TEXT, BINARY)
in both directions with one task per direction; pings are answered locally on each leg
(aiohttp autoping), and a CLOSE from either side closes the other with the same code and reason.
Per-message compression is off on both legs: each leg would pay a zlib context (~100s of KiB)
per connection to re-compress what the proxy just decompressed. Imports only aiohttp/yarl and
``forwarding.*``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from affinity_proxy.engines.aiohttp.client import UpstreamClient
from affinity_proxy.engines.aiohttp.forward import upstream_url
from affinity_proxy.proxy.headers import ExtraHeaders, merge_extra_headers
from affinity_proxy.proxy.upstream_errors import UpstreamError, upstream_error_from

__all__ = ["relay_websocket", "websocket_url"]

log = logging.getLogger("affinity_proxy.forwarding.websocket")

# Handshake headers aiohttp's client writes itself; forwarding the client's would corrupt the
# instance-side handshake (a second Sec-WebSocket-Key, an extension we did not negotiate).
_HANDSHAKE_HEADERS = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Accept",
    "Upgrade",
    "Connection",
    "Content-Length",
)
# Seconds to wait for a closing handshake before dropping the socket.
_CLOSE_TIMEOUT = 10.0
# After one direction ends, how long the other may take to notice before it is cancelled.
_DRAIN_GRACE = _CLOSE_TIMEOUT + 1.0
# Codes an endpoint may put in a CLOSE frame (RFC 6455 7.4); 1005/1006/1015 are never sent.
_SENDABLE = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))

_WSAny = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def websocket_url(base_url: str, request: web.BaseRequest) -> URL:
    """ws:// or wss:// URL of the instance for this upgrade request (raw path and query). Pure."""
    url = upstream_url(base_url, request)
    scheme = {"http": "ws", "https": "wss"}.get(url.scheme, url.scheme)
    return url.with_scheme(scheme)


def offered_protocols(headers: MultiMapping[str]) -> tuple[str, ...]:
    """Subprotocols the client offered, in its order of preference (all header lines)."""
    values = headers.getall("Sec-WebSocket-Protocol", [])
    return tuple(p.strip() for value in values for p in value.split(",") if p.strip())


async def relay_websocket(
    request: web.Request,
    base_url: str,
    client: UpstreamClient,
    *,
    upstream_headers: CIMultiDict[str],
    extra_response_headers: ExtraHeaders = (),
    max_message_bytes: int,
    heartbeat: float | None,
    registry: set[web.WebSocketResponse] | None = None,
) -> web.WebSocketResponse:
    """Relay a WebSocket session between the client and the instance at ``base_url``.

    ``registry``, when given, holds the client-side socket while the relay runs, so a graceful
    shutdown can close every open session with 1001 (going away).

    The instance handshake gets ``upstream_headers`` minus the WebSocket handshake headers (the
    client's ``Host``, ``Origin``, cookies and ``X-Forwarded-*`` pass through) and the client's
    subprotocol offers; the client is then accepted with the subprotocol the instance chose and
    with ``extra_response_headers`` on the 101 response. ``max_message_bytes`` (0 = unlimited)
    applies to both legs (an oversize message closes with 1009); ``heartbeat`` pings both legs.

    Raises before touching the client (so the caller can still answer with HTTP):
    ``UpstreamError(kind="connect", retryable=True)`` when the instance is unreachable,
    ``UpstreamError(kind="protocol", status=502, upstream_status=N)`` when it refuses the
    handshake, ``UpstreamError(kind="timeout")`` when it does not answer it.

    Returns the client ``WebSocketResponse`` once both directions have finished and both sockets
    are closed. An abnormal end on one leg closes the other with 1001 (client went away) or 1014
    (instance went away). Cost: two tasks and two sockets per session, no buffering beyond one
    message per direction.
    """
    try:
        upstream = await client.session.ws_connect(
            websocket_url(base_url, request),
            protocols=offered_protocols(request.headers),
            headers=_handshake_headers(upstream_headers),
            max_msg_size=max_message_bytes,
            heartbeat=heartbeat,
            compress=0,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=_CLOSE_TIMEOUT),
        )
    except aiohttp.WSServerHandshakeError as exc:
        raise UpstreamError(
            "protocol",
            f"instance refused the WebSocket handshake with {exc.status}: {exc.message}",
            retryable=False,
            status=502,
            upstream_status=exc.status,
        ) from exc
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise upstream_error_from(exc) from exc
    ws: web.WebSocketResponse | None = None
    try:
        ws = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            max_msg_size=max_message_bytes,
            heartbeat=heartbeat,
            compress=False,
            timeout=_CLOSE_TIMEOUT,
        )
        rejected = merge_extra_headers(ws.headers, extra_response_headers)
        if rejected:
            log.warning("dropped unsafe extra handshake headers: %s", ", ".join(rejected))
        await ws.prepare(request)
        if registry is not None:
            registry.add(ws)
        await _pump_both(ws, upstream)
        return ws
    finally:
        if registry is not None and ws is not None:
            registry.discard(ws)
        await upstream.close()
        if ws is not None and ws.prepared and not ws.closed:
            await ws.close(code=WSCloseCode.INTERNAL_ERROR)


def _handshake_headers(upstream_headers: CIMultiDict[str]) -> CIMultiDict[str]:
    headers = CIMultiDict(upstream_headers)
    for name in _HANDSHAKE_HEADERS:
        headers.popall(name, None)
    return headers


async def _pump_both(client_ws: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    """Run both directions until one ends; the ending side has already closed the other.

    The TaskGroup guarantees neither task outlives this call; a direction that does not notice
    the close within ``_DRAIN_GRACE`` is cancelled. An unexpected error in a pump propagates
    (as an ExceptionGroup) after the other pump is cancelled.
    """
    async with asyncio.TaskGroup() as group:
        tasks = {
            group.create_task(
                _pump(client_ws, upstream, src_gone=WSCloseCode.GOING_AWAY, dst_gone=WSCloseCode.BAD_GATEWAY),
                name="ws-client-to-instance",
            ),
            group.create_task(
                _pump(upstream, client_ws, src_gone=WSCloseCode.BAD_GATEWAY, dst_gone=WSCloseCode.GOING_AWAY),
                name="ws-instance-to-client",
            ),
        }
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            _, late = await asyncio.wait(pending, timeout=_DRAIN_GRACE)
            for task in late:
                log.warning("websocket pump %s did not finish after close; cancelling", task.get_name())
                task.cancel()


async def _pump(src: _WSAny, dst: _WSAny, *, src_gone: int, dst_gone: int) -> None:
    """Copy messages from ``src`` to ``dst`` until ``src`` ends, then close ``dst`` to match.

    ``src_gone`` is the code sent to ``dst`` when ``src`` ended without a usable close code;
    ``dst_gone`` is sent to ``src`` when writing to ``dst`` fails. CLOSING means the other pump is
    closing ``src`` because ``dst`` already closed, so there is nothing left to do.
    """
    while True:
        msg = await src.receive()
        try:
            if msg.type is WSMsgType.TEXT:
                await dst.send_str(msg.data)
                continue
            if msg.type is WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
                continue
        except ConnectionError as exc:
            log.debug("websocket peer went away while relaying: %r", exc)
            await src.close(code=dst_gone)
            return
        if msg.type is WSMsgType.CLOSE:
            await dst.close(code=_close_code(msg.data, src_gone), message=_close_reason(msg.extra))
            return
        if msg.type is WSMsgType.CLOSING:
            return
        if msg.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
            code = src.close_code
            if msg.type is WSMsgType.ERROR:
                # A protocol violation (e.g. 1009 message too big) carries its own code; by now
                # src.close_code may already say 1006 because aiohttp dropped that leg.
                code = getattr(msg.data, "code", None) or code
                log.debug("websocket leg failed: %r (close code %s)", msg.data, code)
            await dst.close(code=_close_code(code, src_gone))
            return
        # PING/PONG only surface with autoping off; they are per-leg and never relayed.


def _close_code(code: int | None, abnormal: int) -> int:
    """The code to forward: the peer's own when sendable, 1000 for an empty CLOSE, else ``abnormal``."""
    if code == 0:  # CLOSE frame without a status code
        return WSCloseCode.OK
    if code is not None and code in _SENDABLE:
        return code
    return abnormal


def _close_reason(extra: Any) -> bytes:
    """The close reason, cut to the 123 bytes a CLOSE frame allows, on a UTF-8 boundary."""
    if not isinstance(extra, str) or not extra:
        return b""
    return extra.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
