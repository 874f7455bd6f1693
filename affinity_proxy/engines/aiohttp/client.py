"""UpstreamClient: the one HTTP client a process uses to reach its instances.

One ``aiohttp.ClientSession`` over one ``TCPConnector`` per process, so connections to an
instance are kept alive and reused across requests (a new TCP connection per request costs a
round trip and a socket in TIME_WAIT). The session is configured to be transparent: bodies are
not decompressed, no cookie jar stores the users' cookies, redirects are the caller's to relay,
and aiohttp's default ``Accept``/``Accept-Encoding``/``User-Agent``/``Content-Type`` are not
invented for requests that lacked them. Imports only aiohttp and ``forwarding.errors``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType

import aiohttp
from aiohttp import web

from affinity_proxy.proxy.upstream_errors import BodyTooLarge, UpstreamError, UpstreamErrorKind

__all__ = ["BodyTooLarge", "UpstreamClient", "UpstreamError", "UpstreamErrorKind"]

# Headers aiohttp adds on its own when absent. Adding Accept-Encoding would be a real bug: with
# auto_decompress=False the client would get a gzip body it never asked for.
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
# Instances may send big cookies; aiohttp's 8 KiB default per header line is too tight for a proxy.
_MAX_FIELD_SIZE = 32 * 1024
# Per-response read buffer (aiohttp's ``read_bufsize``): what is held per client that stops reading.
_READ_BUFSIZE = 16 * 1024


class UpstreamClient:
    """Owns the process-wide session and connector used by ``forward_http``/``relay_websocket``.

    ``connect_timeout`` bounds getting a connection (pool wait, DNS, TCP and TLS);
    ``read_timeout`` bounds every wait for bytes from the instance (headers or body; WebSockets
    are exempt after the handshake) and, in ``forward_http``, every wait for the instance to take
    request-body bytes before it answers. ``limit`` caps simultaneous upstream connections for the
    process (requests beyond it wait, counted against ``connect_timeout``); ``limit_per_host``
    caps them per instance (0 = no per-instance cap). ``keepalive_timeout`` is how long an idle
    connection is kept; keep it below the instances' own idle timeout to avoid reusing a socket
    the instance is closing. ``dns_cache_ttl`` caches resolutions; ``resolver`` replaces aiohttp's
    (fly mode: ``membership.private_net.PrivateNetResolver``, which caches by itself).

    Lifecycle: ``await start()`` inside the running loop, ``await close()`` at shutdown; or
    ``app.cleanup_ctx.append(client.cleanup_ctx)``, or ``async with client:``. Not thread-safe;
    one per event loop.
    """

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        limit: int = 1000,
        limit_per_host: int = 0,
        keepalive_timeout: float = 15.0,
        dns_cache_ttl: int = 10,
        resolver: aiohttp.abc.AbstractResolver | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.limit = limit
        self.limit_per_host = limit_per_host
        self.keepalive_timeout = keepalive_timeout
        self.dns_cache_ttl = dns_cache_ttl
        self.resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared session. Raises RuntimeError before ``start()`` or after ``close()``."""
        if self._session is None:
            raise RuntimeError("UpstreamClient is not started (await start() first)")
        return self._session

    async def start(self) -> None:
        """Create the connector and session. Idempotent. Does no network I/O."""
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=self.limit,
            limit_per_host=self.limit_per_host,
            ttl_dns_cache=self.dns_cache_ttl,
            # a resolver of our own caches what it may (fly mode: 6PN answers live a few seconds)
            use_dns_cache=self.resolver is None,
            resolver=self.resolver,
            keepalive_timeout=self.keepalive_timeout,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            max_field_size=_MAX_FIELD_SIZE,
            # the response buffer pauses the instance's socket at twice this: with aiohttp's 64 KiB
            # default a client that stops reading a download held ~830 KiB of RSS, now ~305 KiB
            read_bufsize=_READ_BUFSIZE,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.connect_timeout,
                sock_connect=self.connect_timeout,
                sock_read=self.read_timeout,
            ),
        )

    async def close(self) -> None:
        """Close the session and every pooled connection. Idempotent."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """``app.cleanup_ctx`` hook: start with the app, close at cleanup."""
        await self.start()
        try:
            yield
        finally:
            await self.close()

    async def __aenter__(self) -> UpstreamClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
