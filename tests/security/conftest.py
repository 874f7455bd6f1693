"""Fixtures for ``tests/security``: third-party attack tools run against a real proxy (both
engines) with real backends. ``slowhttptest`` is Debian's package of that name (``.ci/run`` and
``make test`` install it); a test that needs it fails with that instruction when it is missing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.robustness.conftest import recording_backend  # noqa: F401  (a fixture used here)


@pytest.fixture
def slowhttptest() -> str:
    path = shutil.which("slowhttptest")
    if path is None:
        pytest.fail("slowhttptest is not installed: `apt-get install -y slowhttptest` (Debian package; "
                    "`make test` and .ci/run install it)")
    return path


def _own_sockets() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _tcp_rows() -> list[list[str]]:
    return [line.split() for table in ("/proc/net/tcp", "/proc/net/tcp6")
            for line in Path(table).read_text().splitlines()[1:]]


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1], 16)


def backend_connections(port: int) -> int:
    """TCP connections this process has accepted on ``port`` (a backend running in the test
    process), read from /proc: the listening socket is not counted."""
    inodes = _own_sockets()
    return sum(1 for fields in _tcp_rows()  # fields[3] 0A: LISTEN
               if _port(fields[1]) == port and fields[9] in inodes and fields[3] != "0A")


def unread_upstream_connections(port: int) -> int:
    """This process's connections *to* ``port`` (the proxy's side of its backend connections) with
    bytes in their receive queue: response bytes the proxy has not read (yet). A connection held
    for a slow reader keeps them (the proxy paused reading it); one whose response the proxy took
    whole has none, except for the moment between their arrival and the proxy's next read."""
    inodes = _own_sockets()
    return sum(1 for fields in _tcp_rows()
               if _port(fields[2]) == port and fields[9] in inodes and int(fields[4].split(":")[1], 16) > 0)
