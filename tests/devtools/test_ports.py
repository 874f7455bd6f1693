"""``devtools.ports.free_port``: ports outside the kernel's ephemeral range, free, and not handed out twice."""

from __future__ import annotations

import socket

from affinity_proxy.devtools.ports import candidate_ranges, ephemeral_range, free_port
from affinity_proxy.serve.listeners import dual_stack_socket


def test_ports_are_outside_the_ephemeral_range_and_bind_on_both_families() -> None:
    low, high = ephemeral_range()
    assert all(not (low <= r.start and r.stop - 1 <= high) for r in candidate_ranges())
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports), "a process never gets the same port twice in a row"
    for port in ports[:20]:
        assert not low <= port <= high
        dual_stack_socket(port).close()  # free on IPv4 and IPv6 right after the pick


def test_a_bound_port_is_never_handed_out() -> None:
    held = []
    try:
        for _ in range(50):
            port = free_port(dual_stack=False)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as every listener here (TIME_WAIT)
            sock.bind(("127.0.0.1", port))
            sock.listen()
            held.append(sock)
        taken = {s.getsockname()[1] for s in held}
        assert all(free_port() not in taken for _ in range(300))
    finally:
        for sock in held:
            sock.close()


def test_ephemeral_ports_from_the_kernel_never_collide_with_picks() -> None:
    """What broke CI: a port picked, released, then taken by a ``bind(0)`` elsewhere before its
    listener bound. The kernel's own picks stay in the ephemeral range; ours stay out of it."""
    low, high = ephemeral_range()
    with socket.socket() as kernel_pick:
        kernel_pick.bind(("127.0.0.1", 0))
        assert low <= kernel_pick.getsockname()[1] <= high
