"""RedisServer: a throwaway ``redis-server`` on a free localhost port (and a unix socket) for tests.

No persistence, its own temporary directory, and ``stop()``/``start()`` keep the same port and socket
path so clients can reconnect after an outage. Waits for readiness by polling PING against a deadline
(no fixed sleeps). The binary is ``$REDIS_SERVER_BIN`` or ``redis-server`` on PATH.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from affinity_proxy.devtools.ports import free_port

START_TIMEOUT = 10.0


class RedisServerMissing(RuntimeError):
    """No redis-server binary: tests that need Redis cannot run."""


def find_redis_server() -> str:
    """Path of the redis-server binary, or RedisServerMissing with how to get one."""
    found = shutil.which(os.environ.get("REDIS_SERVER_BIN", "redis-server"))
    if found is None:
        raise RedisServerMissing(
            "redis-server not found: install it (apt-get install redis-server, brew install redis) "
            "or set REDIS_SERVER_BIN to its path; the pin store tests need a real Redis"
        )
    return found


class RedisServer:
    """One redis-server process. Not started by the constructor: use ``start()`` or ``with``."""

    def __init__(self, port: int | None = None) -> None:
        self.binary = find_redis_server()
        self.port = port or free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="affinity-redis-")
        self.dir = Path(self._tmp.name)
        self.unix_path = str(self.dir / "redis.sock")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_path}?db=0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start (again) on the same port and socket; returns once it answers PING."""
        if self.running:
            return
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", self.unix_path,
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self._log),
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {self._tail_log()}")
            if self._answers_ping():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT}s: {self._tail_log()}")
            time.sleep(0.01)  # poll interval, not a wait for a condition

    def _answers_ping(self) -> bool:
        try:
            with redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def _tail_log(self) -> str:
        try:
            return self._log.read_text(errors="replace")[-2000:]
        except OSError as exc:
            return f"(no log: {exc})"

    def stop(self) -> None:
        """SIGTERM (then SIGKILL after 5 s) and wait. Clients see connection refused afterwards."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # in case a test paused it
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (clients hit their timeouts)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A sync client (decoded responses); close it (``with``) when done."""
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5)

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
