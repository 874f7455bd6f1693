"""Hand-off: a request the fast engine does not serve goes to the aiohttp application, same socket.

Requests the fast engine does not serve itself (WebSocket and other upgrades, paths under
``/_affinity/``, ``CONNECT`` and ``TRACE`` (refused there), absolute-form or ``*`` targets, HTTP
versions other than 1.0 and 1.1, ``Expect`` other than ``100-continue``, a declared body over
``limits.max_body_bytes``, a header
block over ``limits.max_header_bytes`` or with more than 128 fields: ``head.for_aiohttp``) are
given to the aiohttp application on the same socket: the connection creates the aiohttp
``RequestHandler`` (``runner.server()``), switches the transport to it with
``transport.set_protocol``, calls its ``connection_made`` and feeds it the raw bytes of that
request head plus everything read after it. Nothing of that request was answered or consumed, so
aiohttp sees the connection as if it had accepted it; it keeps it until it closes (the fast engine
never takes it back). A WebSocket upgrade handed over this way is relayed like one the aiohttp
engine accepted itself (``engines.aiohttp.websocket``): after the 101 the handler installs the byte
relay (``engines.aiohttp.ws_relay``) as that connection's parser, so the session's bytes go from
this socket to the instance's as they are, frame headers read, nothing decoded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .ports import ConnectionPort


def hand_off(conn: ConnectionPort, data: bytes) -> None:
    """Give ``conn``'s socket to a fresh aiohttp handler, starting with ``data`` (the request head
    that was not served and everything after it). The connection is forgotten by the server."""
    transport = conn.transport
    if transport is None:
        return
    conn.handed_off = True
    conn.closing = True
    conn.server.forget(conn)
    conn.transport = None
    if conn.read_pause:
        conn.read_pause = 0
        transport.resume_reading()
    handler = conn.server.aiohttp_protocol()
    transport.set_protocol(handler)
    handler.connection_made(transport)
    if data:
        handler.data_received(data)
