"""Request framing on a client connection: where each request starts and ends.

Framing is strict and done before anything is routed. The connection finds the end of each request
head itself (CRLF CRLF), feeds exactly that head to llhttp (httptools), and then exactly the bytes
of that request's body (Content-Length, or the chunk boundaries ``wire.ChunkedEnd`` tracks), so it
always knows where the next request starts. llhttp rejects ambiguous framing (Content-Length with
Transfer-Encoding, repeated Content-Length, a Transfer-Encoding that does not end in chunked,
invalid chunk sizes), bad header names and values, and bare LF line ends: the client gets the
aiohttp engine's JSON 400 and the connection is closed. A ``Transfer-Encoding`` other than exactly
``chunked`` (``gzip, chunked`` passes llhttp) gets the engines' JSON 501, also closed; an HTTP/1.0
request framed by ``Transfer-Encoding`` closes after its response. A head over the raw limit gets 431.
A body-less head whose exact bytes were parsed before is taken from ``head.HeadCache`` instead,
and in fly mode, when that head was last answered with a replay that still holds, the answer is
written by its ``lane.ReplayLane`` without an exchange. A request the fast engine does not serve
itself goes to aiohttp (``handoff``).

Pipelined requests are served one at a time, in order: the bytes of request N+1 wait unparsed
until response N is complete (reading pauses when they pile up). A request body is fed to llhttp,
and from there to the exchange, as it arrives.

``RequestFraming`` is a mixin of ``protocol.ClientConnection``, which holds the state (declared
below) and supplies the flow control (``pause_reading``/``resume_reading``), ``write`` and the
closing of the connection (``closing.Closing``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import httptools

from . import wire
from .exchange import Exchange
from .handoff import hand_off
from .head import RequestHead, for_aiohttp

if TYPE_CHECKING:
    from .ports import ServerPort

log = logging.getLogger("affinity_proxy.http")

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
    ex: Exchange | None
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
