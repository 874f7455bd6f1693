"""Main-listener request checks: what the proxy refuses before routing, and the header-size guard.

``preflight`` runs on every request of the main listener before the router and before aiohttp
answers ``Expect: 100-continue`` (``web.server`` calls it), so a refused upload is refused without
the client ever being invited to send it. Everything it refuses gets a JSON error with a fixed
message (nothing from the request is echoed).

aiohttp limits each header line; operators think in terms of the whole header block (nginx's
``large_client_header_buffers``), so the total is checked here before any routing work.
Imports aiohttp and ``web.errors`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import HttpVersion10, HttpVersion11, hdrs, web
from aiohttp.web_request import BaseRequest

from affinity_proxy.proxy.errors import json_error
from affinity_proxy.proxy.headers import UNSUPPORTED_CODING, is_chunked_only

log = logging.getLogger("affinity_proxy.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SUPPORTED_VERSIONS = frozenset({HttpVersion10, HttpVersion11})
#: Methods a reverse proxy never forwards: CONNECT would ask us to open a tunnel to any host, TRACE
#: would echo the request (its cookies and credentials) back to a script (nginx answers 405 too).
REFUSED_METHODS = frozenset({hdrs.METH_CONNECT, hdrs.METH_TRACE})
ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def header_block_size(request: BaseRequest) -> int:
    """Approximate bytes of the request head: request line plus every header line. O(headers)."""
    size = len(request.method) + len(request.raw_path) + 12
    for name, value in request.raw_headers:
        size += len(name) + len(value) + 4
    return size


def preflight(request: BaseRequest, *, max_header_bytes: int, max_body_bytes: int) -> web.Response | None:
    """The refusal for a request the proxy must not route, or None. No I/O; never reads the body.

    400 for an HTTP version other than 1.0/1.1 (HTTP/0.9 passes aiohttp's parser), 405 for
    ``CONNECT`` and ``TRACE``, 431 for a header block over ``max_header_bytes``, 501 (connection
    closed afterwards) for a ``Transfer-Encoding`` other than exactly ``chunked`` that the parser
    let through (``gzip, chunked``), 417 for an ``Expect`` other than ``100-continue``, 413
    (connection closed afterwards) for a declared ``Content-Length`` over ``max_body_bytes``. A
    chunked body over the limit is stopped while it streams (``forwarding.http``).
    """
    if request.version not in SUPPORTED_VERSIONS:
        return json_error(400, "only HTTP/1.0 and HTTP/1.1 are supported", code="unsupported_http_version")
    if request.method in REFUSED_METHODS:
        return json_error(405, f"{request.method} is not supported by this reverse proxy", code="method_not_allowed",
                          headers={"Allow": ALLOWED_METHODS})
    if header_block_size(request) > max_header_bytes:
        return json_error(431, f"request headers exceed {max_header_bytes} bytes", code="headers_too_large")
    coding = request.headers.get(hdrs.TRANSFER_ENCODING)
    if coding is not None and not is_chunked_only(coding):
        status, message, code = UNSUPPORTED_CODING
        response = json_error(status, message, code=code)
        response.force_close()
        return response
    expect = request.headers.get(hdrs.EXPECT)
    if expect is not None and expect.strip().lower() != "100-continue":
        return json_error(417, "only Expect: 100-continue is supported", code="expectation_failed")
    try:
        declared = request.content_length
    except ValueError:  # the parser validates Content-Length; this is belt and braces
        return json_error(400, "invalid Content-Length", code="bad_content_length")
    if declared is not None and declared > max_body_bytes:
        response = json_error(413, f"request body exceeds {max_body_bytes} bytes", code="body_too_large")
        response.force_close()
        return response
    return None


def header_size_guard(max_header_bytes: int) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware form of the header-block check, for applications not served by ``ProxyAppRunner``."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if header_block_size(request) > max_header_bytes:
            return json_error(431, f"request headers exceed {max_header_bytes} bytes", code="headers_too_large")
        return await handler(request)

    return guard
