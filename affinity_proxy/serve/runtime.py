"""Process runtime for ``serve``: event loop choice, signal handling, clean shutdown, worker bodies.

SIGTERM/SIGINT stop accepting, let in-flight requests finish (up to ``limits.client_timeout``),
flush pin refreshes and exit 0. uvloop is used when installed (it is faster; the proxy works
without it). With ``--workers 1`` the proxy runs in this process; with more, ``workers.Supervisor``
starts ``worker_main`` in N spawned processes, each serving both listeners with SO_REUSEPORT.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from affinity_proxy._tasks import TaskSet
from affinity_proxy.config import Config
from affinity_proxy.observability.logs import configure_logging
from affinity_proxy.serve.listeners import dual_stack_socket, host_port, is_dual_stack
from affinity_proxy.serve.supervise import AppProcess

if TYPE_CHECKING:
    from affinity_proxy.serve.app import ProxyServer

log = logging.getLogger("affinity_proxy.runtime")

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ProcessTag(logging.Filter):
    """Adds fixed fields (worker index, pid) to every record, so interleaved worker logs stay apart."""

    def __init__(self, **fields: object) -> None:
        super().__init__()
        self._fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        record.fields = {**self._fields, **fields} if isinstance(fields, dict) else dict(self._fields)
        return True


def tag_process_logs(worker: str) -> None:
    """Tag this process's log lines with ``worker=<worker> pid=<pid>`` (after ``configure_logging``)."""
    tag = ProcessTag(worker=worker, pid=os.getpid())
    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)


async def serve_until_signal(
    config: Config, *, reuse_port: bool = False, stop: asyncio.Event | None = None,
    on_ready: Callable[[ProxyServer], None] | None = None, on_stopping: Callable[[], None] | None = None,
    signals: frozenset[signal.Signals] = STOP_SIGNALS, config_path: str | None = None,
    app_command: str | None = None,
) -> int:
    """Start the listeners and block until SIGTERM/SIGINT (or ``stop`` is set); then shut down gracefully.

    SIGHUP re-reads ``config_path`` (hot reload). With ``app_command`` the app is started first and
    supervised (``supervise.AppProcess``): when it exits on its own the proxy stops too, and on a
    stop signal the proxy drains before the app gets SIGTERM. Returns the exit code: 0, or 1 when
    the app died. ``on_ready`` is called once both listeners are bound, ``on_stopping`` when the stop
    begins. Raises OSError when a listener cannot bind.
    """
    from affinity_proxy.serve.app import ProxyServer
    from affinity_proxy.serve.reload import reload_from_file

    server = ProxyServer(config, reuse_port=reuse_port, config_path=config_path)
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: reload_from_file(server.ctx))
    # A supervised worker starts with these blocked (so a signal during its start-up waits for the
    # handlers above instead of killing it); a pending one is delivered now. No-op otherwise.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    app = AppProcess(app_command, grace=config.limits.client_timeout) if app_command else None
    code = 0
    try:
        if app is not None:
            await app.start()
        await server.start()
        if on_ready is not None:
            on_ready(server)
        code = await _wait_for_stop(stop, app)
        if on_stopping is not None:
            on_stopping()
        log.info("shutting down")
        server.ctx.shutting_down = True
    finally:
        for sig in (*signals, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await server.stop()
        if app is not None:
            await app.stop()
    log.info("stopped")
    return code


async def _wait_for_stop(stop: asyncio.Event, app: AppProcess | None) -> int:
    """Until a stop signal (0), or the supervised app exits (1 unless it exited 0)."""
    if app is None:
        await stop.wait()
        return 0
    tasks = TaskSet()
    waiter = tasks.spawn(stop.wait(), name="stop-signal")
    app_exit = tasks.spawn(app.wait(), name="app-exit")
    try:
        await asyncio.wait({waiter, app_exit}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await tasks.close()
    if app_exit.done() and not app_exit.cancelled():
        status = app_exit.result()
        log.error("the app exited (status %s); stopping the proxy", status)
        return 0 if status == 0 else 1
    return 0


#: aiohttp's wait for a WebSocket's closing handshake; open sockets are closed together on shutdown.
WS_CLOSE_WAIT = 10.0
#: Background tasks cancelled (one re-cancel after ``_tasks.RECANCEL_AFTER``), pools and clients closed.
CLEANUP_MARGIN = 3.0


def shutdown_budget(config: Config, *, supervised_app: bool) -> float:
    """The longest a graceful stop of ``serve`` (one process) may take, in seconds: what a
    platform's kill timeout (Fly's ``kill_timeout``) must cover so SIGKILL cuts nothing.

    The stages, in order (``serve_until_signal``, ``ProxyServer.stop``): the fast engine drains
    (``limits.client_timeout``); the aiohttp listener closes open WebSockets (``WS_CLOSE_WAIT``)
    and drains what it took over from the fast engine (``client_timeout`` again; with the aiohttp
    engine this is the only drain), then flushes pending pin refreshes (``store.timeout``) and
    closes its tasks (``CLEANUP_MARGIN``); the admin listener gets ``app.ADMIN_SHUTDOWN_TIMEOUT``;
    with ``--exec`` (``supervised_app``) the app then gets SIGTERM and up to ``client_timeout``
    before SIGKILL. A request in flight is cut at the end of its drain, so ``client_timeout`` at
    least ``upstream_timeout`` lets one that waits on a slow app finish. Pure.
    """
    from affinity_proxy.serve.app import ADMIN_SHUTDOWN_TIMEOUT

    limits = config.limits
    drains = 2 if config.engine == "fast" else 1
    app = limits.client_timeout if supervised_app else 0.0
    return (drains * limits.client_timeout + WS_CLOSE_WAIT + config.store.timeout + CLEANUP_MARGIN
            + ADMIN_SHUTDOWN_TIMEOUT + app)


def raise_open_file_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard limit: ``limits.max_connections`` (10,000 by default)
    needs more descriptors than the usual soft limit of 1024 (nginx's ``worker_rlimit_nofile``)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %s: %s", soft, exc)


def worker_main(config: Config, index: int, conn: Connection, config_path: str | None = None) -> None:
    """Body of worker ``index`` (the target of a spawned process; see ``workers.Supervisor``).

    Reports ``("ready", main_port, admin_port)`` or ``("failed", message)`` on ``conn`` and stops
    gracefully on SIGTERM or when ``conn`` reaches EOF (the supervisor is gone). SIGINT is ignored:
    a terminal's Ctrl-C reaches every process of the group, and the supervisor turns it into one
    SIGTERM per worker. Exits 0 after a clean shutdown, 1 when it could not start.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(config.log.level, config.log.format)
    tag_process_logs(str(index))
    loop = new_event_loop()
    try:
        code = loop.run_until_complete(_serve_worker(config, conn, config_path))
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # nothing left to stop; exit quietly
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        conn.close()
    raise SystemExit(code)


async def _serve_worker(config: Config, conn: Connection, config_path: str | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    ready = False

    def supervisor_readable() -> None:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            log.warning("supervisor gone; shutting down")
            loop.remove_reader(conn.fileno())
            stop.set()
            return
        log.warning("unexpected message from the supervisor: %r", message)

    def on_ready(server: ProxyServer) -> None:
        nonlocal ready
        ready = True
        conn.send(("ready", server.main_port, server.admin_port))

    def on_stopping() -> None:
        # One stop is enough: a later SIGTERM stays pending instead of cutting the graceful shutdown.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    loop.add_reader(conn.fileno(), supervisor_readable)
    try:
        await serve_until_signal(config, reuse_port=True, stop=stop, on_ready=on_ready, on_stopping=on_stopping,
                                 signals=frozenset({signal.SIGTERM}), config_path=config_path)
    except OSError as exc:
        if ready:
            raise
        log.error("cannot start: %s", exc)
        conn.send(("failed", str(exc)))
        return 1
    finally:
        loop.remove_reader(conn.fileno())
    return 0


def prepare_listeners(config: Config) -> tuple[Config, list[socket.socket]]:
    """Check that both listen addresses are free and replace port 0 by a held free port.

    Returns the config the workers get and the sockets to keep open while they run (bound with
    SO_REUSEPORT, never listening, so they take no connections). Raises OSError (address in use).
    """
    held: list[socket.socket] = []
    try:
        listen = _prepare(config.listen_host, config.listen_port, held)
        admin = _prepare(config.admin_host, config.admin_port, held)
    except OSError:
        for sock in held:
            sock.close()
        raise
    return replace(config, listen=listen, admin_listen=admin), held


def _prepare(host: str, port: int, held: list[socket.socket]) -> str:
    if is_dual_stack(host):  # one socket taking both families, as each worker will bind it
        try:
            sock = dual_stack_socket(port, reuse_port=port == 0)
        except OSError as exc:
            raise OSError(f"cannot bind {host_port(host, port)}: {exc.strerror}") from exc
        if port != 0:
            sock.close()
            return host_port(host, port)
        held.append(sock)
        return host_port(host, int(sock.getsockname()[1]))
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if port == 0:
        infos = infos[:1]
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(f"cannot bind {host}:{port}: {exc.strerror}") from exc
        except OSError:
            sock.close()
            raise
        if port != 0:
            sock.close()
            continue
        held.append(sock)
        port = int(sock.getsockname()[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
