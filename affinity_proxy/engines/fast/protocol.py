"""The client side of the fast engine: one asyncio Protocol per accepted connection.

``ClientConnection`` holds a client connection's state and its asyncio callbacks, runs one
``exchange.Exchange`` at a time, and gives the exchange what it needs from the client side
(``write``, ``exchange_done``, flow control). Finding where requests start and end (strict
framing, pipelining, llhttp's callbacks, the head cache and the replay lane) is ``RequestFraming``,
a mixin in this module; handing a request to aiohttp on the same socket (``handoff``) and ending
the connection (``closing``: error answers, lingering, deadlines) live in their own modules, as a
function and a mixin over the same state.

Flow control: a request body is streamed to the instance as it arrives; reading pauses while the
instance's socket is full (``UPSTREAM``), while body bytes pile up before the instance's
connection is ready (``PENDING``) or pipelined requests pile up (``BUFFER``), and the instance's
socket is paused while the client's is.

Request framing (``RequestFraming``: llhttp's callbacks and the request loop) is strict and done
before anything is routed. The connection finds the end of each request head itself (CRLF CRLF),
feeds exactly that head to llhttp (httptools), and then exactly the bytes of that request's body
(Content-Length, or the chunk boundaries ``wire.ChunkedEnd`` tracks), so it always knows where the
next request starts. llhttp rejects ambiguous framing (Content-Length with Transfer-Encoding,
repeated Content-Length, a Transfer-Encoding that does not end in chunked, invalid chunk sizes),
bad header names and values, and bare LF line ends: the client gets the aiohttp engine's JSON 400
and the connection is closed. A ``Transfer-Encoding`` other than exactly ``chunked`` (``gzip,
chunked`` passes llhttp) gets the engines' JSON 501, also closed; an HTTP/1.0 request framed by
``Transfer-Encoding`` closes after its response. A head over the raw limit gets 431. A body-less
head whose exact bytes were parsed before is taken from ``head.HeadCache`` instead; when that head
was last answered with a replay that still holds (fly mode), the answer is written by its
``lane.ReplayLane`` without an exchange, and when it was last forwarded from a memoized hot route
(or, cookie-less, as a new session) its ``forward_lane.ForwardLane`` (``MintLane``) forwards it
again. A request the fast engine does not serve itself
goes to aiohttp (``handoff``). Pipelined requests are served one at a time, in order: the bytes of request
N+1 wait unparsed until response N is complete (reading pauses when they pile up).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import httptools

from affinity_proxy.proxy.headers import FLY_CLIENT_IP_HEADER, FLY_FORWARDED_PROTO_HEADER
from affinity_proxy.proxy.realip import RealClient, real_client, trusted_proxies

from . import forward_lane, wire
from .closing import Closing
from .exchange import Exchange
from .forward_lane import LaneExchange
from .handoff import hand_off
from .head import HeadCache, RequestHead, for_aiohttp, text

if TYPE_CHECKING:
    from .ports import ServerPort

log = logging.getLogger("affinity_proxy.http")

_FLY_IP = FLY_CLIENT_IP_HEADER.lower().encode()
_FLY_PROTO = FLY_FORWARDED_PROTO_HEADER.lower().encode()

#: Unparsed bytes of pipelined requests kept while one is in flight, before reading pauses.
PIPELINE_LIMIT = 64 * 1024
#: Longest header block looked for before answering 431 (beyond ``limits.max_header_bytes``, whose
#: exact accounting is aiohttp's, reached by hand-off).
HEAD_SLACK = 8192


class RequestFraming:
    """llhttp's callbacks and the request loop of a client connection (see the module docstring)."""

    __slots__ = ()

    BUFFER: int  # the ``read_pause`` reason for piled-up pipelined bytes (``ClientConnection``)
    server: ServerPort
    parser: httptools.HttpRequestParser
    buf: bytes
    ex: Exchange | LaneExchange | None
    head: RequestHead | None
    msg_done: bool
    in_body: bool
    upgrade: bool
    _body_left: int
    _chunks: wire.ChunkedEnd | None
    body_seen: int
    read_pause: int
    write_paused: bool
    closing: bool
    eof: bool
    _processing: bool

    # ------------------------------------------------------------------ llhttp callbacks

    def on_url(self, url: bytes) -> None:
        assert self.head is not None
        self.head.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_body:  # a trailer of a chunked body: never forwarded, so not kept either
            return
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
        if lname in wire.CLIENT_CLAIMS:
            head.claims = True
        if lname not in wire.REQUEST_REPLACED and b"_" not in name and (value.isascii() or wire.utf8_ok(value)):
            head.lines.append(name + b": " + value + b"\r\n")
            if lname == wire.REQUEST_ID_B:
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
        coding = first.get(b"transfer-encoding")
        if coding is not None:
            head.chunked = True
            if coding.strip().lower() != b"chunked":  # llhttp accepts ``gzip, chunked``: 501
                head.te_unsupported = True
            if head.version == b"1.0":  # RFC 9112 6.1: close after the response
                head.keep_alive = False
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
            # While the client does not read (its write side paused) no new request starts: an
            # answer written without an exchange (replays, errors) would otherwise pile up in our
            # write buffer as fast as the client can send requests.
            while self.ex is None and not self.in_body and self.buf and not self.closing and not self.write_paused:
                if not self._next_request():
                    break
            if (self.ex is not None or self.write_paused) and len(self.buf) > PIPELINE_LIMIT:
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
            if head.te_unsupported:
                log.debug("rejected a request: Transfer-Encoding other than chunked")
                self._protocol_error(wire.TE_NOT_IMPLEMENTED)
                return False
            if self.upgrade or for_aiohttp(head, end, limits.max_header_bytes, limits.max_body_bytes):
                hand_off(self, buf)
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
        if (ex.memoized or ex.minted) and head.lane is None:  # repeats of this head may take ``forward_lane``
            forward_lane.remember(ex)
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
            self._protocol_error(wire.TE_NOT_IMPLEMENTED if wire.is_coding_error(str(exc)) else wire.MALFORMED)
            return False
        return True

    def _feed_body(self, data: bytes) -> bytes:
        """Feed the current request's body bytes to llhttp; return the bytes after its end."""
        chunks = self._chunks
        if chunks is not None:
            n = chunks.feed(data)
            finished = chunks.done
            if chunks.too_long:  # what llhttp would buffer without limit: a malformed body
                return self._bad_body("chunk line or trailers too long")
        else:
            n = min(self._body_left, len(data))
            self._body_left -= n
            finished = not self._body_left
        part = data if n == len(data) else data[:n]
        try:
            self.parser.feed_data(part)
        except httptools.HttpParserError as exc:
            return self._bad_body(exc)
        if self.ex is not None:
            self.ex.body_flush()
        if finished:
            self.in_body = False
            if not self.msg_done:  # our framing and llhttp's disagree: trust neither
                self.close_now()
                return b""
            if self.ex is None:
                self._process()
        return data[n:] if n < len(data) else b""

    def _bad_body(self, why: object) -> bytes:
        log.debug("rejected a malformed request body: %s", why)
        self.in_body = False
        ex = self.ex
        if ex is not None and not ex.finished:
            ex.malformed_body()
        else:
            self.server.counts.count_response(400)
            self.close_now()
        return b""


# --------------------------------------------------------------------------- the connection


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
        self.ex: Exchange | LaneExchange | None = None
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
            elif (not self.buf and self.ex is None and not self.read_pause and not self.write_paused
                  and len(data) <= HeadCache.MAX_BYTES):  # longer reads are never one cached head: not hashed
                head = self.server.heads.lanes.get(data)  # exactly one known head: maybe a lane's repeat
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

    def exchange_done(self, ex: Exchange | LaneExchange, *, keep_alive: bool) -> None:
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
