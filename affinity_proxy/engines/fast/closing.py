"""How a client connection ends: error answers, closes, lingering, and the deadline check.

``Closing`` is a mixin of ``protocol.ClientConnection`` (which holds the state declared below and
supplies ``write``). A protocol error is answered with the aiohttp engine's JSON error, then the
connection lingers (``linger``: half-close and drop what the client still sends, so the answer is
not destroyed by a reset); ``check`` is the per-connection part of ``FastServer``'s periodic
sweep, which enforces ``limits.client_timeout`` on idle connections, stalled request bodies and
clients that stopped reading, and ends lingering closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from . import wire

if TYPE_CHECKING:
    from .exchange import Exchange
    from .ports import ServerPort

log = logging.getLogger("affinity_proxy.http")

LINGER = 2.0


class Closing:
    """The end of a client connection (see the module docstring)."""

    __slots__ = ()

    server: ServerPort
    transport: asyncio.Transport | None
    ex: Exchange | None
    buf: bytes
    in_body: bool
    closing: bool
    read_pause: int
    write_paused: bool
    write_paused_since: float
    last_rx: float
    idle_since: float
    linger_until: float

    def _protocol_error(self, error: tuple[int, str, str]) -> None:
        status, message, code = error
        self.server.counts.count_response(status)
        self.write(wire.protocol_error(status, message, code))
        self.linger()

    def close_soon(self) -> None:
        """Close after the written bytes are flushed."""
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def close_now(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def linger(self) -> None:
        """Close without destroying the answer in flight: stop writing, drop what the client still
        sends, and close when it closes or after ``LINGER`` seconds (closing with unread request
        bytes would send a RST that can destroy the answer before the client reads it)."""
        self.closing = True
        self.in_body = False
        self.buf = b""
        transport = self.transport
        if transport is None:
            return
        self.read_pause = 0
        try:
            transport.resume_reading()
        except RuntimeError:
            pass
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except (OSError, RuntimeError):
                transport.close()
                return
            self.linger_until = time.monotonic() + LINGER
        else:
            transport.close()

    def check(self, now: float, client_timeout: float) -> None:
        """The periodic deadline check (``FastServer``'s sweep): idle and half-sent requests,
        stalled request bodies, clients that stopped reading, lingering closes."""
        if self.transport is None:
            return
        if self.linger_until:
            if now > self.linger_until:
                self.close_now()
            return
        if self.write_paused and now - self.write_paused_since > client_timeout:
            log.info("closing connection: client stopped reading for %.1fs", client_timeout)
            self.close_now()
        elif self.in_body and not self.read_pause and now - self.last_rx > client_timeout:
            log.info("closing connection: request body stalled for %.1fs", now - self.last_rx)
            self.close_now()
        elif self.ex is None and not self.in_body and now - self.idle_since > client_timeout:
            self.close_soon()
            # A graceful close waits for the write buffer to drain: a client that never reads a
            # response too small to pause the writer would keep it (and its connection slot) for
            # ever. Abort after one more client_timeout, as the aiohttp engine's closing deadline does.
            self.linger_until = now + client_timeout
