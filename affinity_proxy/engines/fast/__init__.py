"""The fast engine (``engine: fast``): a lean HTTP/1.1 data plane for the main listener.

asyncio Protocols end to end (uvloop when installed, as the runtime picks it) with httptools'
llhttp parsing requests and responses, keep-alive pools to the instances, and no coroutine, task
or multidict on the hot path: a request with a fresh affinity cookie is parsed, routed
(``routing.decide``), forwarded with pre-built header bytes and streamed back in callbacks.
What to do about each request (refuse, fly replay, forward with which headers and cookie, the
loop guard's re-pin, counting, retry-once and error answers) is ``proxy.act``'s, the route input
and fly signals ``proxy.resolve``'s and ``proxy.fly``'s; this package parses, moves bytes and
applies back-pressure.

Modules: ``server`` (listener, lifecycle, deadlines), ``protocol`` (client connections and their
request framing: strict framing, pipelining), ``handoff`` (to aiohttp) and ``closing`` (error
answers, lingering, client deadlines), ``exchange`` (one request: route, forward, answer),
``upstream`` (instance connections and their pool), ``route`` (head -> ``RouteInput`` -> decision,
and the hot-route cache of those decisions), ``lane`` (repeats of a fly replay answered from pre-
encoded bytes), ``counting`` (the counters ``act`` names, in batches), ``ports`` (the types the
lower modules see the server and connection through), ``head``, ``rewrite`` (request and response
heads) and ``wire`` (bytes). WebSocket upgrades, ``/_affinity/`` and anything unusual are handed to
the main aiohttp application on the same connection (see ``handoff``). Imports aiohttp only for
that hand-off and its ``Server`` banner; nothing imports this package but ``serve.app``.
"""

from __future__ import annotations

from .server import FastServer

__all__ = ["FastServer"]
