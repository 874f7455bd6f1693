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


def backend_connections(port: int) -> int:
    """TCP connections this process has accepted on ``port`` (a backend running in the test
    process), read from /proc: the listening socket is not counted."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            state = fields[3]
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes and state != "0A":  # 0A: LISTEN
                count += 1
    return count
