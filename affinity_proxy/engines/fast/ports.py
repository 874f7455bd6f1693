"""What the fast engine's lower modules need from the server and from a client connection.

``server.FastServer`` owns ``protocol.ClientConnection``s, which run ``exchange.Exchange``s; the
exchange, ``lane``, ``protocol.RequestFraming``, ``closing`` and ``handoff`` hold a reference back
up to the connection or the server. They type against these Protocols instead of importing the
modules above them, so the engine's import graph has no circle (``tests/test_architecture.py``
counts ``TYPE_CHECKING`` imports too). Protocols are structural: nothing here runs per request.
Only modules below the server are named here, and none of them imports this module's users.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Coroutine

    from affinity_proxy.proxy.context import ProxyContext
    from affinity_proxy.proxy.realip import RealClient

    from .counting import Counts
    from .head import HeadCache, RequestHead
    from .route import HotRoutes, Router
    from .upstream import UpstreamPool
    from .wire import RequestIds


class ServerPort(Protocol):
    """``FastServer`` as its connections and exchanges see it."""

    ctx: ProxyContext
    router: Router
    counts: Counts
    hot: HotRoutes
    heads: HeadCache
    pool: UpstreamPool
    ids: RequestIds
    closing: bool
    #: the server's own ``ClientConnection``s (the concrete type, which cannot be named here)
    connections: set[Any]

    def admit(self, conn: Any) -> bool: ...
    def forget(self, conn: Any) -> None: ...
    def exchange_finished(self) -> None: ...
    def aiohttp_protocol(self) -> asyncio.Protocol: ...
    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None: ...
    def fqdn(self) -> str: ...
    def replay_bytes(self, instance: str, header: str, status: int, version: bytes, keep_alive: bool,
                     head_only: bool = False, invalidate: bool = False) -> bytes: ...


class ConnectionPort(Protocol):
    """``ClientConnection`` as its exchange, its replay lane and the hand-off see it."""

    PENDING: ClassVar[int]
    UPSTREAM: ClassVar[int]
    server: ServerPort
    transport: asyncio.Transport | None
    peer: str | None
    scheme: str
    closing: bool
    handed_off: bool
    msg_done: bool
    buf: bytes
    eof: bool
    #: the request in flight: an ``exchange.Exchange`` or a ``forward_lane.LaneExchange``
    ex: Any
    read_pause: int
    write_paused: bool
    last_rx: float
    idle_since: float

    def write(self, data: bytes) -> None: ...
    def real_client(self, head: RequestHead) -> RealClient: ...
    #: ``ex`` is the ``exchange.Exchange`` that finished (which imports this module)
    def exchange_done(self, ex: Any, *, keep_alive: bool) -> None: ...
    def pause_reading(self, why: int) -> None: ...
    def resume_reading(self, why: int) -> None: ...
