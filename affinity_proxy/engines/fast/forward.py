"""The forwarding half of an exchange: instance connection, request body out, response back.

``Forwarding`` forwards one request, driven by callbacks: it builds the upstream
head (``rewrite``), reads a body of up to ``limits.request_buffer`` whole first (a slow sender
must not hold an instance connection), takes a pooled connection or opens one, streams the
request body as the client sends it (Content-Length as is, chunked re-framed, at most
``PENDING_LIMIT`` buffered while connecting, the client's socket paused beyond that or while the
instance's is full), relays the
response in one write per upstream read (the client's socket pausing the instance's) with
``act.response_headers``, and maps failures: a failure before the response is the exchange's to
answer (``_failed``: ``act.after_failure``), one after it cuts the client's response short. The routing half is
``exchange.Exchange``, which subclasses this.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from affinity_proxy.proxy import act
from affinity_proxy.routing.decide import Route, RouteInput
from affinity_proxy.routing.model import Instance

from . import rewrite, wire
from .head import RequestHead
from .hot import HotRoute
from .response import ResponseHead
from .upstream import UpstreamConnection

if TYPE_CHECKING:
    from .ports import ConnectionPort, ServerPort
    from .upstream import Origin

forward_log = logging.getLogger("affinity_proxy.forwarding.http")

#: Request body bytes buffered while the upstream connection is being set up, before the client
#: socket stops being read (or ``limits.request_buffer`` when larger).
PENDING_LIMIT = 256 * 1024


class Forwarding:
    """Per-request forwarding state. Subclasses supply routing, answers and the end of the
    exchange (``_answer``, ``_finish``, ``_failed``, ``rid_bytes``). Never raises out of
    a callback."""

    __slots__ = ("_resp_extra", "body_done", "body_out", "buffering", "chunked_out", "close_after", "conn", "finished",
                 "head", "hot", "inp", "instance", "out", "pending", "pending_size", "responded", "route", "server",
                 "status", "up_head", "up_started", "upstream")

    def __init__(self, conn: ConnectionPort, head: RequestHead, server: ServerPort, body_done: bool) -> None:
        self.conn = conn
        self.head = head
        self.server = server
        self.body_done = body_done
        self.hot: HotRoute | None = None
        self.route: Route | None = None
        self.inp: RouteInput | None = None
        self.instance: Instance | None = None
        self.upstream: UpstreamConnection | None = None
        self.buffering: Origin | None = None  # where to connect once the buffered body is whole
        self.up_head = b""
        self.up_started = 0.0
        self._resp_extra: tuple[bytes, ...] = ()
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.body_out: list[bytes] = []  # request body bytes of the current client read, for body_flush()
        self.out: list[bytes] = []  # response bytes of the current upstream read, written by flush()
        self.responded = False
        self.chunked_out = False
        self.close_after = False
        self.finished = False
        self.status = 0

    # ------------------------------------------------------------------ provided by the exchange

    def _answer(self, answer: act.Answer, *, close: bool = False) -> None:
        raise NotImplementedError

    def _finish(self, status: int, *, close: bool = False) -> None:
        raise NotImplementedError

    def _failed(self, kind: str, status: int) -> None:
        raise NotImplementedError

    def _keep_alive(self) -> bool:
        raise NotImplementedError

    def rid_bytes(self) -> bytes:
        raise NotImplementedError

    # ------------------------------------------------------------------ to the instance

    def _forward(self, route: Route, inp: RouteInput, upstream_headers: tuple[act.Header, ...] = ()) -> None:
        """Forward plain HTTP (upgrades never reach the fast engine) to ``route.instance`` with
        ``act``'s response headers and ``upstream_headers`` (at most one: fly-replay-src)."""
        server = self.server
        hot = self.hot
        if hot is not None and hot.forward is not None and hot.decision is route:
            instance, origin, self._resp_extra = hot.forward
        else:
            instance = server.ctx.membership.current().get(route.instance)
            if instance is None or not instance.url:
                self._answer(act.NO_UPSTREAM)
                return
            cookie = server.router.cookies_out.value(server.ctx.codec, server.ctx.config, instance.id, route, inp)
            resp = tuple(b"%s: %s\r\n" % (name.encode(), value.encode())
                         for name, value in act.response_headers(instance.id, cookie))
            self._resp_extra = resp
            origin = server.pool.origin(instance.url)
            if hot is not None and hot.decision is route and cookie is None:
                hot.forward = (instance, origin, resp)
        self.route, self.inp, self.instance = route, inp, instance
        extra = (upstream_headers[0][0].encode(), upstream_headers[0][1].encode()) if upstream_headers else None
        self.up_head = rewrite.upstream_head(self.head, origin, self.conn.peer, self.rid_bytes, server.fqdn, extra,
                                             self.conn.real_client(self.head))
        if not self.body_done and self._buffers(server.ctx.config.limits.request_buffer):
            self.buffering = origin  # ``body_data``/``body_end`` connect when the body is whole or too big
            return
        self._connect(origin)

    def _buffers(self, limit: int) -> bool:
        """Whether the body may be read whole before an instance connection is taken
        (``limits.request_buffer``): a Content-Length within it, or a chunked body not past it yet."""
        head = self.head
        if head.chunked:
            return self.pending_size <= limit
        return head.content_length is not None and head.content_length <= limit

    def _connect(self, origin: Origin) -> None:
        self.buffering = None
        self.up_started = time.perf_counter()  # the instance's time, not the client's upload
        server = self.server
        conn = server.pool.acquire(origin)
        if conn is not None:
            self._attach(conn)
        else:
            server.pool.connect(origin, self, server.ctx.config.limits.upstream_connect_timeout, self._attach)

    def _attach(self, conn: UpstreamConnection) -> None:
        if self.finished:
            self.server.pool.release(conn)
            return
        self.upstream = conn
        chunked = self.head.chunked
        data = [self.up_head]
        if self.pending:
            body = b"".join(self.pending)
            data.append(wire.chunk(body) if chunked else body)
        if self.body_done and chunked:
            data.append(wire.LAST_CHUNK)
        self.pending = []
        self.pending_size = 0
        conn.send(self, b"".join(data), head_only=self.head.method == "HEAD", complete=self.body_done)
        client = self.conn
        if client.read_pause:
            client.resume_reading(client.PENDING)
        if client.write_paused:
            conn.pause()

    # ------------------------------------------------------------------ request body (from the client)

    def body_data(self, data: bytes) -> None:
        if self.finished:
            return
        if self.upstream is not None:
            self.body_out.append(data)  # one write per client read, not per chunk (a write is a send())
            return
        self.pending.append(data)
        self.pending_size += len(data)
        limit = self.server.ctx.config.limits.request_buffer
        if self.buffering is not None and self.pending_size > limit:  # a chunked body past the buffer
            self._connect(self.buffering)
        elif self.pending_size > max(PENDING_LIMIT, limit):  # connecting (or routing): the client waits
            self.conn.pause_reading(self.conn.PENDING)

    def body_flush(self) -> None:
        """Write the body bytes of the client's last read to the instance, in one go."""
        out = self.body_out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            upstream = self.upstream
            if upstream is not None and not self.finished:
                upstream.write(wire.chunk(data) if self.head.chunked else data)

    def body_end(self) -> None:
        self.body_done = True
        self.body_flush()
        upstream = self.upstream
        if upstream is not None and not self.finished:
            upstream.write(wire.LAST_CHUNK if self.head.chunked else b"", complete=True)
        elif self.buffering is not None and not self.finished:
            self._connect(self.buffering)  # the whole body is here: now take an instance connection

    def body_too_large(self) -> None:
        """The body passed ``limits.max_body_bytes`` while streaming: 413 if nothing was answered
        yet, else the response is cut. The connection is closed either way."""
        self._drop_upstream()
        limit = self.server.ctx.config.limits.max_body_bytes
        self._answer(act.body_too_large(limit), close=True)

    def malformed_body(self) -> None:
        """llhttp rejected the request body (a bad chunk): 400 if nothing was answered yet, else
        the response is cut. The connection is closed either way."""
        self._drop_upstream()
        self._answer(act.error(*wire.MALFORMED), close=True)

    def client_lost(self) -> None:
        """The client connection went away: drop the instance's connection (not reusable). A
        response already under way is counted and logged as the aiohttp engine does."""
        self._drop_upstream()
        if self.responded:
            self._finish(self.status, close=True)
        self.finished = True

    def client_writable(self, writable: bool) -> None:
        upstream = self.upstream
        if upstream is not None:
            if writable:
                upstream.resume()
            else:
                upstream.pause()

    def _drop_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()
            self.server.pool.discard(upstream)

    # ------------------------------------------------------------------ response (from the instance)

    def upstream_head(self, rh: ResponseHead) -> None:
        """Queue the client's response head (``rewrite.client_head``) for the next flush."""
        if self.finished:
            return
        head = self.head
        status = rh.status
        if rewrite.needs_framing(head, rh):
            if head.version == b"1.1":
                self.chunked_out = True
            else:
                self.close_after = True  # an HTTP/1.0 client reads this body until we close
        self.status = status
        self.responded = True
        self.out.append(rewrite.client_head(head, rh, self._resp_extra, self.chunked_out, self._keep_alive()))

    def upstream_body(self, data: bytes) -> None:
        if not self.finished and data:
            self.out.append(wire.chunk(data) if self.chunked_out else data)

    def flush(self) -> None:
        """Write what the instance's last read produced in one go (one send per read)."""
        out = self.out
        if out:
            self.conn.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def upstream_end(self, reusable: bool) -> None:
        self.upstream = None
        if self.finished:
            return
        if self.chunked_out:
            self.out.append(wire.LAST_CHUNK)
        self.flush()
        assert self.instance is not None
        self.server.counts.observe_duration(self.instance.id, time.perf_counter() - self.up_started)
        self._finish(self.status)

    def upstream_whole(self, rh: ResponseHead, body: bytes) -> None:
        """A whole response in one read, its head known (``response.ResponseCache``): what
        ``upstream_head`` + ``upstream_body`` + ``upstream_end`` do, in one write. Such a head
        always carries its Content-Length, so the body needs no framing of ours."""
        self.upstream = None
        if self.finished:
            return
        self.status = rh.status
        self.responded = True
        data = rewrite.known_client_head(self.head, rh, self._resp_extra, self._keep_alive())
        self.conn.write(data + body if body else data)
        assert self.instance is not None
        self.server.counts.observe_duration(self.instance.id, time.perf_counter() - self.up_started)
        self._finish(rh.status)

    def upstream_writable(self, writable: bool) -> None:
        if writable:
            self.conn.resume_reading(self.conn.UPSTREAM)
        else:
            self.conn.pause_reading(self.conn.UPSTREAM)

    def upstream_failed(self, kind: str, message: str, *, sent: bool) -> None:
        """The instance failed: a stale pooled socket is resent on another; otherwise counted, and
        a failure before the response is the exchange's (``_failed``: ``act.after_failure``), one
        after it cuts the client's response short."""
        self.upstream = None
        if self.finished:
            return
        self.conn.resume_reading(self.conn.UPSTREAM)
        head = self.head
        if not sent and kind == "protocol" and self._retryable_request():
            # A pooled socket the instance had closed: resend on another, as if never tried.
            assert self.instance is not None
            pool = self.server.pool
            origin = pool.origin(self.instance.url)
            conn = pool.acquire(origin)
            if conn is not None:
                self._attach(conn)
            else:
                pool.connect(origin, self, self.server.ctx.config.limits.upstream_connect_timeout, self._attach)
            return
        server = self.server
        assert self.instance is not None and self.route is not None and self.inp is not None
        instance = self.instance
        server.counts.tally(act.failure_counts(instance.id, kind))
        status = act.UPSTREAM_STATUS[kind]
        self.flush()
        if self.responded:
            forward_log.warning("instance failed mid-response for %s %s (%s); client connection closed",
                                head.method, head.path, f"{kind}: {message}")
            self._finish(status, close=True)
            return
        self._failed(kind, status)

    def _retryable_request(self) -> bool:
        return act.may_retry(self.head.method, self.head.has_body)
