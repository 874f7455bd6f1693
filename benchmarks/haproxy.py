"""HAProxy as the reference for new sessions: ``cookie <name> insert`` over the backends (issue #16).

Pure text generation (tested in tests/benchmarks/test_benchmarks_harness.py); ``targets.py`` starts the
process. A request without the cookie is balanced round-robin and the answer carries a
``Set-Cookie`` naming the server, the same work affinity-proxy does for a first visit (pick an
instance, mint a cookie), without the signature. One thread, in the foreground (``-db``), so the
harness owns its PID; keep-alive on both sides, as the other targets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

_COOKIE_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_SERVER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def insert_conf(listen_port: int, backends: Sequence[tuple[str, int]], *, cookie_name: str = "fly-instance-id") -> str:
    """The configuration: one frontend on 127.0.0.1:``listen_port``, one backend whose servers are
    ``(id, port)`` with cookie value ``id``; ``insert indirect nocache httponly``: the cookie is set
    when the request has none (or a stale one) and never passed on to the servers."""
    if not backends:
        raise ValueError("at least one backend is needed")
    if not _COOKIE_NAME.fullmatch(cookie_name):
        raise ValueError(f"invalid cookie name: {cookie_name!r}")
    servers = []
    for server_id, port in backends:
        if not _SERVER_ID.fullmatch(server_id):
            raise ValueError(f"invalid server id: {server_id!r}")
        servers.append(f"    server {server_id} 127.0.0.1:{int(port)} cookie {server_id}\n")
    return f"""global
    nbthread 1
    maxconn 8192

defaults
    mode http
    option http-keep-alive
    option forwardfor
    timeout connect 5s
    timeout client 65s
    timeout server 65s
    timeout http-keep-alive 65s

frontend bench
    bind 127.0.0.1:{int(listen_port)}
    default_backend apps

backend apps
    balance roundrobin
    http-reuse always
    cookie {cookie_name} insert indirect nocache httponly
{"".join(servers)}"""


def haproxy_argv(haproxy: str, conf_path: Path) -> list[str]:
    """The command line: foreground (``-db``), the given configuration only."""
    return [haproxy, "-db", "-f", str(conf_path)]
