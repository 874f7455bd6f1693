"""aiohttp plumbing for the main listener: the connection-level defences a public edge needs.

``ProxyAppRunner`` is an ``AppRunner`` whose connections use ``GuardedRequestHandler``:

- **Connection caps** (``web.limits``): a connection over ``limits.max_connections`` or
  ``limits.max_connections_per_ip`` gets a canned 503 JSON answer and is closed before any of its
  bytes is parsed.
- **Client deadlines**, all ``limits.client_timeout`` (nginx's ``client_header_timeout``,
  ``client_body_timeout``, ``send_timeout`` and ``keepalive_timeout`` rolled into one):
  an idle keep-alive connection, and a request whose headers are not complete, is closed that long
  after the connection opened or the previous response ended (aiohttp's keep-alive timer, which
  fires while the protocol still waits for a complete request head); a request body that stops
  arriving for that long while the proxy is ready to read it is aborted; a client that stops
  reading (the socket stays unwritable) for that long is aborted, so a slow reader never pins
  a large response, a WebSocket relay or an upstream connection for ever; and a connection
  aiohttp has closed is aborted if it is still flushing to a non-reader that long after.
- **Preflight** (``web.middlewares.preflight``), before routing and before any
  ``100 Continue``: unsupported HTTP version (400), ``CONNECT`` and ``TRACE`` (405), header block
  over ``limits.max_header_bytes`` (431), a ``Transfer-Encoding`` other than ``chunked`` (501, also
  when aiohttp's parser refuses the value), an ``Expect`` other than ``100-continue`` (417), a
  declared body over ``limits.max_body_bytes`` (413). An HTTP/1.0 request whose body is framed by
  ``Transfer-Encoding`` is answered with ``Connection: close`` (RFC 9112 6.1).
- **JSON errors**: parse errors (400, 431 for header overflow), the router's 404/405, any
  ``HTTPException`` a handler raises and unexpected handler errors (500) get the proxy's JSON
  error body. Parse errors are logged at DEBUG without a traceback: hostile traffic must not be
  able to flood the logs.

aiohttp's protocol has no public hooks for these, so ``GuardedRequestHandler`` overrides the
asyncio protocol callbacks (``connection_made``, ``data_received``, ``pause_writing``...) and
reads the flow-control flags of aiohttp's ``BaseProtocol``; the robustness tests
(``tests/robustness``) pin the behaviour against the installed aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import HttpVersion10, web
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from affinity_proxy.config import LimitsConfig
from affinity_proxy.engines.aiohttp.middlewares import preflight
from affinity_proxy.proxy.errors import json_error
from affinity_proxy.proxy.headers import UNSUPPORTED_CODING, is_coding_error
from affinity_proxy.proxy.limits import ConnectionLimiter, refusal_bytes

log = logging.getLogger("affinity_proxy.http")

#: How long a refused connection may stay open after its 503 so the client can read it (closing
#: a socket with unread request bytes would send a RST that can destroy the answer in flight).
REFUSAL_LINGER = 2.0
#: Shortest interval between two read-stall checks of one connection.
_MIN_CHECK = 0.05

RawHandler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]
ResponseCounter = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class ServerGuards:
    """Settings shared by every connection of one listener. ``on_response`` counts the answers
    produced here rather than by a handler (refusals, parse errors); it must not raise."""

    client_timeout: float
    max_header_bytes: int
    max_body_bytes: int
    limiter: ConnectionLimiter | None
    on_response: ResponseCounter | None = None

    @classmethod
    def from_limits(cls, limits: LimitsConfig, on_response: ResponseCounter | None = None) -> ServerGuards:
        return cls(
            client_timeout=limits.client_timeout,
            max_header_bytes=limits.max_header_bytes,
            max_body_bytes=limits.max_body_bytes,
            limiter=ConnectionLimiter(limits.max_connections, limits.max_connections_per_ip),
            on_response=on_response,
        )

    def count(self, status: int) -> None:
        if self.on_response is not None:
            self.on_response(status)


def _is_header_overflow(exc: BaseException | None) -> bool:
    if isinstance(exc, LineTooLong):
        return True
    return exc is not None and "Too many headers" in str(exc)


def _peer_ip(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple | list) and peer:
        return str(peer[0])
    return "unknown"  # a Unix socket, or a transport that does not say


class GuardedRequestHandler(RequestHandler):  # type: ignore[misc]
    """aiohttp's HTTP/1.1 protocol plus connection caps, client deadlines and JSON errors.

    Cost per connection: three small attributes, one timer while a request body is being received,
    one while the socket is unwritable. Never raises out of the asyncio callbacks.
    """

    __slots__ = ("_body", "_close_watch", "_ev_loop", "_guards", "_last_rx", "_linger", "_lost", "_peer",
                 "_read_watch", "_refused", "_tr", "_write_watch", "handling")

    def __init__(self, manager: Server, *, loop: asyncio.AbstractEventLoop, guards: ServerGuards,
                 **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._ev_loop = loop  # ours: aiohttp's own ``_loop`` is private
        self._guards = guards
        self._peer: str | None = None  # set once admitted; released exactly once
        self._refused = False
        self._last_rx = loop.time()
        self._body: StreamReader | None = None
        self._read_watch: asyncio.TimerHandle | None = None
        self._write_watch: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._close_watch: asyncio.TimerHandle | None = None
        self._tr: asyncio.Transport | None = None  # kept after aiohttp drops ``transport`` on close
        self._lost = False
        #: True while the application handler of the current request runs (it may read the body).
        self.handling = False

    # ------------------------------------------------------------------ connection caps

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limiter = self._guards.limiter
        ip = _peer_ip(transport)
        if limiter is not None:
            if not limiter.admit(ip):
                self._refuse(transport, per_ip=limiter.total < limiter.max_total)
                return
            self._peer = ip
        self._last_rx = self._ev_loop.time()
        self._tr = transport  # type: ignore[assignment]
        super().connection_made(transport)

    def _refuse(self, transport: asyncio.BaseTransport, *, per_ip: bool) -> None:
        self._refused = True
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport = tr
        log.debug("connection refused: %s", "per-address cap" if per_ip else "connection cap")
        self._guards.count(503)
        tr.write(refusal_bytes(per_ip))
        try:
            tr.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            pass
        self._linger = self._ev_loop.call_later(REFUSAL_LINGER, tr.abort)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._tr = None
        for handle in (self._read_watch, self._write_watch, self._linger, self._close_watch):
            if handle is not None:
                handle.cancel()
        self._read_watch = self._write_watch = self._linger = self._close_watch = None
        self._body = None
        if self._peer is not None and self._guards.limiter is not None:
            self._guards.limiter.release(self._peer)
        self._peer = None
        if self._refused:
            self.transport = None
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped until the client closes or the linger ends
        if data:
            self._last_rx = self._ev_loop.time()
        super().data_received(data)
        if self._messages and self._parse_failed():
            self._end_unparsable_bodies()

    def _parse_failed(self) -> bool:
        """aiohttp queues a parsed request as a ``RawRequestMessage`` (public, ``aiohttp.http``) and a
        parse error as anything else (its private ``_ErrInfo``): test the public class, not the private one.

        Why the private queue (``RequestHandler._messages``): aiohttp has no public way to tell a
        protocol that its parser gave up on the stream. Its C parser drops the body it was filling
        without ending it, and the queued error reaches ``handle_error`` (public) only after the
        handler in progress, which meanwhile waits for that body until the client timeout. The
        queue is the only place the failure shows at once. ``tests/engines/aiohttp/test_private_seams.py``
        pins the members read here (and ``BaseProtocol._reading_paused``/``_buffer_paused``) and
        the behaviour on a real socket, so an aiohttp upgrade that changes them fails by name."""
        return not isinstance(self._messages[-1][0], RawRequestMessage)

    def _end_unparsable_bodies(self) -> None:
        """aiohttp's parser drops the body it was filling when the rest of the stream is malformed
        (a bad chunk size after the headers went to the handler), leaving its reader waiting for
        ever. End every such body: with an error when a handler reads or will read it (so it
        answers 400 now and never forwards a truncated body as complete), quietly when aiohttp is
        only draining it after the response (the queued parse error is then answered with 400)."""
        for index, (_, payload) in enumerate(self._messages):
            if isinstance(payload, StreamReader) and not payload.is_eof() and index < len(self._messages) - 1:
                payload.set_exception(BadHttpMessage("malformed request body"))
                payload.feed_eof()
        body = self._body
        if body is not None and not body.is_eof():
            if self.handling:
                body.set_exception(BadHttpMessage("malformed request body"))
            body.feed_eof()  # also tells aiohttp not to linger reading a body that has ended
        self._body = None

    # ------------------------------------------------------------------ read stall (request bodies)

    def watch_body(self, payload: StreamReader) -> None:
        """Called when a request starts being handled: watch its body until it is complete."""
        if payload.is_eof():
            self._body = None
            return
        self._body = payload
        if self._read_watch is None:
            self._read_watch = self._ev_loop.call_later(self._guards.client_timeout, self._check_read_stall)

    def resume_reading(self, resume_parser: bool = True) -> None:
        # The client could not send while we held the socket: its silence so far does not count.
        self._last_rx = self._ev_loop.time()
        super().resume_reading(resume_parser)

    def _check_read_stall(self) -> None:
        self._read_watch = None
        body = self._body
        if body is None or body.is_eof() or self.transport is None:
            self._body = None
            return
        timeout = self._guards.client_timeout
        now = self._ev_loop.time()
        if self._reading_paused or self._buffer_paused:  # we are the slow side; not the client's fault
            self._last_rx = now
        idle = now - self._last_rx
        if idle >= timeout:
            log.info("closing connection: request body stalled for %.1fs", idle)
            self._abort()
            return
        self._read_watch = self._ev_loop.call_later(max(timeout - idle, _MIN_CHECK), self._check_read_stall)

    # ------------------------------------------------------------------ write stall (slow readers)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_watch is None:
            self._write_watch = self._ev_loop.call_later(self._guards.client_timeout, self._on_write_stall)

    def resume_writing(self) -> None:
        if self._write_watch is not None:
            self._write_watch.cancel()
            self._write_watch = None
        super().resume_writing()

    def _on_write_stall(self) -> None:
        self._write_watch = None
        if self.writing_paused and self.transport is not None:
            log.info("closing connection: client stopped reading for %.1fs", self._guards.client_timeout)
            self._abort()

    # ------------------------------------------------------------------ closing deadline

    async def start(self) -> None:
        try:
            await super().start()
        finally:
            self._close_soon()

    def force_close(self) -> None:
        super().force_close()
        self._close_soon()

    def _close_soon(self) -> None:
        """aiohttp closes with ``transport.close()``, which waits until every queued byte is sent:
        for a client that stopped reading with less than the pause threshold queued (so no write
        stall was ever seen) that is for ever, and the connection would keep its slot. Abort it if
        it is still there after client_timeout."""
        if self._lost or self._close_watch is not None or self._tr is None:
            return
        self._close_watch = self._ev_loop.call_later(self._guards.client_timeout, self._tr.abort)

    def _abort(self) -> None:
        """Drop the connection now, unsent data included (``close()`` would wait to flush it)."""
        transport = self.transport
        if transport is not None:
            transport.abort()
        self.force_close()

    # ------------------------------------------------------------------ protocol-level errors

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """JSON for every error the protocol answers itself; 431 for header overflow."""
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if status == 400 and _is_header_overflow(exc):
            status = 431
        if status == 400 and exc is not None and is_coding_error(str(exc)):  # llhttp refused the coding
            log.debug("rejected a request: Transfer-Encoding other than chunked")
            status, title, code = UNSUPPORTED_CODING
        elif status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            title = "internal error" if status == 500 else "gateway timeout" if status == 504 else "server error"
            code = title.replace(" ", "_")
        else:
            log.debug("rejected a malformed request: %s", type(exc).__name__ if exc else status)
            title = "request header fields too large" if status == 431 else "malformed request"
            code = title.replace(" ", "_")
        body = {"error": code, "message": title, "status": status}
        resp = web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")
        resp.force_close()
        self._guards.count(status)
        return resp


class _GuardedServer(Server):
    __slots__ = ()

    guards: ServerGuards

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, guards=self.guards, **self._kwargs)


def _json_http_exception(exc: web.HTTPException) -> web.Response:
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
    reason = exc.reason.lower() if exc.reason else "error"
    return json_error(exc.status, reason, code=reason.replace(" ", "_").replace("-", "_"), headers=headers or None)


def guarded_request_handler(inner: RawHandler, guards: ServerGuards) -> RawHandler:
    """Wrap the application's entry point: preflight first, then JSON for raised HTTP errors."""

    async def handle(request: BaseRequest) -> web.StreamResponse:
        refusal = preflight(request, max_header_bytes=guards.max_header_bytes, max_body_bytes=guards.max_body_bytes)
        if refusal is not None:
            guards.count(refusal.status)
            return refusal
        protocol = request.protocol
        guarded = isinstance(protocol, GuardedRequestHandler)
        if guarded:
            protocol.handling = True
        try:
            return await inner(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _json_http_exception(exc)
            guards.count(response.status)
            return response
        finally:
            if guarded:
                protocol.handling = False

    return handle


def _watching_factory(inner: Callable[..., BaseRequest]) -> Callable[..., BaseRequest]:
    def factory(message: Any, payload: StreamReader, protocol: RequestHandler, writer: Any, task: Any) -> BaseRequest:
        if message.version == HttpVersion10 and message.chunked and not message.should_close:
            message = message._replace(should_close=True)  # RFC 9112 6.1: close after the response
        request = inner(message, payload, protocol, writer, task)
        if isinstance(protocol, GuardedRequestHandler):
            protocol.watch_body(payload)
        return request

    return factory


class ProxyAppRunner(web.AppRunner):
    """AppRunner for the main listener: ``GuardedRequestHandler`` connections, ``limits`` applied.

    ``limits`` defaults to ``LimitsConfig()``; ``keepalive_timeout`` defaults to
    ``limits.client_timeout``. ``on_response(status)`` counts answers produced by the guards.
    """

    __slots__ = ("_guards",)

    def __init__(self, app: web.Application, *, limits: LimitsConfig | None = None,
                 on_response: ResponseCounter | None = None, **kwargs: Any) -> None:
        limits = limits if limits is not None else LimitsConfig()
        kwargs.setdefault("keepalive_timeout", limits.client_timeout)
        super().__init__(app, **kwargs)
        self._guards = ServerGuards.from_limits(limits, on_response)

    @property
    def limiter(self) -> ConnectionLimiter | None:
        """The connection counter of this listener (read it, never mutate it)."""
        return self._guards.limiter

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer
        assert isinstance(server, _GuardedServer)
        server.guards = self._guards
        server.request_handler = guarded_request_handler(server.request_handler, self._guards)
        server.request_factory = _watching_factory(server.request_factory)
        return server


def handler_args(max_header_bytes: int) -> dict[str, Any]:
    """Parser limits: one header line may use the whole header budget; the total is checked by the
    preflight (aiohttp only limits single lines)."""
    return {
        "max_line_size": max(max_header_bytes, 1024),
        "max_field_size": max(max_header_bytes, 1024),
        "max_headers": 128,
    }
