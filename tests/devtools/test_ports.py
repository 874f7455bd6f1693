"""``devtools.ports.free_port``: ports outside the kernel's ephemeral range, free, and not handed out twice."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from affinity_proxy.devtools.ports import candidate_ranges, ephemeral_range, free_port, partition, xdist_worker
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


RANGES = [range(10000, 32768), range(61000, 65536)]  # Linux's default ephemeral range left out


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_xdist_workers_get_disjoint_slices_that_cover_the_ranges(count: int) -> None:
    shares = [partition(RANGES, index, count) for index in range(count)]
    ports = [set().union(*share) for share in shares]
    assert all(ports), "every worker has ports"
    for i in range(count):
        for j in range(i + 1, count):
            assert not ports[i] & ports[j], (i, j)
    assert set().union(*ports) == set().union(*RANGES)
    assert partition(RANGES, 0, 1) == RANGES  # one worker: everything, unchanged
    assert all(share == partition(RANGES, i, count) for i, share in enumerate(shares))  # a pure function


@pytest.mark.parametrize(("index", "count"), [(2, 2), (-1, 2), (0, 0)])
def test_a_worker_outside_the_count_is_refused(index: int, count: int) -> None:
    with pytest.raises(ValueError):
        partition(RANGES, index, count)


def test_the_worker_comes_from_pytest_xdist_environment() -> None:
    assert xdist_worker({}) is None
    assert xdist_worker({"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "2"}) == (1, 2)
    assert xdist_worker({"PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "3"}) == (0, 3)
    assert xdist_worker({"PYTEST_XDIST_WORKER": "gw2", "PYTEST_XDIST_WORKER_COUNT": "2"}) is None
    assert xdist_worker({"PYTEST_XDIST_WORKER": "master", "PYTEST_XDIST_WORKER_COUNT": "2"}) is None
    assert xdist_worker({"PYTEST_XDIST_WORKER": "gw0"}) is None


@pytest.mark.parametrize("index", [0, 1])
def test_a_worker_process_picks_only_from_its_slice(index: int) -> None:
    """A real process run as xdist worker ``index`` of 2 (as a proxy a worker starts would be: it
    inherits the environment) picks its ports from its own slice only."""
    env = {**os.environ, "PYTEST_XDIST_WORKER": f"gw{index}", "PYTEST_XDIST_WORKER_COUNT": "2"}
    code = "from affinity_proxy.devtools.ports import free_port; print(*(free_port() for _ in range(100)))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    ports = [int(p) for p in out.split()]
    mine, other = partition(candidate_ranges(), index, 2), partition(candidate_ranges(), 1 - index, 2)
    assert len(ports) == 100 and all(any(p in r for r in mine) for p in ports)
    assert not any(p in r for r in other for p in ports)
