"""The client side of the fast engine: one asyncio Protocol per accepted connection.

Framing is strict and done before anything is routed. The connection finds the end of each request
head itself (CRLF CRLF), feeds exactly that head to llhttp (httptools), and then exactly the bytes
of that request's body (Content-Length, or the chunk boundaries ``wire.ChunkedEnd`` tracks), so it
always knows where the next request starts. llhttp rejects ambiguous framing (Content-Length with
Transfer-Encoding, repeated Content-Length, a Transfer-Encoding that does not end in chunked,
invalid chunk sizes), bad header names and values, and bare LF line ends: the client gets the
aiohttp engine's JSON 400 and the connection is closed. A head over the raw limit gets 431.
A body-less head whose exact bytes were parsed before is taken from ``head.HeadCache`` instead,
and in fly mode, when that head was last answered with a replay that still holds, the answer is
written by its ``lane.ReplayLane`` without an exchange.

Pipelined requests are served one at a time, in order: the bytes of request N+1 wait unparsed
until response N is complete (reading pauses when they pile up). A request body is streamed to the
instance as it arrives; reading pauses while the instance's socket is full, and the instance's
socket is paused while the client's is.

**Hand-off.** Requests the fast engine does not serve itself (WebSocket and other upgrades, paths
under ``/_affinity/``, ``CONNECT``, absolute-form or ``*`` targets, HTTP versions other than 1.0
and 1.1, ``Expect`` other than ``100-continue``, a declared body over ``limits.max_body_bytes``,
a header block over ``limits.max_header_bytes`` or with more than 128 fields) are given to the
aiohttp application on the same socket: the connection creates the aiohttp ``RequestHandler``
(``runner.server()``), switches the transport to it with ``transport.set_protocol``, calls its
``connection_made`` and feeds it the raw bytes of that request head plus everything read after it.
Nothing of that request was answered or consumed, so aiohttp sees the connection as if it had
accepted it; it keeps it until it closes (the fast engine never takes it back).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import httptools

from . import wire
from .exchange import Exchange
from .head import RequestHead, for_aiohttp

if TYPE_CHECKING:
    from .server import FastServer

log = logging.getLogger("affinity_proxy.http")

#: Unparsed bytes of pipelined requests kept while one is in flight, before reading pauses.
PIPELINE_LIMIT = 64 * 1024
#: Longest header block looked for before answering 431 (beyond ``limits.max_header_bytes``, whose
#: exact accounting is aiohttp's, reached by hand-off).
HEAD_SLACK = 8192
LINGER = 2.0


class ClientConnection(asyncio.Protocol):
    """One client socket. Callbacks never raise; every failure becomes an answer or a close."""

    BUFFER, PENDING, UPSTREAM = 1, 2, 4

    __slots__ = (
        "_body_left",
        "_chunks",
        "_handed_off",
        "_processing",
        "admitted",
        "body_seen",
        "buf",
        "closing",
        "eof",
        "ex",
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
        "server",
        "transport",
        "upgrade",
        "write_paused",
        "write_paused_since",
    )

    def __init__(self, server: FastServer) -> None:
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
        self.admitted = False
        self._handed_off = False
        self._processing = False
        self.lanes = server.router.fly  # repeats of fly replays may take ``lane.ReplayLane``

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple | list) and peer else None
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
            elif self.lanes and not self.buf and self.ex is None and not self.read_pause:
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

    # ------------------------------------------------------------------ llhttp callbacks

    def on_url(self, url: bytes) -> None:
        assert self.head is not None
        self.head.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self.head
        assert head is not None
        if value and value[-1] in (32, 9):
            value = value.rstrip(b" \t")
        head.headers.append((name, value))
        lname = name.lower()
        first = head.first
        if lname not in first:
            first[lname] = value
        elif lname in wire.SINGLETON_HEADERS:
            head.malformed = True
        if lname not in wire.REQUEST_REPLACED and (value.isascii() or wire.utf8_ok(value)):
            head.lines.append(name + b": " + value + b"\r\n")
            if lname == b"x-request-id":
                head.has_rid = True

    def on_headers_complete(self) -> None:
        head = self.head
        assert head is not None
        parser = self.parser
        head.method = parser.get_method().decode("ascii", "replace")
        head.version = parser.get_http_version().encode()
        head.keep_alive = parser.should_keep_alive()
        self.upgrade = parser.should_upgrade()
        length = head.first.get(b"content-length")
        if length is not None:
            head.content_length = int(length)  # llhttp accepted it: digits only, no duplicate
        first = head.first
        head.chunked = b"transfer-encoding" in first
        if (head.version == b"1.1" and b"host" not in first) or b"sec-websocket-key1" in first:
            head.malformed = True
        if b"connection" in first and wire.connection_tokens(head.all(b"connection")):
            head.odd = True

    def on_body(self, data: bytes) -> None:
        self.body_seen += len(data)
        ex = self.ex
        if self.body_seen > self.server.ctx.config.limits.max_body_bytes:
            if ex is not None:
                ex.body_too_large()
            else:
                self.close_now()
            return
        if ex is not None:
            ex.body_data(data)

    def on_message_complete(self) -> None:
        self.msg_done = True
        if self.ex is not None:
            self.ex.body_end()

    # ------------------------------------------------------------------ requests

    def _process(self) -> None:
        """Start the next request(s) while none is in flight. Re-entrant calls return at once:
        an exchange that finishes synchronously lets the loop below go on."""
        if self._processing:
            return
        self._processing = True
        try:
            while self.ex is None and not self.in_body and self.buf and not self.closing:
                if not self._next_request():
                    break
            if self.ex is not None and len(self.buf) > PIPELINE_LIMIT:
                self.pause_reading(self.BUFFER)
            elif self.read_pause:
                self.resume_reading(self.BUFFER)
            if self.eof and self.ex is None and not self.in_body and not self.closing:
                self.close_soon()
        finally:
            self._processing = False

    def _next_request(self) -> bool:
        buf = self.buf
        while buf.startswith(b"\r\n"):  # RFC 9112 2.2: ignore empty lines before a request line
            buf = buf[2:]
        self.buf = buf
        end = buf.find(b"\r\n\r\n")
        limits = self.server.ctx.config.limits
        if end < 0:
            if len(buf) > limits.max_header_bytes + HEAD_SLACK:
                self._protocol_error(wire.HEADERS_OVERFLOW)
            elif b"\n\n" in buf:  # bare LF line ends: a head that cannot end in CRLF CRLF
                log.debug("rejected a malformed request: bare LF line ends")
                self._protocol_error(wire.MALFORMED)
            return False
        end += 4
        data = buf[:end] if end < len(buf) else buf
        heads = self.server.heads
        head = heads.get(data)
        if head is not None:  # these very bytes were parsed, checked and found body-less before
            lane = head.lane
            if lane is not None and lane.answer(self, head):  # a repeat of a replay: answered
                self.buf = buf[end:] if end < len(buf) else b""
                return True
            self.head = head
            self.msg_done = True
        else:
            if not self._feed_head(data):
                return False
            head = self.head
            assert head is not None
            if head.malformed:  # what aiohttp's parser rejects on top of llhttp
                log.debug("rejected a malformed request: duplicate singleton header, no Host or old WebSocket")
                self._protocol_error(wire.MALFORMED)
                return False
            if self.upgrade or for_aiohttp(head, end, limits.max_header_bytes, limits.max_body_bytes):
                self._hand_off(buf)
                return False
            if self.msg_done:
                heads.put(data, head)
        self.buf = buf[end:] if end < len(buf) else b""
        if not self.msg_done:
            self.in_body = True
            self.body_seen = 0
            if head.chunked:
                self._chunks = wire.ChunkedEnd()
            else:
                self._chunks = None
                self._body_left = head.content_length or 0
        ex = self.ex = Exchange(self, head, self.server, self.msg_done)
        if self.in_body and head.version == b"1.1" and b"expect" in head.first:
            self.write(wire.CONTINUE_100)
        ex.begin()
        if self.in_body and self.buf:
            data, self.buf = self.buf, b""
            rest = self._feed_body(data)
            self.buf = rest + self.buf if self.buf else rest
        return True

    def _feed_head(self, data: bytes) -> bool:
        self.head = RequestHead()
        self.msg_done = False
        self.upgrade = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.upgrade = True
        except httptools.HttpParserError as exc:
            log.debug("rejected a malformed request: %s", exc)
            self._protocol_error(wire.MALFORMED)
            return False
        return True

    def _feed_body(self, data: bytes) -> bytes:
        """Feed the current request's body bytes to llhttp; return the bytes after its end."""
        chunks = self._chunks
        if chunks is not None:
            n = chunks.feed(data)
            finished = chunks.done
        else:
            n = min(self._body_left, len(data))
            self._body_left -= n
            finished = not self._body_left
        part = data if n == len(data) else data[:n]
        try:
            self.parser.feed_data(part)
        except httptools.HttpParserError as exc:
            log.debug("rejected a malformed request body: %s", exc)
            self.in_body = False
            ex = self.ex
            if ex is not None and not ex.finished:
                ex.malformed_body()
            else:
                self.server.counts.count_response(400)
                self.close_now()
            return b""
        if finished:
            self.in_body = False
            if not self.msg_done:  # our framing and llhttp's disagree: trust neither
                self.close_now()
                return b""
            if self.ex is None:
                self._process()
        return data[n:] if n < len(data) else b""

    # ------------------------------------------------------------------ hand-off to aiohttp

    def _hand_off(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        self._handed_off = True
        self.closing = True
        self.server.forget(self)
        self.transport = None
        if self.read_pause:
            self.read_pause = 0
            transport.resume_reading()
        handler = self.server.aiohttp_protocol()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if data:
            handler.data_received(data)

    # ------------------------------------------------------------------ used by the exchange

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

    # ------------------------------------------------------------------ closing

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
