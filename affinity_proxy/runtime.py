"""Process runtime for ``serve``: event loop choice, signal handling, clean shutdown.

SIGTERM/SIGINT stop accepting, let in-flight requests finish (up to ``limits.client_timeout``),
flush pin refreshes and exit 0. uvloop is used when installed (it is faster; the proxy works
without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from affinity_proxy.config import Config
from affinity_proxy.observability.logs import configure_logging

log = logging.getLogger("affinity_proxy.runtime")


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve_until_signal(config: Config) -> None:
    """Start the listeners and block until SIGTERM/SIGINT; then shut down gracefully."""
    from affinity_proxy.app import ProxyServer

    server = ProxyServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down")
        server.ctx.shutting_down = True
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()
    log.info("stopped")


def run_serve(config: Config, workers: int) -> int:
    """Entry point of ``affinity-proxy serve``. Returns the process exit code."""
    configure_logging(config.log.level, config.log.format)
    if workers != 1:
        if config.store.url.startswith("memory:"):
            print(
                "error: --workers > 1 needs a shared pin store (store.url: redis://...); the memory store "
                "lives in one process",
                file=sys.stderr,
            )
            return 2
        print("error: --workers > 1 is not available yet in this build; run one process per core", file=sys.stderr)
        return 2
    loop = _new_event_loop()
    try:
        loop.run_until_complete(serve_until_signal(config))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return 0
