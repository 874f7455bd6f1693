"""forward_http: proxy one HTTP/1.1 request to an instance, streaming both bodies.

Neither body is ever held whole beyond ``limits.request_buffer`` (a request body up to that size
is read before the instance is contacted, so slow senders hold no instance connection): the
request body is read from the client in the chunks the socket delivers and written to the
instance as it arrives, and the response is relayed 32 KiB at a time, so memory per request is
bounded by aiohttp's flow-control buffers (a few hundred KiB) whatever the body size.
Back-pressure crosses the proxy: a slow reader on one side pauses reading on the other, and an
instance that stops reading the request body before it answers is given up on after the read
timeout (aiohttp's ``sock_read`` only covers reads). Imports only
aiohttp/yarl/multidict and ``forwarding.*``.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import AsyncIterablePayload
from multidict import CIMultiDict
from yarl import URL

from affinity_proxy.engines.aiohttp.client import UpstreamClient
from affinity_proxy.proxy.headers import (
    ExtraHeaders,
    downstream_response_headers,
    merge_extra_headers,
)
from affinity_proxy.proxy.upstream_errors import BodyTooLarge, UpstreamError, upstream_error_from

__all__ = ["BodyTooLarge", "UpstreamError", "forward_http", "upstream_url"]

log = logging.getLogger("affinity_proxy.forwarding.http")

#: Response bytes relayed per write. Each may sit in the client's write buffer on top of its
#: high-water mark when the client stops reading (64 KiB: ~830 KiB RSS per such client with
#: aiohttp's default read buffer; 32 KiB and ``client._READ_BUFSIZE``: ~305 KiB).
CHUNK_SIZE = 32 * 1024


def upstream_url(base_url: str, request: web.BaseRequest) -> URL:
    """``base_url`` (scheme, host, port, optional path prefix) + the request target as received.

    The path and query are the raw bytes the client sent (no decoding, re-quoting or dot-segment
    normalisation), so ``/a%2Fb?x=%20+y`` reaches the instance unchanged. Pure.
    """
    target = request.raw_path
    if not target.startswith("/"):  # absolute-form or "*": fall back to the parsed origin-form
        target = request.rel_url.raw_path_qs
    return URL(base_url.rstrip("/") + target, encoded=True)


class _RequestBody:
    """The client's request body as an async iterator for aiohttp, counted as it streams.

    aiohttp pulls one chunk at a time while writing to the instance, so at most one socket read
    is in memory. The object records why it stopped (too large, or the client's side failed) so
    ``forward_http`` can tell those apart from instance failures, which aiohttp reports with the
    same exception type. Not started until aiohttp writes the body, so a request that fails to
    connect has consumed nothing and can be retried elsewhere.

    Stall watch: from handing aiohttp a chunk (or the end of the body) until it asks for the next
    one, aiohttp is writing it, waiting for the instance to take bytes. If that lasts
    ``stall_timeout`` (the instance stopped reading) the upstream socket is aborted and
    ``stalled`` set. A slow client never counts (no watch while waiting for it), nor a slow but
    reading instance. ``stop_watching`` ends it for good once the response head came.
    """

    def __init__(self, content: aiohttp.StreamReader, limit: int, stall_timeout: float) -> None:
        self._content = content
        self._limit = limit
        self._ahead = b""  # read by ``buffer`` before the instance was contacted
        self._whole = False  # ``_ahead`` is the whole body
        self.sent = 0
        self.too_large = False
        self.client_error: BaseException | None = None
        self.writer: AbstractStreamWriter | None = None  # set by ``_Upload`` when writing starts
        self.stalled = False
        self._stall_timeout: float | None = stall_timeout
        self._watch: asyncio.TimerHandle | None = None

    async def buffer(self, size: int) -> None:
        """Read the body ahead until it ends or passes ``size`` bytes (``limits.request_buffer``),
        before any instance connection is taken: a slow sender then holds none. What was read is
        sent first. A client that fails meanwhile is recorded in ``client_error`` (and raises)."""
        parts: list[bytes] = []
        total = 0
        try:
            while total <= size:
                try:
                    chunk = await self._content.readany()
                except Exception as exc:
                    self.client_error = exc
                    raise
                if not chunk:
                    self._whole = True
                    return
                parts.append(chunk)
                total += len(chunk)
        finally:
            self._ahead = b"".join(parts)

    def __aiter__(self) -> _RequestBody:
        return self

    async def __anext__(self) -> bytes:
        if self._watch is not None:  # aiohttp is back for more: the last write went through
            self._watch.cancel()
            self._watch = None
        if self._ahead:
            chunk, self._ahead = self._ahead, b""
        elif self._whole:
            chunk = b""
        else:
            try:
                chunk = await self._content.readany()
            except Exception as exc:  # recorded, then re-raised into aiohttp's writer
                self.client_error = exc
                raise
        if self._stall_timeout is not None:
            self._watch = asyncio.get_running_loop().call_later(self._stall_timeout, self._stall)
        if not chunk:
            raise StopAsyncIteration
        self.sent += len(chunk)
        if self.sent > self._limit:
            self.too_large = True
            raise BodyTooLarge(self._limit)
        return chunk

    def _stall(self) -> None:
        self.stalled = True
        transport = self.writer.transport if self.writer is not None else None
        if transport is not None:
            transport.abort()  # not close(): that would wait for the instance to read the buffer

    def stop_watching(self) -> None:
        self._stall_timeout = None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None


class _Upload(AsyncIterablePayload):
    """``_RequestBody`` as aiohttp's payload, telling it which connection it is written to."""

    def __init__(self, body: _RequestBody) -> None:
        super().__init__(body)
        self._body = body

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        self._body.writer = writer  # aiohttp >= 3.12 writes a body through this
        await super().write_with_length(writer, content_length)

    async def write(self, writer: AbstractStreamWriter) -> None:
        self._body.writer = writer  # aiohttp < 3.12 through this
        await super().write(writer)


def _outgoing_headers(upstream_headers: CIMultiDict[str], declared: int | None) -> CIMultiDict[str]:
    headers = CIMultiDict(upstream_headers)
    # aiohttp's server already answered "100 Continue" on the client leg before our handler ran;
    # forwarding Expect would make aiohttp's client wait for a second one from the instance.
    headers.popall("Expect", None)
    headers.popall("Content-Length", None)
    if declared is not None:
        headers["Content-Length"] = str(declared)
    return headers


async def forward_http(
    request: web.Request,
    base_url: str,
    client: UpstreamClient,
    *,
    extra_response_headers: ExtraHeaders = (),
    upstream_headers: CIMultiDict[str],
    max_body_bytes: int,
    request_buffer: int = 0,
) -> web.StreamResponse:
    """Send ``request`` to the instance at ``base_url`` and stream its answer back to the client.

    ``upstream_headers`` is what to send (normally ``upstream_request_headers(...)``); framing
    headers are recomputed here: a declared Content-Length is passed through, a body of unknown
    length is sent chunked, and a request without a body sends none. A body of at most
    ``request_buffer`` bytes (declared, or chunked and ending within it) is read whole before the
    instance is contacted, so a slow sender holds no instance connection; a larger one is read
    that far, then streamed. ``extra_response_headers``
    (``X-Fly-Instance``, the affinity cookie) are merged into the response as described in
    ``headers.merge_extra_headers``. Status, reason and end-to-end headers, including every
    ``Set-Cookie`` and the instance's ``Content-Length``, are relayed; HEAD/204/304 carry no body.

    Raises, always before anything was written to the client unless noted:

    - ``BodyTooLarge``: declared Content-Length over ``max_body_bytes`` (the instance is not
      contacted), or an unknown-length body grew past it before the instance answered.
    - ``UpstreamError(kind="connect", retryable=True)``: no connection (refused, DNS, timeout);
      the body was not touched, so the caller may retry with the same request.
    - ``UpstreamError(kind="timeout", status=504)`` / ``(kind="protocol", status=502)``: the
      instance went silent for ``read_timeout``, stopped reading the request body for as long
      (its connection is aborted), or broke the exchange before its headers came.
    - ``UpstreamError(response_started=True)``: the instance failed mid-body after the response
      had started. The client connection is already closed (the client sees a truncated body) and
      a warning is logged; the caller only counts it.

    If the client goes away mid-response, the instance's response is closed (its connection is
    not reused) and the partly sent response is returned without logging above debug; if the
    client's request body breaks, a 400 with ``Connection: close`` is returned.
    Cost: one pooled upstream connection for the duration; memory bounded as described above.
    """
    declared = request.content_length
    if declared is not None and declared > max_body_bytes:
        raise BodyTooLarge(max_body_bytes, declared)
    body: _RequestBody | None = None
    if (declared is not None and declared > 0) or (declared is None and request.body_exists):
        body = _RequestBody(request.content, max_body_bytes, client.read_timeout)
        if request_buffer > 0 and (declared is None or declared <= request_buffer):
            try:
                await body.buffer(request_buffer)
            except Exception:
                if body.client_error is None:
                    raise
                return _client_body_failed(request, body.client_error)
    try:
        upstream = await client.session.request(
            request.method,
            upstream_url(base_url, request),
            headers=_outgoing_headers(upstream_headers, declared),
            data=None if body is None else _Upload(body),
            allow_redirects=False,
        )
    except (TimeoutError, aiohttp.ClientError) as exc:
        if body is not None and body.too_large:
            raise BodyTooLarge(max_body_bytes) from exc
        if body is not None and body.client_error is not None:
            return _client_body_failed(request, body.client_error)
        if body is not None and body.stalled:
            raise UpstreamError("timeout", "the instance stopped reading the request body") from exc
        raise upstream_error_from(exc) from exc
    finally:
        if body is not None:  # the response's read timeout takes over (or it failed)
            body.stop_watching()
    return await _relay_response(request, upstream, extra_response_headers, body)


def _client_body_failed(request: web.Request, exc: BaseException) -> web.Response:
    log.debug("client request body broke for %s %s: %r", request.method, request.path, exc)
    response = web.json_response(
        {"error": "bad_request_body", "message": "request body incomplete or malformed", "status": 400}, status=400,
    )
    response.force_close()
    return response


async def _relay_response(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    extra: ExtraHeaders,
    body: _RequestBody | None,
) -> web.StreamResponse:
    """Copy status, headers and body of ``upstream`` to the client; always frees ``upstream``."""
    reusable = False
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason or None)
        response.headers.extend(downstream_response_headers(upstream.headers))
        rejected = merge_extra_headers(response.headers, extra)
        if rejected:
            log.warning("dropped unsafe extra response headers: %s", ", ".join(rejected))
        try:
            await response.prepare(request)
        except ConnectionError:
            log.debug("client left before the response of %s started", request.path)
            return response
        while True:
            try:
                chunk = await upstream.content.read(CHUNK_SIZE)
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise _broken_mid_body(request, exc, body) from exc
            if not chunk:
                break
            try:
                await response.write(chunk)
            except ConnectionError:
                log.debug("client left during the response of %s", request.path)
                return response
        # The instance's answer is complete: give its connection back before waiting for a slow
        # client to take the rest (write_eof drains), as nginx frees the upstream once buffered.
        reusable = True
        upstream.release()
        try:
            await response.write_eof()
        except ConnectionError:
            log.debug("client left before the end of the response of %s", request.path)
        return response
    finally:
        if reusable:
            upstream.release()
        else:
            upstream.close()


def _broken_mid_body(request: web.Request, exc: BaseException, body: _RequestBody | None) -> UpstreamError:
    """Close the client connection so it sees a truncated response; build the error to raise.

    Closing (rather than finishing the chunked stream or padding to Content-Length) is the only
    way to tell an HTTP/1.1 client the body is incomplete. aiohttp then finds the transport
    closing when it finishes the response and drops the connection without logging an error.
    """
    if request.transport is not None:
        request.transport.close()
    error = upstream_error_from(exc, response_started=True)
    if body is not None and body.client_error is not None:
        log.debug("client request body broke mid-response for %s: %r", request.path, body.client_error)
    elif body is not None and body.too_large:
        log.info("request body of %s %s passed the limit mid-response; closed", request.method, request.path)
    else:
        log.warning(
            "instance failed mid-response for %s %s (%s); client connection closed",
            request.method,
            request.path,
            error,
        )
    return error
