"""Listening sockets for ``listen``/``admin_listen``: the dual-stack wildcard.

A host left out (``":8080"``) or ``"[::]:8080"`` means *every address of both families*
(``config_parse.parse_hostport`` gives ``"::"`` for both). asyncio's ``create_server`` cannot
express that: it sets ``IPV6_V6ONLY`` on every IPv6 socket, so ``::`` would take IPv6 only. This
module binds one AF_INET6 socket with ``IPV6_V6ONLY`` off instead, which takes IPv4 too (as
IPv4-mapped addresses), and hands it to ``create_server(sock=...)``/``web.SockSite``.

Why it matters on Fly.io: the edge reaches a Machine over IPv4 while the private network (6PN,
``*.internal``, ``fdaa::/16``) is IPv6 only, so a node must listen on both (docs/fly-private-network.md).
``"0.0.0.0:8080"`` stays IPv4 only, ``"127.0.0.1"`` and ``"[::1]"`` are bound as given (by asyncio).
A host without IPv6 support (no AF_INET6 sockets at all) gets an IPv4 wildcard socket and a warning.
"""

from __future__ import annotations

import errno
import logging
import socket

log = logging.getLogger("affinity_proxy.listeners")

#: The host ``parse_hostport`` gives for ``":port"`` and ``"[::]:port"``.
DUAL_STACK = "::"


def is_dual_stack(host: str) -> bool:
    return host == DUAL_STACK


def dual_stack_socket(port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound, not yet listening, non-blocking socket on ``[::]:port`` taking IPv4 and IPv6.

    ``reuse_port`` sets SO_REUSEPORT (``serve --workers N``: every worker binds the same port).
    Raises ``OSError`` (e.g. address in use: then both families' port is taken or unavailable)."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError as exc:
        if exc.errno not in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            raise
        log.warning("IPv6 is not supported here (%s); listening on 0.0.0.0:%d (IPv4 only)", exc.strerror, port)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        return _bind(sock, ("0.0.0.0", port), reuse_port)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    except OSError:
        sock.close()
        raise
    return _bind(sock, ("::", port), reuse_port)


def _bind(sock: socket.socket, address: tuple[str, int], reuse_port: bool) -> socket.socket:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def host_port(host: str, port: int) -> str:
    """``host:port`` with an IPv6 host in brackets (for logs and configs)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
