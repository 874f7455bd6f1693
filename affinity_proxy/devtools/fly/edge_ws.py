"""WebSocket upgrades through the local Fly edge: dial the machine, replay on a plain HTTP
``fly-replay`` answer, then relay messages both ways.

A machine that wants the upgrade elsewhere answers the handshake with a plain HTTP response that
carries ``fly-replay`` (docs/fly-protocol.md §2 "Web Socket Considerations"); the edge then dials the target with
the original handshake plus ``fly-replay-src``. Only once a machine accepts (101) is the client's
upgrade accepted. A non-101 answer without ``fly-replay`` is passed to the client as its status and
headers (the body is not kept by aiohttp's client). Imports aiohttp and ``fly.edge_route`` only
(``edge_route.Edge``, the protocol ``FlyEdge`` meets, is a type hint).
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict

from affinity_proxy.devtools.fly.edge_cache import wants_invalidate
from affinity_proxy.devtools.fly.edge_http import cache_lookup, cache_store, first_hop, missed, outcome
from affinity_proxy.devtools.fly.edge_route import Edge, EdgeError
from affinity_proxy.proxy.headers import FLY_REQUEST_ID_HEADER, downstream_response_headers
from affinity_proxy.routing.replay import REPLAY_HEADER

log = logging.getLogger("affinity_proxy.fly.edge")

_HANDSHAKE = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Accept",
    "Upgrade",
    "Connection",
    "Content-Length",
)
_SENDABLE = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))
_CLOSE_TIMEOUT = 5.0


def is_upgrade(request: web.BaseRequest) -> bool:
    return (
        request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


async def relay_websocket(edge: Edge, request: web.Request, request_id: str) -> web.StreamResponse:
    """Serve one upgrade request: find the accepting machine (following replays), then relay."""
    base = edge.edge_headers(request, request_id)
    for name in _HANDSHAKE:
        base.popall(name, None)
    protocols = tuple(
        p.strip()
        for value in request.headers.getall("Sec-WebSocket-Protocol", [])
        for p in value.split(",")
        if p.strip()
    )
    lookup = cache_lookup(edge, request)  # the replay cache applies to upgrades as to any request (GUESS)
    hop = first = first_hop(edge, request, lookup)
    replays = deliveries = 0
    failed: set[str] = set()
    while True:
        if isinstance(hop, EdgeError):
            return edge.error_response(hop, request_id)
        woke = await edge.prepare_hop(hop) or await edge.wait_for_slot(hop)
        if woke is not None:
            hop = woke
            continue
        headers = CIMultiDict(base)
        headers.update(hop.headers)
        url = edge.machine_url(hop.machine, request)
        url = url.with_scheme({"http": "ws", "https": "wss"}.get(url.scheme, url.scheme))
        try:
            upstream = await edge.client.ws_connect(
                url,
                headers=headers,
                protocols=protocols,
                max_msg_size=0,
                compress=0,
                autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=_CLOSE_TIMEOUT),
            )
        except aiohttp.WSServerHandshakeError as exc:
            edge.hits[hop.machine.id] += 1
            deliveries += 1
            answer = exc.headers if exc.headers is not None else CIMultiDict()
            value = answer.get(REPLAY_HEADER)
            if wants_invalidate(answer):
                edge.cache.invalidate(lookup.key)
            if value is None:
                edge.served[hop.machine.id] += 1
                edge.replay_counts[replays] += 1
                edge.hop_counts[deliveries] += 1
                outcome(edge, first, replays)
                return _refused(exc, request_id)
            if replays == 0 and not hop.cached and not hop.is_fallback and not wants_invalidate(answer):
                cache_store(edge, request, lookup, value, answer)
            replays += 1
            edge.replays += 1
            hop = missed(edge, edge.next_after_replay(hop, value, replays, True))
            continue
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            hop = edge.after_connect_failure(hop, exc, failed)
            continue
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("websocket handshake with %s failed: %r", hop.machine.id, exc)
            return edge.error_response(EdgeError(502, "PR03", "Machine connection failed"), request_id)
        break
    edge.hits[hop.machine.id] += 1
    edge.served[hop.machine.id] += 1
    edge.replay_counts[replays] += 1
    edge.hop_counts[deliveries + 1] += 1
    outcome(edge, first, replays)
    ws = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        max_msg_size=0,
        compress=False,
        timeout=_CLOSE_TIMEOUT,
    )
    ws.headers[FLY_REQUEST_ID_HEADER] = request_id
    try:
        await ws.prepare(request)
        edge.sockets.add(ws)
        async with asyncio.TaskGroup() as group:
            group.create_task(_pump(ws, upstream, WSCloseCode.GOING_AWAY), name="edge-ws-client-to-machine")
            group.create_task(_pump(upstream, ws, WSCloseCode.BAD_GATEWAY), name="edge-ws-machine-to-client")
    finally:
        edge.sockets.discard(ws)
        await upstream.close()
        if ws.prepared and not ws.closed:
            await ws.close(code=WSCloseCode.GOING_AWAY)
    return ws


def _refused(exc: aiohttp.WSServerHandshakeError, request_id: str) -> web.Response:
    headers = downstream_response_headers(exc.headers) if exc.headers is not None else CIMultiDict()
    headers.popall("Content-Length", None)
    headers[FLY_REQUEST_ID_HEADER] = request_id
    return web.Response(status=exc.status, headers=headers)


async def _pump(
    src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    abnormal: int,
) -> None:
    """Copy messages until ``src`` ends, then close ``dst`` with ``src``'s close code."""
    while True:
        msg = await src.receive()
        if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            try:
                if msg.type is WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                else:
                    await dst.send_bytes(msg.data)
            except ConnectionError:
                await src.close(code=WSCloseCode.GOING_AWAY)
                return
            continue
        if msg.type is WSMsgType.CLOSING:
            return
        code = msg.data if msg.type is WSMsgType.CLOSE else src.close_code
        code = WSCloseCode.OK if code == 0 else code
        if not dst.closed:
            reason = _reason(msg.extra) if msg.type is WSMsgType.CLOSE else b""
            await dst.close(code=code if code in _SENDABLE else abnormal, message=reason)
        return


def _reason(extra: object) -> bytes:
    """The close reason cut to the 123 bytes a CLOSE frame allows, on a UTF-8 boundary."""
    if not isinstance(extra, str):
        return b""
    return extra.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
