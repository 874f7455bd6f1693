"""Main-listener middlewares: the total header-size guard (431) and error mapping.

aiohttp limits each header line; operators think in terms of the whole header block (nginx's
``large_client_header_buffers``), so the total is checked here before any routing work.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from affinity_proxy.web.errors import json_error

log = logging.getLogger("affinity_proxy.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def header_size_guard(max_header_bytes: int) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        size = len(request.method) + len(request.raw_path) + 12
        for name, value in request.raw_headers:
            size += len(name) + len(value) + 4
        if size > max_header_bytes:
            return json_error(431, f"request headers exceed {max_header_bytes} bytes", code="headers_too_large")
        return await handler(request)

    return guard
