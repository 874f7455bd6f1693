"""``affinity-proxy demo`` as a newcomer meets it: a real subprocess, and every command its banner
prints is run as printed (in bash, from another directory, without the venv on PATH), plus the
dashboard URL it prints."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log_path = tmp_path / "demo.log"
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # like a shell without the venv activated
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "affinity_proxy", "demo", "--port", "0"], stdout=log_file,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    try:
        yield proc, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def test_demo_prints_commands_that_run_as_printed_and_the_dashboard(
    demo: tuple[subprocess.Popen[bytes], Path], tmp_path: Path,
) -> None:
    proc, log_path = demo
    await wait_until(lambda: "Press Ctrl-C" in log_path.read_text() or proc.poll() is not None, timeout=60,
                     message="the demo banner")
    banner = log_path.read_text()
    assert proc.poll() is None, banner
    dashboard = re.search(r"^Dashboard: (http://127\.0\.0\.1:\d+/dashboard)$", banner, re.M)
    assert dashboard, banner
    async with aiohttp.ClientSession() as http, http.get(dashboard.group(1)) as resp:
        assert resp.status == 200 and resp.content_type == "text/html"

    commands = [line.strip() for line in banner.split("Try:\n", 1)[1].split("Press Ctrl-C")[0].splitlines()]
    assert len(commands) >= 8 and any("pins list" in c for c in commands), banner
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    for command in commands:
        command = command.replace("/tmp/jar", str(tmp_path / "jar"))
        shell = await asyncio.create_subprocess_exec(
            "bash", "-o", "pipefail", "-c", command, cwd=workdir, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        )
        out, err = await asyncio.wait_for(shell.communicate(), 30)
        assert shell.returncode == 0, (command, out, err)
        assert out.strip(), command
        if command.startswith("curl -i"):
            assert out.startswith(b"HTTP/1.1 200"), out

    proc.send_signal(signal.SIGTERM)
    await wait_until(lambda: proc.poll() is not None, timeout=30, message="the demo stopped")
    assert proc.returncode == 0, log_path.read_text()
