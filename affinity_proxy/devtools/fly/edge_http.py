"""The HTTP path of the local Fly edge: buffer the body, deliver, follow fly-replay, relay.

The request body is buffered up to ``max_replay_body`` bytes so it can be replayed; a larger body
is streamed through (buffered prefix, then the rest of the socket) and a fly-replay asked for it
is answered with PA01. A fly-replay answer is discarded unread (its connection released) and the
original request goes to the next hop. The final answer is streamed to the client 64 KiB at a time
with ``Fly-Request-Id`` added. Imports aiohttp, ``fly.edge_route`` and ``forwarding.headers``
(``edge_route.Edge``, the protocol ``FlyEdge`` meets, is a type hint).
"""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from affinity_proxy.devtools.fly.edge_cache import Lookup, wants_invalidate
from affinity_proxy.devtools.fly.edge_route import Edge, EdgeError, Hop
from affinity_proxy.proxy.headers import FLY_REQUEST_ID_HEADER, downstream_response_headers
from affinity_proxy.routing.replay import (
    FORCE_INSTANCE_HEADER,
    PREFER_INSTANCE_HEADER,
    REPLAY_CACHE_STATUS_HEADER,
    REPLAY_HEADER,
    parse_replay_instruction,
)

log = logging.getLogger("affinity_proxy.fly.edge")

CHUNK = 64 * 1024
_RAW_BYTES_MAX = 1024 * 1024  # aiohttp warns about raw bytes bodies above this
_SKIP_AUTO = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


@dataclass(slots=True)
class _Body:
    """The request body as far as it was buffered; ``complete`` False: more is still on the socket."""

    data: bytes
    complete: bool
    present: bool


async def serve_http(edge: Edge, request: web.Request, request_id: str) -> web.StreamResponse:
    """Serve one HTTP request: deliver it, follow fly-replay answers, relay the final answer."""
    body = await _read_body(request, edge.max_replay_body)
    base = edge.edge_headers(request, request_id)
    if body.complete:
        base.popall("Content-Length", None)
    lookup = cache_lookup(edge, request)
    hop = first = first_hop(edge, request, lookup)
    replays = deliveries = 0
    failed: set[str] = set()
    while True:
        if isinstance(hop, EdgeError):
            return edge.error_response(hop, request_id)
        woke = await edge.prepare_hop(hop) or await edge.wait_for_slot(hop)
        if woke is not None:
            hop = woke
            continue
        headers = CIMultiDict(base)
        headers.update(hop.headers)
        machine = hop.machine
        edge.enter(machine)
        try:
            try:
                upstream = await _send(edge, request, hop, headers, body)
            except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
                hop = edge.after_connect_failure(hop, exc, failed)
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.info("machine %s failed mid-request: %r", hop.machine.id, exc)
                return edge.error_response(EdgeError(502, "PR03", "Machine connection failed"), request_id)
            edge.hits[hop.machine.id] += 1
            deliveries += 1
            value = upstream.headers.get(REPLAY_HEADER)
            if wants_invalidate(upstream.headers):  # drop the entry that led here (docs/fly-protocol.md §1)
                edge.cache.invalidate(lookup.key)
            if value is None:
                edge.hop_counts[deliveries] += 1
                outcome(edge, first, replays)
                return await _relay(edge, request, upstream, hop, request_id, replays)
            if replays == 0 and not hop.cached and not hop.is_fallback and not wants_invalidate(upstream.headers):
                cache_store(edge, request, lookup, value, upstream.headers)
            upstream.release()
        finally:
            edge.leave(machine)
        replays += 1
        edge.replays += 1
        hop = missed(edge, edge.next_after_replay(hop, value, replays, body.complete))


def first_hop(edge: Edge, request: web.Request, lookup: Lookup) -> Hop | EdgeError:
    """The first hop: the cached target on a hit (``EdgeRouter.cached``), else as load balanced."""
    if lookup.value is not None:
        cached = edge.router.cached(lookup.value)
        if cached is not None:
            return cached
        assert lookup.key is not None
        edge.cache.evict(lookup.key)  # the ``evict`` reading: the cached target is gone
    return edge.router.initial(request.headers)


def missed(edge: Edge, hop: Hop | EdgeError) -> Hop | EdgeError:
    """A replayed request that did not come from the cache carries ``fly-replay-cache-status:
    miss`` (docs/fly-protocol.md §1) when the app uses the cache."""
    if isinstance(hop, Hop) and not hop.is_fallback and edge.cache.active:
        return replace(hop, headers={**hop.headers, REPLAY_CACHE_STATUS_HEADER: "miss"})
    return hop


def cache_lookup(edge: Edge, request: web.Request) -> Lookup:
    """The request's one replay-cache lookup (docs/fly-protocol.md §1 "Only one cache lookup step").
    GUESS: a client's own routing header (force/prefer instance) skips it."""
    headers = request.headers
    if not edge.cache.active or FORCE_INSTANCE_HEADER in headers or PREFER_INSTANCE_HEADER in headers:
        return Lookup(None)
    return edge.cache.lookup(request.host, request.path, headers, edge.cache_now())


def cache_store(edge: Edge, request: web.Request, lookup: Lookup, value: str,
                response_headers: Mapping[str, str]) -> None:
    """Remember the origin's replay when a rule or the answer's pattern says so (``edge_cache``)."""
    try:
        instr = parse_replay_instruction(value)
    except ValueError:
        return  # the replay itself fails with PA03
    edge.cache.store(lookup, request.host, request.path, value, instr, response_headers, edge.cache_now())


def outcome(edge: Edge, first: Hop | EdgeError, replays: int) -> None:
    """How a relayed request got to the Machine that answered it (``FlyEdge.cache_outcomes``)."""
    if isinstance(first, Hop) and first.cached:
        edge.cache_outcomes["hit" if replays == 0 else "hit_replayed"] += 1
    else:
        edge.cache_outcomes["direct" if replays == 0 else "replayed"] += 1


async def _read_body(request: web.Request, limit: int) -> _Body:
    """Buffer the body up to ``limit`` bytes (Fly buffers for replay); stop reading past it."""
    if not request.body_exists:
        return _Body(b"", True, False)
    buf = bytearray()
    while len(buf) <= limit:
        chunk = await request.content.readany()
        if not chunk:
            return _Body(bytes(buf), True, True)
        buf += chunk
    return _Body(bytes(buf), False, True)


async def _send(
    edge: Edge, request: web.Request, hop: Hop, headers: CIMultiDict[str], body: _Body
) -> aiohttp.ClientResponse:
    data: bytes | io.BytesIO | AsyncIterator[bytes] | None = None
    if not body.complete:
        data = _stream(body.data, request.content)
    elif body.present:
        data = body.data if len(body.data) <= _RAW_BYTES_MAX else io.BytesIO(body.data)
    kwargs: dict[str, Any] = {}
    if hop.timeout:
        kwargs["timeout"] = aiohttp.ClientTimeout(total=None, connect=hop.timeout)
    return await edge.client.request(
        request.method,
        edge.machine_url(hop.machine, request),
        headers=headers,
        data=data,
        allow_redirects=False,
        skip_auto_headers=_SKIP_AUTO,
        auto_decompress=False,
        **kwargs,
    )


async def _relay(
    edge: Edge, request: web.Request, upstream: aiohttp.ClientResponse, hop: Hop, request_id: str, replays: int
) -> web.StreamResponse:
    edge.served[hop.machine.id] += 1
    edge.replay_counts[replays] += 1
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(downstream_response_headers(upstream.headers))
        response.headers[FLY_REQUEST_ID_HEADER] = request_id
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            log.info("relaying the answer of %s failed: %r", hop.machine.id, exc)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
    return response


async def _stream(prefix: bytes, content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    yield prefix
    async for chunk in content.iter_any():
        yield chunk
