"""relay_websocket: connect to the instance first, then accept the client and relay bytes.

The instance is dialled and its handshake checked before the client's handshake is answered,
so a dead instance becomes an ``UpstreamError`` the caller can still turn into an HTTP error, a
retry or a re-pin, instead of an accepted socket that closes at once. After both 101s the session
is a ``ws_relay.ByteRelay``: bytes are forwarded as they arrive in both directions (frames are
not unmasked, decoded or re-encoded), reading only frame headers for ``max_ws_message_bytes``,
CLOSE frames and heartbeats. Pings and pongs of the endpoints pass through; close codes and
reasons pass as sent. No extension is negotiated on either leg (no ``Sec-WebSocket-Extensions``
offered to the instance nor accepted from the client), so both legs speak the same frames.
The fast engine hands upgrades to this engine's application (``engines/fast/handoff.py``), so
this is both engines' relay. Imports aiohttp/yarl, ``proxy.*`` and this engine's modules.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from affinity_proxy.engines.aiohttp.client import UpstreamClient
from affinity_proxy.engines.aiohttp.forward import upstream_url
from affinity_proxy.engines.aiohttp.ws_relay import ByteRelay
from affinity_proxy.proxy.headers import ExtraHeaders, merge_extra_headers
from affinity_proxy.proxy.upstream_errors import UpstreamError, upstream_error_from

__all__ = ["RelaySession", "relay_websocket", "websocket_url"]

log = logging.getLogger("affinity_proxy.forwarding.websocket")

# Handshake headers written here for the instance; forwarding the client's would corrupt the
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
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
_VERSIONS = ("13", "8", "7")  # what aiohttp's server accepted
# Seconds to wait for a closing handshake before dropping the sockets.
_CLOSE_TIMEOUT = 10.0


def websocket_url(base_url: str, request: web.BaseRequest) -> URL:
    """ws:// or wss:// URL of the instance for this upgrade request (raw path and query). Pure."""
    url = upstream_url(base_url, request)
    scheme = {"http": "ws", "https": "wss"}.get(url.scheme, url.scheme)
    return url.with_scheme(scheme)


def offered_protocols(headers: MultiMapping[str]) -> tuple[str, ...]:
    """Subprotocols the client offered, in its order of preference (all header lines)."""
    values = headers.getall("Sec-WebSocket-Protocol", [])
    return tuple(p.strip() for value in values for p in value.split(",") if p.strip())


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2). Pure."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


class RelaySession:
    """An open relayed session as the shutdown registry sees it: ``close(code=1001)`` ends it."""

    __slots__ = ("relay",)

    def __init__(self, relay: ByteRelay) -> None:
        self.relay = relay

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        """Send ``code`` to both legs and wait (up to the close timeout) for the session to end."""
        self.relay.close(code, message)
        await self.relay.wait()
        return True


async def relay_websocket(
    request: web.Request,
    base_url: str,
    client: UpstreamClient,
    *,
    upstream_headers: CIMultiDict[str],
    extra_response_headers: ExtraHeaders = (),
    max_message_bytes: int,
    heartbeat: float | None,
    registry: set[Any] | None = None,
) -> web.StreamResponse:
    """Relay a WebSocket session between the client and the instance at ``base_url``.

    ``registry``, when given, holds a ``RelaySession`` while the relay runs, so a graceful
    shutdown can close every open session with 1001 (going away).

    The client's handshake is checked first (405 for a method other than GET, 400 for a bad key
    or version, as aiohttp's server answered). The instance handshake gets ``upstream_headers``
    minus the WebSocket handshake headers (the client's ``Host``, ``Origin``, cookies and
    ``X-Forwarded-*`` pass through) and the client's subprotocol offers; the client is then
    answered 101 with the subprotocol the instance chose and ``extra_response_headers``.
    ``max_message_bytes`` (0 = unlimited) applies to both directions (an oversize message closes
    both legs with 1009); ``heartbeat`` pings a leg quiet for that long.

    Raises before touching the client (so the caller can still answer with HTTP):
    ``UpstreamError(kind="connect", retryable=True)`` when the instance is unreachable,
    ``UpstreamError(kind="protocol", status=502, upstream_status=N)`` when it refuses the
    handshake, ``UpstreamError(kind="timeout")`` when it does not answer it.

    Returns the 101 response once the session is over and both sockets are closed. An abnormal
    end on one leg closes the other with 1001 (client went away) or 1014 (instance went away).
    Cost: no task of its own, no buffering beyond what the sockets hold, two transports.
    """
    client_key = _check_client_handshake(request)
    offered = offered_protocols(request.headers)
    key = base64.b64encode(os.urandom(16)).decode()
    headers = _handshake_headers(upstream_headers)
    headers[hdrs.UPGRADE] = "websocket"
    headers[hdrs.CONNECTION] = "Upgrade"
    headers[hdrs.SEC_WEBSOCKET_VERSION] = "13"
    headers[hdrs.SEC_WEBSOCKET_KEY] = key
    if offered:
        headers[hdrs.SEC_WEBSOCKET_PROTOCOL] = ",".join(offered)
    try:
        upstream = await client.session.request(
            "GET", upstream_url(base_url, request), headers=headers, read_until_eof=False, allow_redirects=False,
        )
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise upstream_error_from(exc) from exc
    relay: ByteRelay | None = None
    session: RelaySession | None = None
    try:
        protocol = _check_instance_handshake(upstream, key, offered)
        conn = upstream.connection
        if conn is None or conn.protocol is None or conn.transport is None:
            raise UpstreamError("protocol", "instance connection gone after its 101", retryable=False, status=502)
        conn.protocol.read_timeout = None  # a quiet WebSocket is not a slow instance; heartbeats judge it
        response = web.StreamResponse(status=101, headers={
            hdrs.UPGRADE: "websocket", hdrs.CONNECTION: "upgrade", hdrs.SEC_WEBSOCKET_ACCEPT: accept_key(client_key),
        })
        if protocol:
            response.headers[hdrs.SEC_WEBSOCKET_PROTOCOL] = protocol
        rejected = merge_extra_headers(response.headers, extra_response_headers)
        if rejected:
            log.warning("dropped unsafe extra handshake headers: %s", ", ".join(rejected))
        response.force_close()
        await response.prepare(request)
        transport = request.transport
        if transport is None or transport.is_closing():
            return response
        relay = ByteRelay((transport, request.protocol), (conn.transport, conn.protocol),
                          max_message_bytes=max_message_bytes, heartbeat=heartbeat, close_timeout=_CLOSE_TIMEOUT)
        # aiohttp kept what either side sent after its 101; set_parser hands it over first
        parser: Any = relay.instance_feed
        conn.protocol.set_parser(parser, None)
        parser = relay.client_feed
        request.protocol.set_parser(parser)
        relay.tap()
        if registry is not None:
            session = RelaySession(relay)
            registry.add(session)
        await relay.wait()
        return response
    finally:
        if registry is not None and session is not None:
            registry.discard(session)
        if relay is not None and not relay.done:
            relay.abort()
        upstream.close()


def _handshake_headers(upstream_headers: CIMultiDict[str]) -> CIMultiDict[str]:
    headers = CIMultiDict(upstream_headers)
    for name in _HANDSHAKE_HEADERS:
        headers.popall(name, None)
    return headers


def _check_client_handshake(request: web.BaseRequest) -> str:
    """The client's Sec-WebSocket-Key, after the checks aiohttp's ``WebSocketResponse`` made."""
    if request.method != hdrs.METH_GET:
        raise web.HTTPMethodNotAllowed(request.method, [hdrs.METH_GET])
    headers = request.headers
    if "websocket" != headers.get(hdrs.UPGRADE, "").lower().strip():
        raise web.HTTPBadRequest(text=f"No WebSocket UPGRADE hdr: {headers.get(hdrs.UPGRADE)}")
    if "upgrade" not in headers.get(hdrs.CONNECTION, "").lower():
        raise web.HTTPBadRequest(text=f"No CONNECTION upgrade hdr: {headers.get(hdrs.CONNECTION)}")
    version = headers.get(hdrs.SEC_WEBSOCKET_VERSION, "")
    if version not in _VERSIONS:
        raise web.HTTPBadRequest(text=f"Unsupported version: {version}",
                                 headers={hdrs.SEC_WEBSOCKET_VERSION: "13"})
    key = headers.get(hdrs.SEC_WEBSOCKET_KEY, "")
    try:
        if not key or len(base64.b64decode(key, validate=True)) != 16:
            raise web.HTTPBadRequest(text=f"Handshake error: {key!r}")
    except binascii.Error:
        raise web.HTTPBadRequest(text=f"Handshake error: {key!r}") from None
    return key


def _check_instance_handshake(resp: aiohttp.ClientResponse, key: str, offered: tuple[str, ...]) -> str | None:
    """The subprotocol the instance chose (one we offered), after the checks aiohttp's client made."""
    problem = None
    if resp.status != 101:
        problem = "answered without upgrading"
    elif resp.headers.get(hdrs.UPGRADE, "").lower() != "websocket":
        problem = "invalid Upgrade header"
    elif resp.headers.get(hdrs.CONNECTION, "").lower() != "upgrade":
        problem = "invalid Connection header"
    elif resp.headers.get(hdrs.SEC_WEBSOCKET_ACCEPT, "") != accept_key(key):
        problem = "invalid Sec-WebSocket-Accept"
    elif resp.headers.get(hdrs.SEC_WEBSOCKET_EXTENSIONS):
        problem = "an extension nobody offered"
    if problem is not None:
        raise UpstreamError(
            "protocol", f"instance refused the WebSocket handshake with {resp.status}: {problem}",
            retryable=False, status=502, upstream_status=resp.status,
        )
    chosen = [p.strip() for p in resp.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(",")]
    return next((p for p in chosen if p and p in offered), None)
