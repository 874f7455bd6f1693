"""Bytes on the wire for the fast engine: header blocks, canned answers and framing helpers.

Pure and synchronous (stdlib, ``proxy.headers`` for the header rules, ``proxy.act`` for the
proxy's own answers, aiohttp's ``Server`` banner); no asyncio. It puts the shared rules and values
on raw ``bytes`` so the hot path never builds multidicts or decodes headers it only relays.
Header names and values reaching here were validated by llhttp (tokens; no CR, LF or NUL), so the
only safety check left is UTF-8 for values with non-ASCII bytes, as in
``proxy.headers.is_safe_value``.
"""

from __future__ import annotations

import itertools
import secrets
import time
from email.utils import formatdate
from http import HTTPStatus

from aiohttp.http import SERVER_SOFTWARE

from affinity_proxy.proxy.act import Answer, error
from affinity_proxy.proxy.headers import CLIENT_CLAIMS as _CLAIMS
from affinity_proxy.proxy.headers import (
    FORWARDED_FOR_HEADER,
    FORWARDED_PROTO_HEADER,
    HOP_BY_HOP,
    INSTANCE_HEADER,
    REQUEST_DROPPED,
    REQUEST_ID_HEADER,
    UNSUPPORTED_CODING,
)
from affinity_proxy.proxy.headers import IDEMPOTENT_METHODS as IDEMPOTENT_METHODS
from affinity_proxy.proxy.headers import is_coding_error as is_coding_error
from affinity_proxy.routing.replay import FORCE_INSTANCE_HEADER

Header = tuple[bytes, bytes]

HOP_BY_HOP_B: frozenset[bytes] = frozenset(h.encode() for h in HOP_BY_HOP)
#: Header names as the lower-case bytes llhttp heads are keyed by.
FORCE_INSTANCE_B = FORCE_INSTANCE_HEADER.encode()
FORWARDED_FOR_B = FORWARDED_FOR_HEADER.lower().encode()
FORWARDED_PROTO_B = FORWARDED_PROTO_HEADER.lower().encode()
REQUEST_ID_B = REQUEST_ID_HEADER.lower().encode()
REQUEST_ID_LINE = REQUEST_ID_HEADER.encode() + b": "
#: The body framing, which this engine writes itself (Content-Length, Transfer-Encoding) or answers
#: (Expect: 100-continue), as aiohttp's client and server do for the other engine.
FRAMING: frozenset[bytes] = frozenset({b"content-length", b"expect"})
#: Request lines never copied upstream as received (``proxy.headers.REQUEST_DROPPED`` and the
#: framing): the head's ``lines`` are filtered against this as they are parsed.
REQUEST_REPLACED: frozenset[bytes] = frozenset(h.encode() for h in REQUEST_DROPPED) | FRAMING
#: ``proxy.headers.CLIENT_CLAIMS``: not forwarded from an untrusted peer.
CLIENT_CLAIMS: frozenset[bytes] = frozenset(h.encode() for h in _CLAIMS)
#: Response headers the proxy replaces with its own value.
RESPONSE_REPLACED: frozenset[bytes] = HOP_BY_HOP_B | {INSTANCE_HEADER.lower().encode()}
#: aiohttp's client sends ``Content-Length: 0`` for a body-less request of any other method.
NO_BODY_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: Fields a request may carry once (aiohttp's parser rejects repeats, RFC 9110 5.3).
SINGLETON_HEADERS: frozenset[bytes] = frozenset({
    b"content-length", b"content-location", b"content-range", b"content-type", b"etag", b"host",
    b"max-forwards", b"server", b"transfer-encoding", b"user-agent",
})
_STANDARD_TOKENS = frozenset({b"keep-alive", b"close", b"upgrade", b""})
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
#: What the aiohttp engine's responses say (aiohttp's default): on the proxy's own answers and on
#: relayed responses whose instance sent no ``Server`` (an instance's own is relayed unchanged).
SERVER_LINE = b"Server: %s\r\n" % SERVER_SOFTWARE.encode()
LAST_CHUNK = b"0\r\n\r\n"


def utf8_ok(value: bytes) -> bool:
    """True when ``value`` may be emitted as a header value (ASCII, or valid UTF-8)."""
    if value.isascii():
        return True
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    """Lower-case names listed in ``Connection`` values that are not already hop-by-hop."""
    tokens = {t.strip().lower() for v in values for t in v.split(b",")}
    return frozenset(tokens - _STANDARD_TOKENS - HOP_BY_HOP_B)


class HttpDate:
    """The ``Date`` header value, formatted once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


http_date = HttpDate()


class RequestIds:
    """Cheap process-unique request ids: a random per-process prefix plus a counter (no per-request
    randomness). 21 bytes, ``[0-9a-f-]``."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(6).encode() + b"-"
        self._counter = itertools.count(1)

    def __call__(self) -> bytes:
        return b"%s%08x" % (self._prefix, next(self._counter) & 0xFFFFFFFF)


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def status_line(version: bytes, status: int, reason: bytes | None) -> bytes:
    return b"HTTP/%s %d %s\r\n" % (version, status, reason or reason_phrase(status))


def connection_header(keep_alive: bool, version: bytes) -> bytes:
    if not keep_alive:
        return b"Connection: close\r\n"
    return b"Connection: keep-alive\r\n" if version == b"1.0" else b""


def canned_response(
    status: int, body: bytes, *, version: bytes = b"1.1", keep_alive: bool = True,
    headers: list[Header] | tuple[Header, ...] = (), content_type: bytes = b"application/json",
    head_only: bool = False,
) -> bytes:
    """A complete answer produced by the proxy itself (error, replay), framed by Content-Length
    (``head_only``: the answer to a HEAD request, whose Content-Length announces a body not sent)."""
    parts = [status_line(version, status, None)]
    parts.extend(b"%s: %s\r\n" % h for h in headers)
    parts.append(b"Content-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n" % (content_type, len(body), http_date()))
    parts.append(SERVER_LINE)
    parts.append(connection_header(keep_alive, version))
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def answer_bytes(answer: Answer, *, version: bytes = b"1.1", keep_alive: bool = True, head_only: bool = False) -> bytes:
    """An ``act.Answer`` (the proxy's own JSON answer) on the wire."""
    headers = tuple((name.encode(), value.encode()) for name, value in answer.headers)
    return canned_response(answer.status, answer.body, version=version, keep_alive=keep_alive, headers=headers,
                           head_only=head_only)


def error_response(status: int, message: str, code: str, *, version: bytes = b"1.1", keep_alive: bool = True,
                   head_only: bool = False) -> bytes:
    """``act.error`` on the wire."""
    return answer_bytes(error(status, message, code), version=version, keep_alive=keep_alive, head_only=head_only)


#: What the aiohttp protocol answers to a request it cannot parse (``web.server``), connection closed.
MALFORMED = (400, "malformed request", "malformed_request")
HEADERS_OVERFLOW = (431, "request header fields too large", "request_header_fields_too_large")
TE_NOT_IMPLEMENTED = UNSUPPORTED_CODING


def protocol_error(status: int, message: str, code: str) -> bytes:
    return error_response(status, message, code, keep_alive=False)



def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class ChunkedEnd:
    """Finds where a chunked body ends in a byte stream, without decoding it.

    llhttp decodes and validates the body; this only tracks chunk boundaries so the connection
    knows which bytes belong to the current request and which to the next pipelined one. ``feed``
    returns the number of bytes of ``data`` that belong to the body: ``len(data)`` while it goes
    on, less once it has ended (``done`` is then True). On syntax llhttp rejects too (a size that
    is not hex), it claims everything and leaves the error to llhttp. A chunk-size line (with its
    extensions) over ``MAX_LINE`` or trailers over ``MAX_LINE`` in all set ``too_long``: llhttp has
    no limit of its own, so an endless extension or endless trailers would be buffered without end.
    O(chunks) per call.
    """

    __slots__ = ("_line", "_remaining", "_state", "_trailers", "done", "too_long")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)
    MAX_LINE = 8192

    def __init__(self) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._line = b""
        self._trailers = 0
        self.done = False
        self.too_long = False

    def feed(self, data: bytes) -> int:
        i, n = 0, len(data)
        while i < n and not self.done:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, n - i)
                i += take
                self._remaining -= take
                if not self._remaining:
                    self._state = self._DATA_END
                    self._remaining = 2
            elif state == self._DATA_END:
                take = min(self._remaining, n - i)
                i += take
                self._remaining -= take
                if not self._remaining:
                    self._state = self._SIZE
            else:
                end = data.find(b"\n", i)
                if end < 0:
                    self._line += data[i:]
                    if len(self._line) > self.MAX_LINE:  # an endless line: stop buffering it
                        self.too_long = True
                    return n
                line = (self._line + data[i:end]).rstrip(b"\r")
                self._line = b""
                i = end + 1
                if len(line) > self.MAX_LINE:
                    self.too_long = True
                    return n
                if state == self._TRAILER:
                    if not line:
                        self.done = True
                    else:
                        self._trailers += len(line) + 2
                        if self._trailers > self.MAX_LINE:  # endless trailers: llhttp would keep them all
                            self.too_long = True
                            return n
                    continue
                size_text = line.split(b";", 1)[0]
                try:
                    if not size_text or not size_text.isalnum():
                        raise ValueError(size_text)
                    size = int(size_text, 16)
                except ValueError:
                    return n  # llhttp reports the error
                if size == 0:
                    self._state = self._TRAILER
                else:
                    self._state = self._DATA
                    self._remaining = size
        return i
