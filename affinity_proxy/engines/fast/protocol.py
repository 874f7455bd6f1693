"""The client side of the fast engine: one asyncio Protocol per accepted connection.

``ClientConnection`` holds a client connection's state and its asyncio callbacks, runs one
``exchange.Exchange`` at a time, and gives the exchange what it needs from the client side
(``write``, ``exchange_done``, flow control). Its other jobs live in their own modules, as
mixins or functions over the same state: finding where requests start and end (``framing``:
strict framing, pipelining, llhttp's callbacks, the head cache and the replay lane), handing a
request to aiohttp on the same socket (``handoff``) and ending the connection (``closing``: error
answers, lingering, deadlines).

Flow control: a request body is streamed to the instance as it arrives; reading pauses while the
instance's socket is full (``UPSTREAM``), while body bytes pile up before the instance's
connection is ready (``PENDING``) or pipelined requests pile up (``BUFFER``), and the instance's
socket is paused while the client's is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import httptools

from affinity_proxy.proxy.headers import FLY_CLIENT_IP_HEADER, FLY_FORWARDED_PROTO_HEADER
from affinity_proxy.proxy.realip import RealClient, real_client, trusted_proxies

from . import wire
from .closing import Closing
from .framing import RequestFraming
from .head import RequestHead, text

if TYPE_CHECKING:
    from .exchange import Exchange
    from .ports import ServerPort

log = logging.getLogger("affinity_proxy.http")

_FLY_IP = FLY_CLIENT_IP_HEADER.lower().encode()
_FLY_PROTO = FLY_FORWARDED_PROTO_HEADER.lower().encode()


class ClientConnection(RequestFraming, Closing, asyncio.Protocol):
    """One client socket. Callbacks never raise; every failure becomes an answer or a close."""

    BUFFER, PENDING, UPSTREAM = 1, 2, 4

    __slots__ = (
        "_body_left",
        "_chunks",
        "_client",
        "_processing",
        "admitted",
        "body_seen",
        "buf",
        "closing",
        "eof",
        "ex",
        "handed_off",
        "head",
        "idle_since",
        "in_body",
        "lanes",
        "last_rx",
        "linger_until",
        "msg_done",
        "parser",
        "peer",
        "read_pause",
        "scheme",
        "server",
        "transport",
        "upgrade",
        "write_paused",
        "write_paused_since",
    )

    def __init__(self, server: ServerPort) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.buf = b""
        self.ex: Exchange | None = None
        self.head: RequestHead | None = None
        self.msg_done = True
        self.in_body = False
        self.upgrade = False
        self._body_left = 0
        self._chunks: wire.ChunkedEnd | None = None
        self.body_seen = 0
        self.read_pause = 0
        self.write_paused = False
        self.write_paused_since = 0.0
        self.last_rx = self.idle_since = time.monotonic()
        self.linger_until = 0.0
        self.closing = False
        self.eof = False
        self.peer: str | None = None
        self.scheme = "http"
        self._client: tuple[object, RealClient] | None = None  # (config, answer) for an untrusted peer
        self.admitted = False
        self.handed_off = False
        self._processing = False
        self.lanes = server.router.fly  # repeats of fly replays may take ``lane.ReplayLane``

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple | list) and peer else None
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        if not self.server.admit(self):
            return
        self.admitted = True
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        if self.closing:
            return  # lingering after an error answer: read and drop
        try:
            if self.in_body:
                data = self._feed_body(data)
                if not data or self.closing:
                    return
            elif self.lanes and not self.buf and self.ex is None and not self.read_pause and not self.write_paused:
                head = self.server.heads.get(data)  # exactly one known head: maybe a replay's repeat
                if head is not None and head.lane is not None and head.lane.answer(self, head):
                    return
            self.buf = self.buf + data if self.buf else data
            self._process()
        except Exception:  # a bug must cost this connection only, never the loop's callback
            log.exception("fast engine: unexpected error; connection dropped")
            self.close_now()

    def eof_received(self) -> bool:
        self.eof = True
        if self.closing or (self.ex is None and not self.in_body):
            return False  # nothing in flight (a partial head can never complete now)
        if self.in_body:
            # A request body that can never complete: drop the connection and with it the
            # instance's (``connection_lost``), as the aiohttp engine does. Keeping it half-open
            # held a backend connection and a ``max_connections`` slot until client_timeout.
            log.debug("client closed in the middle of a request body; connection dropped")
            self.close_now()
            return False
        return True  # finish the request in flight, then close

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.closing = True
        ex, self.ex = self.ex, None
        if ex is not None:
            ex.client_lost()
        self.server.forget(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_since = time.monotonic()
        if self.ex is not None:
            self.ex.client_writable(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.ex is not None:
            self.ex.client_writable(True)
        elif self.buf and not self.in_body and not self.closing:
            self._process()  # pipelined requests held back while the client was not reading

    # ------------------------------------------------------------------ used by the exchange

    def real_client(self, head: RequestHead) -> RealClient:
        """``forwarding.realip`` for ``head`` from this peer: the same answer for every request of
        an untrusted peer (memoized per connection), per head from a trusted one (memoized on the
        head, which repeats byte for byte from the same proxy and client)."""
        config = self.server.ctx.config
        memo = self._client
        if memo is not None and memo[0] is config:
            return memo[1]
        proxies = trusted_proxies(config.trusted_proxy_cidrs)
        if not proxies.trusts(self.peer):
            found = RealClient(self.peer, self.scheme, False)
            self._client = (config, found)
            return found
        hmemo = head.client_memo
        if hmemo is not None and hmemo[0] is proxies and hmemo[1] == self.peer and hmemo[2] == self.scheme:
            return hmemo[3]  # type: ignore[no-any-return]
        first = head.first
        fly_ip, fly_proto = first.get(_FLY_IP), first.get(_FLY_PROTO)
        found = real_client(
            proxies, self.peer, self.scheme,
            forwarded_for=[text(v) for v in head.all(wire.FORWARDED_FOR_B)] if wire.FORWARDED_FOR_B in first else (),
            forwarded_proto=([text(v) for v in head.all(wire.FORWARDED_PROTO_B)]
                             if wire.FORWARDED_PROTO_B in first else ()),
            fly_client_ip=text(fly_ip) if fly_ip is not None else None,
            fly_proto=text(fly_proto) if fly_proto is not None else None,
        )
        head.client_memo = (proxies, self.peer, self.scheme, found)
        return found

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def exchange_done(self, ex: Exchange, *, keep_alive: bool) -> None:
        if self.ex is not ex:
            return
        self.ex = None
        self.idle_since = time.monotonic()
        if self.server.closing:
            self.server.exchange_finished()
        if self.read_pause:
            self.resume_reading(self.PENDING | self.UPSTREAM)
        if self.transport is None:
            return
        if not keep_alive:
            if self.in_body or self.buf or not self.msg_done:
                self.linger()
            else:
                self.close_soon()
            return
        if (self.buf or self.eof) and not self.in_body and not self._processing:
            self._process()

    def pause_reading(self, why: int) -> None:
        if not self.read_pause and self.transport is not None:
            try:
                self.transport.pause_reading()
            except RuntimeError:
                return
        self.read_pause |= why

    def resume_reading(self, why: int) -> None:
        if not self.read_pause & why:
            return
        self.read_pause &= ~why
        if not self.read_pause and self.transport is not None:
            self.last_rx = time.monotonic()
            try:
                self.transport.resume_reading()
            except RuntimeError:
                pass
