"""Supervisor of ``serve --workers N``: starts, watches, restarts and stops N worker processes.

Process model: this parent never serves. It spawns N workers with multiprocessing's "spawn" method
(a fresh interpreter each: no inherited event loop, sockets, Redis pools or signal handlers), and
each runs a full ``ProxyServer`` binding the main AND the admin listener with SO_REUSEPORT, so the
kernel spreads connections over the workers and any worker answers admin requests. Pins, drain
marks and locks are shared through Redis. Before spawning, the parent checks that the ports are
free (a second supervisor on the same port would otherwise silently share its traffic) and picks a
port for ``:0``, holding it with a bound, never-listening SO_REUSEPORT socket.

Signals: SIGTERM or SIGINT to the parent becomes one SIGTERM to every worker, which shuts down
gracefully; workers get ``limits.client_timeout`` + ``SHUTDOWN_MARGIN`` seconds before SIGKILL, and
a second signal to the parent kills them at once. Workers ignore SIGINT (a terminal's Ctrl-C reaches
the whole process group; the parent's SIGTERM is the one stop they act on). They are spawned with
SIGTERM/SIGINT blocked and unblock SIGTERM once their handler is installed, so a stop that arrives
during a worker's start-up is handled, not fatal; once stopping, a worker blocks SIGTERM again so
nothing cuts its graceful shutdown. A worker also stops when its pipe to the parent reaches EOF
(the parent died).

Metrics: the parent sets PROMETHEUS_MULTIPROC_DIR to a fresh temporary directory before the first
spawn (see ``observability.metrics``), calls ``mark_process_dead`` for every worker that exits and
deletes the directory on exit.

Exit codes: 0 after a clean shutdown, 1 when the workers could not start (or had to be killed).
A worker that crashes later is restarted with exponential backoff (``RESTART_BACKOFF``), and logged.
Must not import aiohttp or the app: the parent never needs them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from prometheus_client.multiprocess import mark_process_dead

from affinity_proxy.config import Config
from affinity_proxy.observability.metrics import MULTIPROC_ENV
from affinity_proxy.serve.runtime import STOP_SIGNALS, prepare_listeners, tag_process_logs, worker_main

log = logging.getLogger("affinity_proxy.workers")

SHUTDOWN_MARGIN = 5.0  # seconds beyond limits.client_timeout before SIGKILL
STARTUP_TIMEOUT = 30.0  # a worker not ready by then is killed (and counts as a failed start)
RESTART_BACKOFF = (0.5, 30.0)  # first and largest delay before restarting a crashed worker
STABLE_AFTER = 60.0  # a worker that served this long before crashing restarts with the first delay


@dataclass(slots=True)
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    pid: int
    started_at: float
    ready_at: float | None = None
    failure: str | None = None
    conn_open: bool = True


class Supervisor:
    """Runs N workers until SIGTERM/SIGINT. Call ``run()`` once, from the main thread."""

    def __init__(self, config: Config, workers: int, *, config_path: str | None = None) -> None:
        self._config = config
        self._config_path = config_path
        self._count = workers
        self._mp = multiprocessing.get_context("spawn")
        self._live: dict[int, _Worker] = {}
        self._failures: dict[int, int] = {}
        self._restart_at: dict[int, float] = {}
        self._signals: list[int] = []
        self._phase = "starting"  # then "running", then "stopping"
        self._unclean = False
        self._start_error: str | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._reload_requested = False
        self._metrics_dir = ""

    def run(self) -> int:
        """Start the workers, supervise them until a stop signal, stop them; returns the exit code."""
        tag_process_logs("supervisor")
        self._metrics_dir = tempfile.mkdtemp(prefix="affinity-metrics-")
        previous_env = os.environ.get(MULTIPROC_ENV)
        os.environ[MULTIPROC_ENV] = self._metrics_dir
        previous_handlers = self._install_signal_handlers()
        held: list[socket.socket] = []
        try:
            try:
                self._config, held = prepare_listeners(self._config)
            except OSError as exc:
                return self._cannot_start(str(exc))
            resource_tracker.ensure_running()  # now, so it cannot unblock our signals during a spawn
            log.info("starting workers", extra={"fields": {
                "workers": self._count, "listen": self._config.listen, "admin": self._config.admin_listen,
                "metrics_dir": self._metrics_dir}})
            for index in range(self._count):
                self._spawn(index)
            if not self._await_startup():
                self._stop_workers()
                return self._cannot_start(self._start_error or "workers did not start")
            if not self._signals:
                log.info("all workers ready", extra={"fields": {"workers": self._count}})
                self._supervise()
            return self._stop_workers()
        finally:
            for sock in held:
                sock.close()
            signal.set_wakeup_fd(-1)
            for sig, handler in previous_handlers.items():
                if handler is not None:  # None: installed outside Python, cannot be restored
                    signal.signal(sig, handler)
            self._wake_r.close()
            self._wake_w.close()
            self._remove_metrics_dir(previous_env)

    def _cannot_start(self, message: str) -> int:
        log.error("workers could not start: %s", message)
        print(f"error: workers could not start: {message}", file=sys.stderr)
        return 1

    def _install_signal_handlers(self) -> dict[signal.Signals, Any]:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_reload_signal)
        return handlers

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _on_reload_signal(self, signum: int, frame: FrameType | None) -> None:
        self._reload_requested = True

    def _forward_reload(self) -> None:
        """SIGHUP: every worker re-reads the config file (each applies it to its own process)."""
        self._reload_requested = False
        log.info("reload requested; forwarding SIGHUP to workers", extra={"fields": {"workers": len(self._live)}})
        for w in self._live.values():
            try:
                os.kill(w.pid, signal.SIGHUP)
            except ProcessLookupError:
                log.debug("worker %s exited before the reload signal", w.pid)

    def _spawn(self, index: int) -> None:
        parent_end, child_end = self._mp.Pipe(duplex=True)
        process = self._mp.Process(target=worker_main, args=(self._config, index, child_end, self._config_path),
                                   name=f"affinity-worker-{index}")
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            process.start()
        except OSError as exc:
            parent_end.close()
            log.error("cannot spawn worker %d: %s", index, exc)
            if self._phase == "starting":
                self._start_error = f"cannot spawn worker {index}: {exc}"
            else:
                self._schedule_restart(index, None)
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            child_end.close()
        assert process.pid is not None
        self._live[index] = _Worker(index, process, parent_end, process.pid, time.monotonic())
        log.info("worker started", extra={"fields": {"index": index, "worker_pid": process.pid}})

    def _await_startup(self) -> bool:
        """Wait until every worker is ready (True), one failed to start (False), or a stop signal (True)."""
        while not self._signals and self._start_error is None:
            if len(self._live) == self._count and all(w.ready_at is not None for w in self._live.values()):
                return True
            self._wait(self._kill_slow_starters())
        return self._start_error is None

    def _supervise(self) -> None:
        self._phase = "running"
        while not self._signals:
            now = time.monotonic()
            for index, at in list(self._restart_at.items()):
                if at <= now:
                    del self._restart_at[index]
                    self._spawn(index)
            timeout = min([self._kill_slow_starters(), *(at - now for at in self._restart_at.values())])
            self._wait(max(timeout, 0.0))

    def _kill_slow_starters(self) -> float:
        """SIGKILL workers not ready after STARTUP_TIMEOUT; returns the seconds until the next check."""
        now = time.monotonic()
        next_check = 1.0
        for w in self._live.values():
            if w.ready_at is not None:
                continue
            left = w.started_at + STARTUP_TIMEOUT - now
            if left <= 0 and w.failure is None:
                w.failure = f"not ready after {STARTUP_TIMEOUT:g}s"
                log.error("worker %d (pid %d) not ready after %gs; killing it", w.index, w.pid, STARTUP_TIMEOUT)
                w.process.kill()
            next_check = min(next_check, max(left, 0.05))
        return next_check

    def _wait(self, timeout: float) -> None:
        """Block until a signal, a worker message or a worker exit (or ``timeout``), and handle them."""
        handles: list[object] = [self._wake_r]
        for w in self._live.values():
            handles.append(w.process.sentinel)
            if w.conn_open and w.ready_at is None:
                handles.append(w.conn)
        ready = wait(handles, timeout)  # type: ignore[arg-type]
        if self._wake_r in ready:
            self._drain_wakeup()
        if self._reload_requested:
            self._forward_reload()
        for w in list(self._live.values()):
            if w.conn in ready:
                self._read_message(w)
            if w.process.sentinel in ready:
                self._reap(w)

    def _drain_wakeup(self) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except BlockingIOError:
            return

    def _read_message(self, w: _Worker) -> None:
        try:
            kind, *detail = w.conn.recv()
        except EOFError:  # the worker is exiting; its sentinel reports how
            w.conn_open = False
            return
        if kind == "ready":
            w.ready_at = time.monotonic()
            log.info("worker ready", extra={"fields": {"index": w.index, "worker_pid": w.pid,
                                                       "port": detail[0], "admin_port": detail[1]}})
        else:
            w.failure = str(detail[0]) if detail else kind

    def _reap(self, w: _Worker) -> None:
        w.process.join()
        code = w.process.exitcode
        del self._live[w.index]
        w.conn.close()
        w.process.close()
        mark_process_dead(w.pid, self._metrics_dir)
        fields: dict[str, object] = {"index": w.index, "worker_pid": w.pid, "exit_code": code}
        if self._phase == "stopping":
            log.info("worker exited", extra={"fields": fields})
            if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                self._unclean = True
            return
        if self._phase == "starting":
            self._start_error = f"worker {w.index} (pid {w.pid}) {w.failure or f'exited with code {code}'}"
            return
        delay = self._schedule_restart(w.index, w.ready_at)
        if w.failure:
            fields["failure"] = w.failure
        log.error("worker crashed; restarting", extra={"fields": {
            **fields, "restart_in": delay, "failures": self._failures[w.index]}})

    def _schedule_restart(self, index: int, ready_at: float | None) -> float:
        now = time.monotonic()
        failures = self._failures.get(index, 0)
        if ready_at is not None and now - ready_at >= STABLE_AFTER:
            failures = 0
        failures += 1
        self._failures[index] = failures
        first, largest = RESTART_BACKOFF
        delay = min(first * 2 ** (failures - 1), largest)
        self._restart_at[index] = now + delay
        return delay

    def _stop_workers(self) -> int:
        """Forward the stop signal, wait for the workers (bounded), SIGKILL stragglers; the exit code."""
        self._phase = "stopping"
        self._restart_at.clear()
        sig = self._signals[0] if self._signals else signal.SIGTERM
        seen = len(self._signals)
        for w in self._live.values():
            os.kill(w.pid, signal.SIGTERM)
        grace = self._config.limits.client_timeout + SHUTDOWN_MARGIN
        if self._live:
            log.info("stopping workers", extra={"fields": {"on": signal.Signals(sig).name, "grace": grace}})
        deadline = time.monotonic() + grace
        while self._live and len(self._signals) <= seen and time.monotonic() < deadline:
            self._wait(max(min(deadline - time.monotonic(), 1.0), 0.0))
        for w in self._live.values():
            log.warning("worker %d (pid %d) still running; killing it", w.index, w.pid)
            w.process.kill()
            self._unclean = True
        while self._live:
            self._wait(1.0)
        code = 1 if self._unclean else 0
        log.info("workers stopped", extra={"fields": {"exit_code": code}})
        return code

    def _remove_metrics_dir(self, previous_env: str | None) -> None:
        if previous_env is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous_env
        try:
            shutil.rmtree(self._metrics_dir)
        except OSError as exc:
            log.warning("could not remove the metrics directory %s: %s", self._metrics_dir, exc)

