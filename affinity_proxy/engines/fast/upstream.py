"""One keep-alive connection to an instance: an asyncio Protocol carrying one exchange at a time.

``UpstreamConnection`` writes a request and parses the response with httptools (llhttp), handing
every event to the exchange that owns it (the ``Relay`` protocol below), which streams it to the
client; a response whose exact head bytes were parsed before (``response.ResponseCache``) and
that arrives whole in one read skips llhttp. Nothing here knows about routing or HTTP semantics
beyond framing. HEAD responses are cut after the head (llhttp cannot know they have no body),
and a response without framing ends when the instance closes. Pooling lives in ``pool``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Protocol
from urllib.parse import urlsplit

import httptools

from affinity_proxy.membership.private_net import is_private_name

from .response import ResponseCache, ResponseHead

log = logging.getLogger("affinity_proxy.fastpath.upstream")

#: The aiohttp engine's limits on a response head (``forwarding.client``: 128 fields of at most
#: 32 KiB). llhttp has none of its own: without them an endless head is buffered without end.
MAX_FIELDS = 128
MAX_HEAD_BYTES = MAX_FIELDS * (32 * 1024 + 4) + 8192
#: Most bytes taken from an instance's socket in one read. The event loop's own reads are up to
#: 256 KiB: all of such a read lands in the client's write buffer before the client's pause stops
#: the next one, so a client that stops reading held ~340 KiB of RSS each; with 64 KiB, ~150 KiB.
READ_SIZE = 64 * 1024
_read_buffer = memoryview(bytearray(READ_SIZE))  # shared: each read is copied out before the next


def tls_context() -> ssl.SSLContext:
    """The client TLS context for ``https://`` instances: what aiohttp's client (the aiohttp engine)
    uses by default, so both engines accept the same certificates: the system's trust store (which
    honours ``SSL_CERT_FILE``/``SSL_CERT_DIR``), hostname checked, ALPN ``http/1.1``."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(("http/1.1",))
    return context


class Origin:
    """Where one instance URL points: host, port, TLS (with SNI and the certificate checked for
    ``server_hostname``), and the path prefix to put before targets."""

    __slots__ = ("host", "host_header", "key", "port", "prefix", "private", "server_hostname", "ssl")

    def __init__(self, url: str, tls: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        self.key = url
        self.ssl: ssl.SSLContext | None = (tls or tls_context()) if parts.scheme == "https" else None
        self.host = parts.hostname or "127.0.0.1"
        self.private = is_private_name(self.host)  # Fly's 6PN: resolved by ``PrivateNet``
        self.server_hostname = self.host.rstrip(".") if self.ssl else None  # as aiohttp's client sends it
        self.port = parts.port or (443 if self.ssl else 80)
        self.prefix = parts.path.rstrip("/").encode()
        default_port = 443 if self.ssl else 80
        netloc = parts.netloc.rsplit("@", 1)[-1]
        self.host_header = (netloc if parts.port != default_port else parts.hostname or netloc).encode("idna")

class Pool(Protocol):
    """What a connection needs of its pool (``pool.UpstreamPool``): the shared response cache and
    the way back. A protocol so that this module does not import the pool that imports it."""

    responses: ResponseCache

    def release(self, conn: UpstreamConnection) -> None: ...

    def discard(self, conn: UpstreamConnection) -> None: ...


class Relay(Protocol):
    """What an upstream connection reports to the request it carries (``exchange.Exchange``)."""

    def upstream_head(self, head: ResponseHead) -> None: ...
    def upstream_body(self, data: bytes) -> None: ...
    def upstream_end(self, reusable: bool) -> None: ...
    def upstream_whole(self, head: ResponseHead, body: bytes) -> None: ...
    def upstream_failed(self, kind: str, message: str, *, sent: bool) -> None: ...
    def upstream_writable(self, writable: bool) -> None: ...
    def flush(self) -> None: ...


class _HeadDone(Exception):
    """Raised inside llhttp's callback to stop after the head of a HEAD response."""


class UpstreamConnection(asyncio.BufferedProtocol):
    """One socket to an instance; carries one exchange at a time. Reads go through one buffer
    shared by every connection of the process (``READ_SIZE``): the loop calls ``get_buffer`` and
    ``buffer_updated`` back to back, and the bytes are copied out in between."""

    __slots__ = ("_cut_head", "_first_read", "_got_bytes", "_meta", "_parser", "_pool", "_reads", "head",
                 "idle_since", "last_rx", "origin", "paused", "relay", "reused", "sent_all", "stalled_since", "started",
                 "transport")

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.relay: Relay | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.head = ResponseHead()
        self._reads = 0  # reads of the current response fed to llhttp
        self._first_read = b""
        self._cut_head = False
        self.started = False  # the current response's head arrived
        self.sent_all = False  # the whole request was written (read timeout applies from then)
        self.reused = False
        self.paused = False
        self._got_bytes = False
        self._meta = 0  # bytes read since the last body bytes (heads, 1xx, trailers): ``MAX_HEAD_BYTES``
        self.stalled_since = 0.0  # when the instance stopped reading our writes (0: it reads)
        self.last_rx = 0.0
        self.idle_since = 0.0

    # ------------------------------------------------------------------ exchange side

    def send(self, relay: Relay, data: bytes, *, head_only: bool, complete: bool) -> None:
        """Start an exchange: write the request head (and any body bytes already there)."""
        self.relay = relay
        self._reads = 0
        self.started = False
        self._got_bytes = False
        self._meta = 0
        self._cut_head = head_only
        self.sent_all = complete
        self.last_rx = time.monotonic()
        assert self.transport is not None
        self.transport.write(data)

    def write(self, data: bytes, *, complete: bool = False) -> None:
        if self.transport is not None:
            self.transport.write(data)
        if complete:
            self.sent_all = True
            self.last_rx = time.monotonic()

    def pause(self) -> None:
        self.paused = True
        if self.transport is not None:
            try:
                self.transport.pause_reading()
            except RuntimeError:
                pass

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None:
            try:
                self.transport.resume_reading()
            except RuntimeError:
                pass
        self.last_rx = time.monotonic()  # our pause, not the instance's silence

    def timed_out(self) -> None:
        """The instance sent nothing, or read nothing of the request, for ``limits.upstream_timeout``:
        fail the exchange (504 or a truncated response) and drop the socket."""
        if self.stalled_since:
            self._fail("timeout", "the instance stopped reading the request for the read timeout")
        else:
            self._fail("timeout", "no response bytes within the read timeout")

    def close(self) -> None:
        self.relay = None
        if self.transport is not None:
            self.transport.abort()
            self.transport = None

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_read_buffer[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        relay = self.relay
        if relay is None:  # bytes from an idle instance: not HTTP we asked for
            self._pool.discard(self)
            self.close()
            return
        if not self._reads:
            hit = self._pool.responses.match(data, self._cut_head)
            if hit is not None:  # the bytes of a head llhttp parsed before, and its whole body
                head, body = hit
                self.head = head
                self.relay = None
                if head.keep_alive and self.sent_all and self.transport is not None:
                    self._pool.release(self)
                else:
                    self.close()
                    self._pool.discard(self)
                relay.upstream_whole(head, body)
                return
            self._first_read = data
        self.last_rx = time.monotonic()
        self._reads += 1
        self._meta += len(data)
        try:
            self._parser.feed_data(data)
            relay.flush()
            if self._meta > MAX_HEAD_BYTES and self.relay is not None:  # an endless head, 1xx or trailers
                self._fail("protocol", f"response head or trailers over {MAX_HEAD_BYTES} bytes")
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadDone):
                self.head.keep_alive = self._reusable_after_head(data)
                self._parser = httptools.HttpResponseParser(self)
                self._complete()
                return
            cause = exc.__context__
            if not isinstance(cause, ConnectionError):  # not the instance's fault: a bug of ours
                log.error("fast engine: error relaying a response", exc_info=cause)
            self._fail("protocol", f"callback error: {cause!r}")
        except httptools.HttpParserUpgrade:
            self._fail("protocol", "unexpected protocol switch")
        except httptools.HttpParserError as exc:
            self._fail("protocol", f"malformed response: {exc}")

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._pool.discard(self)
        relay = self.relay
        if relay is None:
            return
        if self.started and self.head.until_close():
            self._finish(reusable=False)
            return
        # A reused socket the instance closed before answering anything: the request never
        # reached it (a keep-alive race), so the exchange may resend it on a fresh connection.
        stale = self.reused and not self._got_bytes
        self.relay = None
        relay.upstream_failed("protocol", "instance closed the connection" + (f": {exc}" if exc else ""),
                              sent=not stale)

    def pause_writing(self) -> None:
        self.stalled_since = time.monotonic()  # the pool's sweep fails an instance that never reads again
        if self.relay is not None:
            self.relay.upstream_writable(False)

    def resume_writing(self) -> None:
        self.stalled_since = 0.0
        if self.relay is not None:
            self.relay.upstream_writable(True)

    # ------------------------------------------------------------------ llhttp callbacks

    def on_message_begin(self) -> None:
        if self.relay is None:  # a second response in the read that ended ours: nobody asked for it
            self._pool.discard(self)  # (already back in the pool: never hand this socket out again)
            raise ConnectionError("a response nobody asked for")
        self.head = ResponseHead()

    def on_status(self, reason: bytes) -> None:
        self.head.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.started:  # a trailer: never relayed, so not kept either
            return
        if len(self.head.headers) >= MAX_FIELDS:
            raise ConnectionError(f"more than {MAX_FIELDS} response header fields")
        self.head.add(name, value)

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # informational: not relayed (aiohttp's client drops them too)
            if status == 101:
                raise ConnectionError("101 without an upgrade request")
            self._reads = 2  # the final head does not start this read: never cache it
            return
        self.head.status = status
        self.started = True
        relay = self.relay
        if relay is not None:
            relay.upstream_head(self.head)
        if self._cut_head:
            raise _HeadDone

    def on_body(self, data: bytes) -> None:
        self._meta = 0
        relay = self.relay
        if relay is not None:
            relay.upstream_body(data)

    def on_message_complete(self) -> None:
        if not self.started:
            return  # the end of a 1xx
        self.head.keep_alive = self._parser.should_keep_alive()
        self._complete()

    # ------------------------------------------------------------------ helpers

    def _complete(self) -> None:
        if self._reads == 1:
            self._pool.responses.remember(self._first_read, self.head, self._cut_head)
        self._first_read = b""
        self._finish(reusable=self.head.keep_alive)

    def _reusable_after_head(self, data: bytes) -> bool:
        """Whether the socket may serve another request after the head of a HEAD answer (llhttp's
        parser, not yet replaced, knows the version). Only if that head came in this one read and
        nothing followed it: bytes after it (a body a broken app sent anyway) would otherwise be
        taken for the next request's response."""
        for name, value in self.head.headers:
            if name.lower() == b"connection" and b"close" in value.lower():
                return False
        if self._reads != 1 or data.find(b"\r\n\r\n") + 4 != len(data):
            return False
        return self._parser.get_http_version() == "1.1"

    def _finish(self, reusable: bool) -> None:
        relay, self.relay = self.relay, None
        self.started = False
        if not (reusable and self.sent_all) or self.transport is None:
            self.close()
            reusable = False
        if reusable:
            self._pool.release(self)  # before telling the relay: its next request may reuse it
        else:
            self._pool.discard(self)
        if relay is not None:
            relay.upstream_end(reusable)

    def _fail(self, kind: str, message: str) -> None:
        relay, self.relay = self.relay, None
        self.close()
        if relay is not None:
            relay.upstream_failed(kind, message, sent=True)
