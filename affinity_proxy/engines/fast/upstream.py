"""One keep-alive connection to an instance: an asyncio Protocol carrying one exchange at a time.

``UpstreamConnection`` writes a request and parses the response with httptools (llhttp), handing
every event to the exchange that owns it (the ``Relay`` protocol below), which streams it to the
client; a response whose exact head bytes were parsed before (``rewrite.ResponseCache``) and
that arrives whole in one read skips llhttp. Nothing here knows about routing or HTTP semantics
beyond framing. HEAD responses are cut after the head (llhttp cannot know they have no body),
and a response without framing ends when the instance closes.

The pool of these connections (``UpstreamPool``, below) keeps idle ones per instance URL (LIFO,
so the warmest socket is reused and the others can expire after ``KEEPALIVE_SECONDS``, aiohttp's
connector default) and opens new ones with ``loop.create_connection`` under
``limits.upstream_connect_timeout`` (TLS included, for ``https://`` instances: ``tls_context``)
in a background task of its ``TaskSet``; fly mode's ``*.internal`` names go through
``membership.private_net.PrivateNet.open`` (AAAA only, a stopped Machine woken first, within
``fly.wake_timeout``). It also holds the response-head cache shared by every connection. Read
timeouts are found by ``sweep`` (called by the server's periodic sweep), not by a timer per
request. One pool per process (event loop).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from typing import Protocol
from urllib.parse import urlsplit

import httptools

from affinity_proxy._tasks import TaskSet
from affinity_proxy.membership.private_net import PrivateNet, is_private_name

from .rewrite import ResponseCache, ResponseHead

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

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
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
        data = _read_buffer[:nbytes].tobytes()  # copied out before the shared buffer's next read
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


# --------------------------------------------------------------------------- the pool

KEEPALIVE_SECONDS = 15.0
MAX_IDLE_PER_ORIGIN = 256


class UpstreamPool:
    """Idle keep-alive connections per instance URL, and connection set-up."""

    def __init__(self, tasks: TaskSet, private: PrivateNet | None = None) -> None:
        self._tasks = tasks
        self._private = private
        self._origins: dict[str, Origin] = {}
        self._idle: dict[str, deque[UpstreamConnection]] = {}
        self.active: set[UpstreamConnection] = set()
        self.responses = ResponseCache()
        self.closed = False
        self._tls: ssl.SSLContext | None = None

    def origin(self, url: str) -> Origin:
        found = self._origins.get(url)
        if found is None:
            if len(self._origins) > 1024:
                self._origins.clear()
            if url.startswith("https:") and self._tls is None:
                self._tls = tls_context()  # loads the trust store: once per pool, on first use
            found = self._origins[url] = Origin(url, self._tls)
        return found

    def acquire(self, origin: Origin) -> UpstreamConnection | None:
        """An idle connection to ``origin`` (marked active), or None. O(1)."""
        idle = self._idle.get(origin.key)
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                self.active.add(conn)
                return conn
        return None

    def connect(self, origin: Origin, relay: Relay, connect_timeout: float, on_ready: object) -> None:
        """Open a new connection in the background; ``on_ready(conn)`` or ``relay.upstream_failed``."""
        self._tasks.spawn(self._connect(origin, relay, connect_timeout, on_ready), name="fastpath-connect")

    async def _connect(self, origin: Origin, relay: Relay, connect_timeout: float, on_ready: object) -> None:
        loop = asyncio.get_running_loop()

        async def open_to(host: str) -> UpstreamConnection:
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(self, origin), host, origin.port, ssl=origin.ssl,
                server_hostname=origin.server_hostname,
            )
            return conn

        try:
            if origin.private and self._private is not None:  # 6PN: AAAA only, a stopped Machine woken
                conn = await self._private.open(origin.host, origin.port, open_to, connect_timeout)
            else:
                async with asyncio.timeout(connect_timeout):
                    conn = await open_to(origin.host)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            relay.upstream_failed("connect", f"{type(exc).__name__}: {exc}", sent=False)
            return
        if self.closed:
            conn.close()
            relay.upstream_failed("connect", "shutting down", sent=False)
            return
        self.active.add(conn)
        on_ready(conn)  # type: ignore[operator]

    def release(self, conn: UpstreamConnection) -> None:
        self.active.discard(conn)
        idle = self._idle.get(conn.origin.key)
        if idle is None:
            idle = self._idle[conn.origin.key] = deque()
        if self.closed or len(idle) >= MAX_IDLE_PER_ORIGIN:
            conn.close()
            return
        if conn.paused:
            conn.resume()
        conn.idle_since = conn.last_rx  # when its request was sent or its last bytes came: close enough
        idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        self.active.discard(conn)
        idle = self._idle.get(conn.origin.key)
        if idle:
            try:
                idle.remove(conn)
            except ValueError:
                pass

    def sweep(self, now: float, read_timeout: float) -> list[UpstreamConnection]:
        """Close idle connections past the keep-alive time; return active ones silent for longer
        than ``read_timeout`` since their request was fully sent, or that have not read any of the
        request for that long (the caller fails them)."""
        for idle in self._idle.values():
            while idle and now - idle[0].idle_since > KEEPALIVE_SECONDS:
                idle.popleft().close()
        return [c for c in self.active if c.relay is not None and (
            (c.sent_all and not c.paused and now - c.last_rx > read_timeout)
            # an instance that stops reading the request body would hold both connections for ever
            or (c.stalled_since and now - c.stalled_since > read_timeout))]

    def close(self) -> None:
        self.closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        for conn in list(self.active):
            conn.close()
        self.active.clear()
