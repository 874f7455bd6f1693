"""``serve --exec "<app command>"``: run the app beside the proxy in one container or Fly Machine.

The proxy starts the app (through ``/bin/sh -c``, so ``$FLY_MACHINE_ID``-style variables expand),
and owns its lifetime: on SIGTERM the proxy first stops accepting and drains, then sends SIGTERM to
the app, waits ``grace`` seconds and kills it if needed. If the app exits on its own, the proxy
shuts down too (exit code 1 unless the app exited 0), so the platform restarts the pair — a proxy
in front of a dead app would only answer 502s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

log = logging.getLogger("affinity_proxy.supervise")


class AppProcess:
    """One supervised child process. Not thread-safe; use from the event loop."""

    def __init__(self, command: str, *, grace: float = 10.0) -> None:
        self.command = command
        self.grace = grace
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> None:
        # A new session: Ctrl-C in a terminal reaches the proxy, which then stops the app in order.
        self._proc = await asyncio.create_subprocess_shell(self.command, start_new_session=True)
        log.info("app started", extra={"fields": {"pid": self._proc.pid}})

    async def wait(self) -> int:
        """Wait for the app to exit; returns its exit code."""
        assert self._proc is not None
        return await self._proc.wait()

    async def stop(self) -> int | None:
        """SIGTERM the app's process group, then SIGKILL after ``grace`` seconds. Idempotent."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc else None
        self._signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(proc.wait(), self.grace)
        except TimeoutError:
            log.warning("app did not exit after SIGTERM; killing it", extra={"fields": {"pid": proc.pid}})
            self._signal(signal.SIGKILL)
            return await proc.wait()

    def _signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):  # it exited between the check and the signal
            os.killpg(self._proc.pid, sig)
