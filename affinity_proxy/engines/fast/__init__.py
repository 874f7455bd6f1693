"""The fast engine (``engine: fast``): a lean HTTP/1.1 data plane for the main listener.

asyncio Protocols end to end (uvloop when installed, as the runtime picks it) with httptools'
llhttp parsing requests and responses, keep-alive pools to the instances, and no coroutine, task
or multidict on the hot path: a request with a fresh affinity cookie is parsed, routed
(``routing.decide``), forwarded with pre-built header bytes and streamed back in callbacks.
Behaviour is the aiohttp engine's (``web.proxy_handler``): same decisions, metrics, Set-Cookie
rules, forwarding headers, fly replays and loop guard, JSON errors and retry-once.

Modules: ``server`` (listener, lifecycle, deadlines), ``protocol`` (client connections) with
``framing`` (strict framing, pipelining), ``handoff`` (to aiohttp) and ``closing`` (error answers,
lingering, client deadlines), ``exchange`` (one request: route, forward, answer) over ``forward``,
``upstream`` and ``pool`` (instance connections), ``route`` (head -> ``RouteInput`` -> decision),
``hot`` and ``lane`` (cached decisions; repeats of a fly replay answered from pre-encoded bytes),
``head``/``response``/``rewrite``/``wire`` (bytes). WebSocket upgrades, ``/_affinity/`` and
anything unusual are handed to the main aiohttp application on the same connection (see
``handoff``). Imports aiohttp only for that hand-off, its cookie parser, its ``Server`` banner and
the shared ``web`` helpers; nothing imports this package but ``app``.
"""

from __future__ import annotations

from .server import FastServer

__all__ = ["FastServer"]
